"""Fast decode path (static KV cache, buckets, prefix reuse, fallback) vs the plain path and
transformers ``generate`` on the MedM-VL reference fixture checkpoint (CPU)."""

from __future__ import annotations

import logging

import pytest
import torch

from medmvl_core.engine import fast_decode as fd
from medmvl_core.engine.fast_decode import FastDecoder, FastPathError, pick_bucket, select_mode

BUCKETS = (32, 64, 128)


@pytest.fixture(scope="module")
def model(reference_dir):
    from medmvl_core.model import load_checkpoint

    torch.set_num_threads(2)
    m, _ = load_checkpoint(reference_dir / "ct_chest_tiny")
    return m.eval()


def _ids(n: int, seed: int, vocab: int = 800) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_greedy(model, embeds: torch.Tensor, n: int) -> list[int]:
    """Reference: transformers generate with inputs_embeds (dynamic cache), as MedM-VL runs it."""
    with torch.no_grad():
        out = model.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0].tolist()


def _greedy(dec: FastDecoder, first: torch.Tensor, n: int) -> tuple[list[int], list[torch.Tensor]]:
    toks, logits, lg = [], [first], first
    for _ in range(n):
        toks.append(int(lg.argmax(-1)[0]))
        if len(toks) < n:
            lg = dec.step(toks[-1])
            logits.append(lg)
    return toks, logits


def _plain_logits(model, embeds: torch.Tensor, toks: list[int]) -> list[torch.Tensor]:
    """Logits of the engine's plain path (DynamicCache, all-ones mask) for a forced token list."""
    from transformers import DynamicCache

    out, past, total = [], DynamicCache(), embeds.shape[1]
    with torch.no_grad():
        o = model.llm(inputs_embeds=embeds, attention_mask=torch.ones(1, total, dtype=torch.long),
                      past_key_values=past, use_cache=True)
        out.append(o.logits[:, -1].float())
        for t in toks[:-1]:
            total += 1
            o = model.llm(input_ids=torch.tensor([[t]]), attention_mask=torch.ones(1, total, dtype=torch.long),
                          past_key_values=o.past_key_values, use_cache=True)
            out.append(o.logits[:, -1].float())
    return out


def test_static_cache_matches_generate_across_buckets(model):
    dec = FastDecoder(model, buckets=BUCKETS)
    assert dec.mode == "static"
    caps = set()
    for length, seed in ((5, 0), (40, 2), (70, 3), (9, 4)):  # one decoder object reused
        embeds = model.llm.get_input_embeddings()(torch.tensor([_ids(length, seed)])).detach()
        ref = _hf_greedy(model, embeds, 8)
        toks, logits = _greedy(dec, dec.prefill(embeds, max_new_tokens=8), 8)
        caps.add(dec._slot.cap)
        assert toks == ref, f"prompt length {length}"
        if length in (40, 9):
            for a, b in zip(logits, _plain_logits(model, embeds, toks)):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert caps == {32, 64, 128}


