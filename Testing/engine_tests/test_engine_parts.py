"""The engine's parts on their own: the batched token loop, the batched prefill's layout (cached
prefixes and new tokens padded apart), the KV helpers, the session store and the fast-path
adapter."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from medmvl_core.client.protocol import GenerationSettings
from medmvl_core.engine.batch import PrefillRow, prefill_batch
from medmvl_core.engine.decode import run_batch_decode
from medmvl_core.engine.errors import CancelledError, NotFoundError
from medmvl_core.engine.fast_path import FastPath
from medmvl_core.engine.kv import dynamic_from, row_cache, stack_caches
from medmvl_core.engine.session import SessionStore
from medmvl_core.engine.testing import ToyVolume, load_toy

V = 10   # vocabulary of the scripted logits


class _Row:
    """What run_batch_decode reads of a prepared request."""

    def __init__(self, max_new: int, cancel_at: int | None = None, stream: bool = False):
        self.params = GenerationSettings(max_new_tokens=max_new)
        self.generator = None
        self.calls = 0
        self.cancel_at = cancel_at
        self.checks = cancel_at is not None
        self.pieces: list[int] = []
        self.streamer = type("S", (), {"on_piece": (lambda _p: None) if stream else None,
                                       "push": self.pieces.append, "ids": []})()
        self.first: list[int] = []

    def check(self) -> None:
        self.calls += 1
        if self.cancel_at is not None and self.calls > self.cancel_at:
            raise CancelledError("the answer was cancelled")

    def on_token_id(self, tok: int) -> None:
        self.first.append(tok)


def _scripted(script: list[list[int]]):
    """Logits whose argmax at step t for row b is script[b][t] (then 1 forever)."""
    fed: list[list[int]] = []

    def logits(t: int) -> torch.Tensor:
        out = torch.zeros(len(script), V)
        for b, toks in enumerate(script):
            out[b, toks[t] if t < len(toks) else 1] = 1.0
        return out

    def step(tokens: torch.Tensor) -> torch.Tensor:
        fed.append(tokens.tolist())
        return logits(len(fed))

    return logits(0), step, fed


def test_batch_loop_stops_each_row_on_its_own_and_counts_what_was_fed():
    eos, pad = 9, 0
    # row 0 stops at EOS after 2 tokens, row 1 runs to its max (4), row 2 is cancelled after 1 token
    first, step, fed = _scripted([[3, 4, eos], [5, 6, 7, 8, 2], [2, 2, 2, 2]])
    rows = [_Row(8, stream=True), _Row(4), _Row(8, cancel_at=1)]
    out = run_batch_decode(rows, first, step, {eos}, pad)
    assert out[0] == ([3, 4, eos], "stop", 2)            # EOS is returned, not fed
    assert out[1] == ([5, 6, 7, 8], "length", 3)         # the last token is not fed
    assert isinstance(out[2], CancelledError)
    assert rows[0].pieces == [3, 4]                      # streamed without EOS
    assert rows[1].streamer.ids == [5, 6, 7, 8]          # non-streaming rows get their ids at the end
    # one forward per step for all rows; a row that is done is fed padding
    assert fed == [[3, 5, 2], [4, 6, pad], [pad, 7, pad]]
    assert all(len(r.first) == 1 for r in rows)          # the first token's time, once


def test_batch_loop_samples_sampled_rows_with_their_own_generator():
    first = torch.randn(2, V)

    def step(tokens):
        return first.clone()

    rows = [_Row(3), _Row(3)]
    rows[1].params = GenerationSettings(max_new_tokens=3, do_sample=True, seed=7)
    rows[1].generator = torch.Generator().manual_seed(7)
    out = run_batch_decode(rows, first, step, set(), 0)
    gen = torch.Generator().manual_seed(7)
    probs = first[1:2].softmax(-1)
    want = [int(torch.multinomial(probs, 1, generator=gen)) for _ in range(3)]
    assert out[1][0] == want and out[0][0] == [int(first[0].argmax())] * 3


def test_stack_caches_takes_an_empty_row_and_row_cache_drops_padding_anywhere():
    a = dynamic_from([(torch.arange(6.).reshape(1, 1, 3, 2), -torch.arange(6.).reshape(1, 1, 3, 2))])
    cache, mask = stack_caches([None, a], [0, 3])
    assert mask.tolist() == [[0, 0, 0], [1, 1, 1]] and cache.layers[0].keys[0].abs().sum() == 0
    assert torch.equal(cache.layers[0].keys[1:], a.layers[0].keys)
    keys = torch.arange(10.).reshape(1, 1, 5, 2)
    gapped = dynamic_from([(keys, keys + 100)])
    m = torch.tensor([[0, 1, 0, 1, 1]])
    back = row_cache(gapped, m, 0, 2)                    # the first two real slots: 1 and 3
    assert back.layers[0].keys.tolist() == [[[[2., 3.], [6., 7.]]]]
    assert torch.equal(back.layers[0].values, back.layers[0].keys + 100)


@pytest.fixture(scope="module")
def toy(reference_dir):
    return load_toy(str(reference_dir / "base" / "llm"))


def test_batched_prefill_of_a_follow_up_and_a_fresh_row_equals_each_alone(toy):
    """A row with a cached prefix and a shorter fresh row with image placeholders, in one forward:
    last-token logits, and each row's cache taken back out, equal the row prefilled alone."""
    model, _ = toy
    torch.manual_seed(0)
    feats = model.encode_images(images3d=torch.rand(1, 1, 4, 8, 8))            # [1, 8, hidden]
    fresh = [5, 6] + [-201] * 8 + [7, 8, 9]
    prefix, follow = [11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34]
    with torch.inference_mode():
        def alone(ids, past=None, n_past=0, img=None):
            out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, n_past + len(ids), dtype=torch.long),
                        image_embeds=img, past_key_values=past, use_cache=True)
            return out.logits[:, -1], out.past_key_values

        _, past = alone(prefix)
        want_follow, full_follow = alone(follow, dynamic_from([(k.clone(), v.clone()) for k, v in
                                                               [(la.keys, la.values) for la in past.layers]]), len(prefix))
        want_fresh, full_fresh = alone(fresh, img=feats)
        logits, batch = prefill_batch(model, [PrefillRow(past, len(prefix), follow), PrefillRow(None, 0, fresh, feats)],
                                      torch.device("cpu"))
    assert torch.allclose(logits[0], want_follow[0], atol=1e-5)
    assert torch.allclose(logits[1], want_fresh[0], atol=1e-5)
    assert past.get_seq_length() == len(prefix)                                 # the row's own cache is untouched
    for b, (full, n) in enumerate(((full_follow, len(prefix + follow)), (full_fresh, len(fresh)))):
        got = batch.row(b, n)
        assert torch.allclose(got.layers[0].keys, full.layers[0].keys, atol=1e-5)
        assert torch.allclose(got.layers[1].values, full.layers[1].values, atol=1e-5)
    # one decode step continues both rows at their own positions
    with torch.inference_mode():
        step = batch.step(torch.tensor([40, 41]))
        one, _ = alone([40], full_follow, len(prefix + follow) + 0)
    assert torch.allclose(step[0], one[0], atol=1e-5)


