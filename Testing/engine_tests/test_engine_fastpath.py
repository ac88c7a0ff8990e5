"""Fast decode paths on the CPU: the static KV cache and batched decoding of concurrent
requests give the same greedy tokens as the plain path; the static path falls back cleanly."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from medmvl_core.engine import Engine, Request
from medmvl_core.engine.errors import CancelledError
from medmvl_core.engine.testing import ToyVolume, load_toy

QUESTIONS = ["Is there a nodule?", "Where is it located?", "How large is it?"]


@pytest.fixture(scope="module")
def toy(reference_dir):
    return load_toy(str(reference_dir / "base" / "llm"))


def _vol(seed):
    return ToyVolume(np.random.RandomState(seed).randn(8, 16, 16).astype(np.float32))


def test_static_cache_equals_plain_over_turns(toy):
    model, proc = toy
    plain, static = Engine(model, proc, decode_mode="plain"), Engine(model, proc, decode_mode="static")
    sp, ss = plain.create_session(_vol(0)), static.create_session(_vol(0))
    for i, q in enumerate(QUESTIONS):
        a = plain.answer(question=q, session=sp, max_new_tokens=10)
        b = static.answer(question=q, session=ss, max_new_tokens=10)
        assert b.timings["decode_path"] == "static:static" and a.timings["decode_path"] == "plain"
        # follow-ups prefill their new tokens into the static cache (FastDecoder.extend)
        assert b.timings.get("prefill_path") == ("static:static" if i else None)
        assert "prefill_path" not in a.timings
        assert a.token_ids == b.token_ids and a.text == b.text
        assert ss.kv_ids == sp.kv_ids           # the session cache covers the same tokens
    assert b.timings["cached_tokens"] > 8       # and the static path's cache was reused


def test_static_path_falls_back_to_plain(toy, monkeypatch):
    model, proc = toy

    class Broken:
        mode = "static"

        def __init__(self, *a, **k):
            pass

        def start_from(self, *a, **k):
            raise RuntimeError("graphs unavailable on this platform")

    eng = Engine(model, proc, decode_mode="static")
    monkeypatch.setattr(eng.fast_path, "factory", lambda model, mode: Broken())
    a = eng.answer(_vol(1), QUESTIONS[0], max_new_tokens=8)
    assert a.timings["decode_path"] == "plain"
    assert a.token_ids == Engine(model, proc, decode_mode="plain").answer(
        _vol(1), QUESTIONS[0], max_new_tokens=8).token_ids


def test_follow_up_prefill_falls_back_to_plain_when_extend_fails(toy, monkeypatch):
    from medmvl_core.engine import fast_decode as fd

    model, proc = toy
    plain, static = Engine(model, proc, decode_mode="plain"), Engine(model, proc, decode_mode="static")
    sp, ss = plain.create_session(_vol(3)), static.create_session(_vol(3))
    for eng, s in ((plain, sp), (static, ss)):
        eng.answer(question=QUESTIONS[0], session=s, max_new_tokens=6)

    def broken(self, embeds):
        raise RuntimeError("extend broke")

    monkeypatch.setattr(fd.FastDecoder, "extend", broken)
    a = plain.answer(question=QUESTIONS[1], session=sp, max_new_tokens=6)
    b = static.answer(question=QUESTIONS[1], session=ss, max_new_tokens=6)
    assert a.token_ids == b.token_ids and "prefill_path" not in b.timings
    assert b.timings["decode_path"] == "plain" and not static.fast_path.enabled   # the fast path is off from now on
    assert "extend broke" in static.fast_path.fallback_reason
    assert not static.fast_path.busy                                               # and its lock was released
    c = static.answer(question=QUESTIONS[2], session=ss, max_new_tokens=6)
    assert c.token_ids == plain.answer(question=QUESTIONS[2], session=sp, max_new_tokens=6).token_ids


def test_batched_decoding_equals_one_by_one(toy):
    model, proc = toy
    eng, ref = Engine(model, proc), Engine(model, proc)
    sessions = [eng.create_session(_vol(10 + i)) for i in range(4)]
    ref_sessions = [ref.create_session(_vol(10 + i)) for i in range(4)]
    # give two sessions some history so prompt lengths (and cached prefixes) differ
    for s, r in ((sessions[1], ref_sessions[1]), (sessions[3], ref_sessions[3])):
        eng.answer(question=QUESTIONS[0], session=s, max_new_tokens=6)
        ref.answer(question=QUESTIONS[0], session=r, max_new_tokens=6)
    maxes = [8, 5, 12, 3]
    streamed = [[] for _ in range(4)]
    reqs = [Request(question=QUESTIONS[1], session=s, max_new_tokens=m, on_token=streamed[i].append)
            for i, (s, m) in enumerate(zip(sessions, maxes))]
    got = eng.answer_batch(reqs)
    for i in range(4):
        want = ref.answer(question=QUESTIONS[1], session=ref_sessions[i], max_new_tokens=maxes[i])
        assert got[i].token_ids == want.token_ids, i
        assert "".join(streamed[i]) == got[i].text
        assert got[i].timings["decode_path"] == "batch4"
    # the split-back session caches are right: a follow-up equals the reference
    for i in range(4):
        a = eng.answer(question=QUESTIONS[2], session=sessions[i], max_new_tokens=6)
        b = ref.answer(question=QUESTIONS[2], session=ref_sessions[i], max_new_tokens=6)
        assert a.token_ids == b.token_ids and a.timings["cached_tokens"] > 8


def test_a_cancelled_row_fails_alone(toy):
    model, proc = toy
    eng = Engine(model, proc)
    cancel = threading.Event()
    seen = []

    def on_token(piece):
        seen.append(piece)
        if len(seen) == 2:
            cancel.set()

    reqs = [Request(volume=_vol(20), question=QUESTIONS[0], max_new_tokens=20, on_token=on_token,
                    cancel=cancel),
            Request(volume=_vol(21), question=QUESTIONS[0], max_new_tokens=6),
            Request(volume=_vol(22), question="", max_new_tokens=6)]   # invalid: fails alone
    got = eng.answer_batch(reqs)
    assert isinstance(got[0], CancelledError)
    assert got[1].token_ids == Engine(model, proc).answer(_vol(21), QUESTIONS[0],
                                                          max_new_tokens=6).token_ids
    assert isinstance(got[2], Exception) and "non-empty question" in str(got[2])


def test_fast_paths_reproduce_medmvl_on_the_ct_checkpoint(reference_dir):
    """Static and batched decoding give MedM-VL's recorded tokens (two prompts of different
    lengths in one batch, as MedM-VL's left-padded batch of 2 does)."""
    from medmvl_core.imaging import read_image
    from medmvl_core.model import load_checkpoint
    model, proc = load_checkpoint(reference_dir / "ct_chest_tiny")
    golden = json.loads((reference_dir / "ct_chest_tiny" / "golden.json").read_text())
    vols = [read_image(reference_dir / "inputs" / f) for f in ("ct_volume.npy", "ct_volume_b.npy")]
    qs = [s["prompt"].split("<image3d>\n", 1)[1].rsplit(" ASSISTANT:", 1)[0]
          for s in golden["inference_samples"]]
    expect = golden["batch2"]["padding_side_left"]["generated_ids"]
    static = Engine(model, proc, decode_mode="static")
    for v, q, e in zip(vols, qs, expect):
        assert static.answer(v, q, max_new_tokens=12).token_ids == e
    for eng in (Engine(model, proc), static):   # batch on the plain and the static path
        got = eng.answer_batch([Request(volume=v, question=q, max_new_tokens=12)
                                for v, q in zip(vols, qs)])
        assert [g.token_ids for g in got] == expect
    assert got[0].timings["decode_path"] == "batch2:static:static"