def test_image_prompt_and_prefix_reuse(model, reference_dir):
    """Prefix reuse is the engine's (session caches moved into the static cache): the first
    answer equals ``generate``; a follow-up prefills only its new tokens and equals re-prefilling
    everything; another image never reuses the cache."""
    from medmvl_core.engine import Engine
    from medmvl_core.imaging import read_image
    from medmvl_core.model import load_checkpoint

    _, proc = load_checkpoint(reference_dir / "ct_chest_tiny")
    vols = [read_image(reference_dir / "inputs" / f) for f in ("ct_volume.npy", "ct_volume_b.npy")]
    q1, q2 = "Is there a nodule?", "Where is it?"
    eng = Engine(model, proc, decode_mode="static")
    ids = eng.encode_prompt(eng.conversation([], q1))
    image_embeds = eng.prepare(vols[0]).embeds
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor([ids]), image_embeds=image_embeds, max_new_tokens=6,
                             do_sample=False, pad_token_id=0)[0].tolist()
    s = eng.create_session(vols[0])
    first = eng.answer(question=q1, session=s, max_new_tokens=6)
    assert first.timings["cached_tokens"] == 0 and first.timings["decode_path"] == "static:static"
    assert first.token_ids == ref
    # follow-up: previous prompt + answer + a new question; only the new part is prefilled
    follow = eng.answer(question=q2, session=s, max_new_tokens=4)
    n_follow = len(eng.encode_prompt(eng.conversation(s.turns[:1], q2)))
    kept = follow.timings["cached_tokens"]
    assert len(ids) < kept < n_follow and follow.timings["prefill_tokens"] == n_follow - kept
    fresh = Engine(model, proc, decode_mode="static", use_cache=False)
    rs = fresh.create_session(vols[0])
    rs.turns = list(s.turns[:1])
    full = fresh.answer(question=q2, session=rs, max_new_tokens=4)
    assert full.timings["cached_tokens"] == 0 and follow.token_ids == full.token_ids
    # another image with the same conversation: nothing may be reused
    other = eng.create_session(vols[1])
    other.turns = list(s.turns[:1])
    again = eng.answer(question=q2, session=other, max_new_tokens=4)
    assert again.timings["cached_tokens"] == 0


def test_cache_grows_past_its_bucket_and_plain_mode_agrees(model):
    embeds = model.llm.get_input_embeddings()(torch.tensor([_ids(25, 9)])).detach()
    ref = _hf_greedy(model, embeds, 12)
    dec = FastDecoder(model, buckets=BUCKETS)
    toks, _ = _greedy(dec, dec.prefill(embeds, max_new_tokens=1), 12)  # 25+1 fits 32, then grows
    assert dec._slot.cap == 64 and toks == ref
    plain = FastDecoder(model, mode="plain")
    assert plain.mode == "plain"
    assert _greedy(plain, plain.prefill(embeds), 12)[0] == ref


def test_mode_selection():
    assert select_mode("cpu", "auto")[0] == "static"
    assert "CUDA" in select_mode("cpu", "graph")[1] and select_mode("cpu", "graph")[0] == "static"
    assert select_mode("cpu", "compile")[0] == "static"
    assert select_mode("cuda", "auto")[0] == "graph"
    assert select_mode("cuda", "compile")[0] == "compile"
    assert select_mode("cuda", "plain")[0] == "plain"
    with pytest.raises(FastPathError, match="not known"):
        select_mode("cuda", "turbo")
    assert pick_bucket(33, BUCKETS) == 64
    with pytest.raises(FastPathError, match="largest KV-cache bucket"):
        pick_bucket(129, BUCKETS)


def test_capture_failure_falls_back_with_logged_reason(model, monkeypatch, caplog):
    embeds = model.llm.get_input_embeddings()(torch.tensor([_ids(12, 10)])).detach()
    ref = _hf_greedy(model, embeds, 6)

    def broken(fn, owner):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(fd, "capture_cuda_graph", broken)
    dec = FastDecoder(model, buckets=BUCKETS)
    dec.mode = "graph"  # as selected on a CUDA device
    with caplog.at_level(logging.WARNING, logger="medmvl_core.engine.fast_decode"):
        toks, _ = _greedy(dec, dec.prefill(embeds, max_new_tokens=6), 6)
    assert toks == ref
    assert dec.mode == "static" and "not permitted when stream is capturing" in dec.fallback_reason
    assert any("falling back" in r.getMessage() for r in caplog.records)


def test_captured_step_that_disagrees_is_rejected(model, monkeypatch):
    embeds = model.llm.get_input_embeddings()(torch.tensor([_ids(12, 11)])).detach()
    ref = _hf_greedy(model, embeds, 6)

    def wrong(fn, owner):  # a "graph" that returns stale/garbage logits
        def replay():
            return fn() * -1.0
        return replay

    monkeypatch.setattr(fd, "capture_cuda_graph", wrong)
    dec = FastDecoder(model, buckets=BUCKETS)
    dec.mode = "graph"
    toks, _ = _greedy(dec, dec.prefill(embeds, max_new_tokens=6), 6)
    assert toks == ref and "differs from the eager step" in dec.fallback_reason