def test_session_store_speaks_engine_terms_and_evicts_by_budget():
    store = SessionStore(kv_cache_bytes=100)
    with pytest.raises(NotFoundError) as err:
        store.get("nope")
    assert err.value.code == "unknown_session" and "POST" not in str(err.value) and "new session" in str(err.value)
    with pytest.raises(NotFoundError):
        store.delete("nope")
    vol = ToyVolume(np.zeros((4, 4, 4), np.float32))
    a, b = store.create(vol), store.create(vol, session_id="b")
    assert b.id == "b" and a.volume_id == b.volume_id and len(store) == 2
    kv = [(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))]                   # 64 bytes
    a.past, b.past = dynamic_from(kv), dynamic_from(kv)
    store.account(a)
    assert store.kv_bytes_used() == 64
    store.account(b)                                                            # over 100: a's cache goes
    assert a.past is None and b.past is not None and store.kv_bytes_used() == 64
    with b.lock:                                                                # busy sessions stay
        assert store.evict_idle(0) == 1 and store.holds(b) and not store.holds(a)


def test_fast_path_adapter_switches_off_on_failure_but_not_on_oom():
    cpu = torch.device("cpu")
    assert not FastPath(None, cpu, "auto").wanted and FastPath(None, cpu, "static").wanted

    def broken(model, mode):
        raise RuntimeError("no static cache for this model")

    fp = FastPath(None, cpu, "static", factory=broken)
    assert fp.acquire() is None and not fp.enabled and not fp.busy
    assert "no static cache" in fp.fallback_reason

    class Dec:
        mode, fallback_reason = "static", None

        def start_from(self, *a):
            raise RuntimeError("CUDA out of memory (simulated)")

    fp = FastPath(None, cpu, "static", factory=lambda m, mode: Dec())
    with pytest.raises(RuntimeError, match="out of memory"):
        fp.start([None], [3], 4)
    assert fp.enabled and not fp.busy and fp.mode == "static"                    # OOM: still on, released
    held = fp.acquire()
    assert held is not None and fp.busy
    result = []
    t = threading.Thread(target=lambda: result.append(fp.acquire()))
    t.start()
    t.join()
    assert result == [None]                                                      # busy: the plain path serves
    fp.release()


def test_fresh_rows_share_their_common_opening_computed_once(toy, monkeypatch):
    """Fresh rows that open with the same text (a system prompt) get it computed once at batch 1;
    logits and each row's cache still equal the row prefilled alone."""
    from medmvl_core.engine import batch as B

    model, _ = toy
    torch.manual_seed(1)
    opening = list(range(30, 42))                                                # 12 common tokens
    rows_ids = [opening + [-201] * 8 + [7, 8, 9], opening + [-201] * 8 + [5, 6, 7, 8, 9, 10, 11]]
    feats = [model.encode_images(images3d=torch.rand(1, 1, 4, 8, 8)) for _ in rows_ids]
    calls = []
    real = B.stack_caches
    monkeypatch.setattr(B, "stack_caches", lambda pasts, lengths: calls.append(list(lengths)) or real(pasts, lengths))
    with torch.inference_mode():
        logits, batch = prefill_batch(model, [PrefillRow(None, 0, ids, f) for ids, f in zip(rows_ids, feats)],
                                      torch.device("cpu"))
        for b, (ids, f) in enumerate(zip(rows_ids, feats)):
            out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        image_embeds=f, use_cache=True)
            assert torch.allclose(logits[b], out.logits[0, -1], atol=1e-5)
            got = batch.row(b, len(ids))
            assert torch.allclose(got.layers[0].keys, out.past_key_values.layers[0].keys, atol=1e-5)
    assert calls == [[12, 12]]                        # both rows started from the one shared opening
    assert B._shared_prefix([PrefillRow(None, 0, [1] * 7 + [2]), PrefillRow(None, 0, [1] * 7 + [3])]) == 0  # too short