def test_warmup_runs_the_static_path_and_leaves_nothing_behind(toy):
    model, proc = toy
    eng = Engine(model, proc, decode_mode="static")
    assert eng.warmup() > 0
    assert len(eng.images) == 0 and not eng.sessions and eng.kv_bytes_used() == 0
    assert eng.fast_path.enabled and eng.fast_path.fallback_reason is None   # no fallback in warm-up
    # a follow-up was prefilled through the static cache too (on CUDA: its chunk graph is captured)
    assert any(slot.chunks for slot in eng.fast_path.decoder._slots.values())


def test_oom_in_a_batched_step_falls_back_to_one_by_one(toy):
    model, proc = toy
    state = {"calls": 0}

    def hook(stage):
        if stage == "decode":
            state["calls"] += 1
            if state["calls"] == 2:   # the second batched step
                raise RuntimeError("CUDA out of memory (simulated)")

    eng = Engine(model, proc, fault_hook=hook)
    streamed = [[], []]
    got = eng.answer_batch([Request(volume=_vol(30 + i), question=QUESTIONS[0], max_new_tokens=6,
                                    on_token=streamed[i].append) for i in range(2)])
    ref = Engine(model, proc)
    for i in range(2):
        want = ref.answer(_vol(30 + i), QUESTIONS[0], max_new_tokens=6)
        assert got[i].token_ids == want.token_ids
        assert "".join(streamed[i]) == want.text      # nothing streamed twice
        assert got[i].timings["decode_path"] == "plain"