def test_working_runner_is_used_and_errors(model, monkeypatch):
    calls = []

    def fake(fn, owner):  # stands in for a successful capture: replays the eager step
        def replay():
            calls.append(1)
            return fn()
        return replay

    monkeypatch.setattr(fd, "capture_cuda_graph", fake)
    embeds = model.llm.get_input_embeddings()(torch.tensor([_ids(7, 12)])).detach()
    dec = FastDecoder(model, buckets=BUCKETS)
    dec.mode = "graph"
    toks, _ = _greedy(dec, dec.prefill(embeds, max_new_tokens=5), 5)
    assert toks == _hf_greedy(model, embeds, 5) and dec.fallback_reason is None and len(calls) >= 4
    with pytest.raises(FastPathError, match="prefill"):
        FastDecoder(model, buckets=BUCKETS).step(3)
    with pytest.raises(FastPathError, match="largest KV-cache bucket"):
        dec.prefill(embeds, max_new_tokens=500)


def _dyn_prefill(model, embeds: torch.Tensor):
    """The engine's prefill: plain forward into a DynamicCache -> (first logits, cache)."""
    from transformers import DynamicCache

    with torch.no_grad():
        o = model.llm(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                      past_key_values=DynamicCache(), use_cache=True)
    return o.logits[:, -1].float(), o.past_key_values


def test_start_from_session_caches_single_and_batched(model):
    lengths = (7, 19, 12)
    embs = [model.llm.get_input_embeddings()(torch.tensor([_ids(n, 20 + n)])).detach() for n in lengths]
    refs = [_hf_greedy(model, e, 6) for e in embs]
    dec = FastDecoder(model, buckets=BUCKETS)
    first, past = _dyn_prefill(model, embs[1])
    dec.start_from(past, lengths[1], max_new_tokens=6)
    assert _greedy(dec, first, 6)[0] == refs[1]
    # hand the cache back to the session: a plain step on it equals a static step
    back = dec.to_dynamic(0, lengths[1] + 5)
    assert back.get_seq_length() == lengths[1] + 5
    # several sessions decoded together from their own caches (left-padded into one static cache)
    firsts, pasts = zip(*[_dyn_prefill(model, e) for e in embs])
    dec.start_from(list(pasts), list(lengths), max_new_tokens=6)
    lg = torch.cat(firsts)
    toks = [[] for _ in lengths]
    for i in range(6):
        nxt = lg.argmax(-1)
        for r in range(3):
            toks[r].append(int(nxt[r]))
        if i < 5:
            lg = dec.step(nxt)
    assert toks == refs
    for r, n in enumerate(lengths):  # each row's cache (prompt + 5 fed tokens) continues like the reference
        cache = dec.to_dynamic(r, n + 5)
        with torch.no_grad():
            o = model.llm(input_ids=torch.tensor([[toks[r][-1]]]), past_key_values=cache, use_cache=True,
                          attention_mask=torch.ones(1, n + 6, dtype=torch.long))
        full = torch.cat([embs[r], model.llm.get_input_embeddings()(torch.tensor([toks[r]])).detach()], 1)
        with torch.no_grad():
            want = model.llm(inputs_embeds=full).logits[:, -1]
        torch.testing.assert_close(o.logits[:, -1], want, atol=1e-4, rtol=1e-4)


def test_warmup_leaves_the_decoder_clean(model):
    dec = FastDecoder(model, buckets=BUCKETS)
    dec.warmup(prompt_len=20, batch_sizes=(1, 2), max_new_tokens=30)
    assert set(dec._slots) == {(64, 1), (64, 2)} and dec.length == 0
    embeds = model.llm.get_input_embeddings()(torch.tensor([_ids(10, 30)])).detach()
    assert _greedy(dec, dec.prefill(embeds, max_new_tokens=6), 6)[0] == _hf_greedy(model, embeds, 6)


def test_least_recently_used_caches_are_freed(model):
    dec = FastDecoder(model, buckets=BUCKETS, max_slots=2)
    for n, new in ((10, 5), (40, 5), (80, 5), (12, 5)):  # buckets 32, 64, 128, 32
        embeds = model.llm.get_input_embeddings()(torch.tensor([_ids(n, n)])).detach()
        dec.prefill(embeds, max_new_tokens=new)
        dec.step(1)
    assert list(dec._slots) == [(128, 1), (32, 1)]


def test_extend_appends_a_follow_up_to_a_loaded_cache(model):
    """extend(new tokens) after start_from(session cache) = prefilling prefix + new tokens at once:
    same last logits and greedy continuation, for suffix lengths inside, at and past a chunk size
    and across a cache bucket; the padding slots never reach the session's cache."""
    from medmvl_core.engine.fast_decode import CHUNKS

    emb = model.llm.get_input_embeddings()
    for n_prefix, n_new in ((9, 1), (9, 5), (14, 8), (14, 9), (25, 20)):
        ids = _ids(n_prefix + n_new, 40 + n_new)
        full = emb(torch.tensor([ids])).detach()
        ref_first, _ = _dyn_prefill(model, full)
        ref = _hf_greedy(model, full, 5)
        _, past = _dyn_prefill(model, full[:, :n_prefix])
        dec = FastDecoder(model, buckets=BUCKETS)
        dec.start_from(past, n_prefix, max_new_tokens=6)   # bucket 32: (25, 20) must grow to 64
        first = dec.extend(full[:, n_prefix:])
        assert torch.allclose(first, ref_first, atol=1e-4), (n_prefix, n_new)
        assert dec.length == n_prefix + n_new
        toks, _ = _greedy(dec, first, 5)
        assert toks == ref, (n_prefix, n_new)
        back = dec.to_dynamic(0)
        assert back.get_seq_length() == n_prefix + n_new + 4
    assert dec._slot.cap == 64 and set(dec._slot.chunks) == {32}  # grew; 20 new tokens padded to 32
    assert CHUNKS[0] == 8 and 16 in CHUNKS
    # twice in a row (a follow-up after an answer) equals the one-shot prefill too
    ids = _ids(30, 77)
    full = emb(torch.tensor([ids])).detach()
    _, past = _dyn_prefill(model, full[:, :10])
    dec = FastDecoder(model, buckets=BUCKETS)
    dec.start_from(past, 10, max_new_tokens=30)
    dec.extend(full[:, 10:17])
    assert torch.allclose(dec.extend(full[:, 17:]), _dyn_prefill(model, full)[0], atol=1e-4)


def test_extend_uses_the_captured_runner_and_falls_back(model, monkeypatch):
    calls = []

    def fake(fn, owner):
        def replay():
            calls.append(1)
            return fn()
        return replay

    emb = model.llm.get_input_embeddings()
    full = emb(torch.tensor([_ids(20, 90)])).detach()
    ref = _dyn_prefill(model, full)[0]
    for capture, used, reason in ((fake, True, None), (lambda fn, owner: 1 / 0, False, "ZeroDivisionError")):
        monkeypatch.setattr(fd, "capture_cuda_graph", capture)
        calls.clear()
        _, past = _dyn_prefill(model, full[:, :12])
        dec = FastDecoder(model, buckets=BUCKETS)
        dec.mode = "graph"
        dec.start_from(past, 12, max_new_tokens=8)
        assert torch.allclose(dec.extend(full[:, 12:]), ref, atol=1e-4)
        assert bool(calls) == used and (dec.fallback_reason is None if reason is None
                                        else reason in dec.fallback_reason and dec.mode == "static")
    with pytest.raises(FastPathError, match="load a cache first"):
        FastDecoder(model, buckets=BUCKETS).extend(full[:, :3])
    with pytest.raises(FastPathError, match="at most 128 tokens"):
        dec.extend(emb(torch.tensor([_ids(129, 1)])).detach())
    with pytest.raises(FastPathError, match="plain path"):
        FastDecoder(model, mode="plain").extend(full[:, :3])
