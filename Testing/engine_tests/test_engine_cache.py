"""Engine: caches, session KV reuse == recomputation, decoding vs transformers, cancel, OOM."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from medmvl_core.client.protocol import GenerationSettings
from medmvl_core.engine import Engine
from medmvl_core.engine.cache import LRUCache
from medmvl_core.engine.decode import choose_token
from medmvl_core.engine.errors import (CancelledError, EngineOutOfMemoryError, RequestError,
                                       RequestTimeoutError)
from medmvl_core.engine.hashing import content_hash, geometry_dict, volume_hash
from medmvl_core.engine.testing import ToyVolume, load_toy

QUESTIONS = ["Is there a nodule?", "Where is it located?", "How large is it?"]


@pytest.fixture(scope="module")
def toy(reference_dir):
    model, proc = load_toy(str(reference_dir / "base" / "llm"))
    return model, proc


@pytest.fixture()
def volume():
    return ToyVolume(np.random.RandomState(0).randn(8, 16, 16).astype(np.float32),
                     spacing=(0.7, 0.7, 2.5), origin=(-100.0, -120.0, 30.0))


def test_lru_cache_evicts_least_recently_used():
    c = LRUCache(10, sizeof=len)
    assert c.put("a", "xxxx") and c.put("b", "xxxx")
    assert c.get("a") == "xxxx"          # a is now most recent
    assert c.put("c", "xxxx")            # evicts b
    assert "b" not in c and "a" in c and "c" in c
    assert c.used_bytes == 8 and c.evictions == 1
    assert not c.put("big", "x" * 11)    # larger than the whole budget: refused
    assert c.pop("a") == "xxxx" and c.used_bytes == 4


def test_content_hash_depends_on_bytes_and_geometry():
    a = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    g = geometry_dict((1, 1, 1), (0, 0, 0), np.eye(3), "CT")
    h = content_hash(a, g)
    assert h == content_hash(a.copy(), g)
    assert h == content_hash(a.astype(">i2"), g)  # byte order does not change identity
    b = a.copy()
    b[0, 0, 0] = 99
    assert content_hash(b, g) != h
    assert content_hash(a, geometry_dict((1, 1, 2), (0, 0, 0), np.eye(3), "CT")) != h
    assert content_hash(a.reshape(2, 4, 3), g) != h


def test_top_p_sampling_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(choose_token(logits, GenerationSettings(do_sample=True, top_p=0.8), gen)[0])
             for _ in range(200)}
    assert draws == {0, 1}
    assert int(choose_token(logits, GenerationSettings())[0]) == 0


def test_first_turn_matches_transformers_generate(toy, volume):
    model, proc = toy
    eng = Engine(model, proc)
    ans = eng.answer(volume, QUESTIONS[0], max_new_tokens=12)
    ids = eng.encode_prompt(eng.conversation([], QUESTIONS[0]))
    assert ids.count(-201) == 8
    # reference: transformers' own greedy generate over the same embeddings
    tensor, _ = proc.preprocess_volume(volume)
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = model.generate(x, torch.ones_like(x), images3d=torch.from_numpy(tensor)[None],
                             max_new_tokens=12, do_sample=False,
                             pad_token_id=proc.tokenizer.pad_token_id,
                             eos_token_id=proc.tokenizer.eos_token_id)
    assert ans.token_ids == ref[0].tolist()
    assert ans.text == proc.tokenizer.decode(ref[0], skip_special_tokens=True)


def test_follow_ups_reuse_the_kv_cache_and_equal_recomputation(toy, volume):
    model, proc = toy
    eng = Engine(model, proc)
    ref = Engine(model, proc, use_cache=False)
    s = eng.create_session(volume)
    for i, q in enumerate(QUESTIONS):
        pieces: list[str] = []
        ans = eng.answer(question=q, session=s, max_new_tokens=10, on_token=pieces.append)
        assert "".join(pieces) == ans.text
        # reference: a fresh session with the same history, everything recomputed
        rs = ref.create_session(volume)
        rs.turns = list(s.turns[:-1])
        expect = ref.answer(question=q, session=rs, max_new_tokens=10)
        assert ans.token_ids == expect.token_ids, f"turn {i}"
        if i == 0:
            assert ans.timings["cached_tokens"] == 0
        else:
            # only the new tokens were prefilled
            assert ans.timings["cached_tokens"] > 8
            assert ans.timings["prefill_tokens"] < expect.timings["prefill_tokens"] / 2
            assert ans.timings["encode_s"] < 1e-3
    # the multi-turn prompt is MedM-VL's: history then the new question
    prompt = proc.prompt(eng.conversation(s.turns[:-1], QUESTIONS[-1]))
    assert prompt.count("<image3d>") == 1 and prompt.endswith(f"USER: {QUESTIONS[-1]} ASSISTANT:")


def test_kv_budget_eviction_keeps_answers_correct(toy, volume):
    model, proc = toy
    eng = Engine(model, proc, kv_cache_bytes=1)  # nothing fits: every turn recomputes
    s = eng.create_session(volume)
    a1 = eng.answer(question=QUESTIONS[0], session=s, max_new_tokens=6)
    assert s.past is None and eng.kv_bytes_used() == 0
    a2 = eng.answer(question=QUESTIONS[1], session=s, max_new_tokens=6)
    assert a2.timings["cached_tokens"] == 0
    full = Engine(model, proc)
    s2 = full.create_session(volume)
    assert full.answer(question=QUESTIONS[0], session=s2, max_new_tokens=6).token_ids == a1.token_ids
    assert full.answer(question=QUESTIONS[1], session=s2, max_new_tokens=6).token_ids == a2.token_ids


def test_cancel_stops_within_one_step_and_session_recovers(toy, volume):
    model, proc = toy
    eng = Engine(model, proc)
    s = eng.create_session(volume)
    cancel = threading.Event()
    steps = []

    def on_token(_piece):
        steps.append(1)
        if len(steps) == 3:
            cancel.set()

    with pytest.raises(CancelledError):
        eng.answer(question=QUESTIONS[0], session=s, max_new_tokens=50, on_token=on_token,
                   cancel=cancel)
    assert len(steps) == 3 and s.turns == []
    ok = eng.answer(question=QUESTIONS[0], session=s, max_new_tokens=6)
    ref = Engine(model, proc, use_cache=False).answer(volume, QUESTIONS[0], max_new_tokens=6)
    assert ok.token_ids == ref.token_ids


def test_deadline_and_validation_errors(toy, volume):
    model, proc = toy
    eng = Engine(model, proc)
    with pytest.raises(RequestTimeoutError):
        eng.answer(volume, QUESTIONS[0], deadline=0.0)
    # the protocol's task / settings errors arrive as RequestError with the worker's codes
    for kwargs, match, code in [
            (dict(question=QUESTIONS[0], max_new_tokens=0), "max_new_tokens", "bad_max_new_tokens"),
            (dict(question=QUESTIONS[0], max_new_tokens=4096), "in 1..2048", "bad_max_new_tokens"),
            (dict(question=QUESTIONS[0], do_sample=True, temperature=0.0), "temperature",
             "bad_sampling"),
            (dict(question=QUESTIONS[0], top_q=0.5), "unknown generation setting", "unknown_setting"),
            (dict(question="  "), "non-empty question", "empty_question"),
            (dict(question="x", task="segment"), "unknown task", "bad_task"),
            (dict(question=None, task="describe"), "needs a box", "bad_box"),
            (dict(question="x", task="crop_ask", box=[0, 0, 0, 1]), "6 numbers", "bad_box")]:
        with pytest.raises(RequestError, match=match) as info:
            eng.answer(volume, **kwargs)
        assert info.value.code == code, kwargs


def test_generation_settings_pass_through(toy, volume):
    """The protocol's settings object is what the engine decodes with; keywords apply on top
    and the caller's object is not changed (the context cap is the answer's own copy)."""
    model, proc = toy
    eng = Engine(model, proc, use_cache=False)
    g = GenerationSettings(max_new_tokens=5, do_sample=True, temperature=0.8, top_k=4, seed=11)
    a = eng.answer(volume, QUESTIONS[0], generation=g)
    b = eng.answer(volume, QUESTIONS[0], max_new_tokens=5, do_sample=True, temperature=0.8,
                   top_k=4, seed=11)
    assert a.token_ids == b.token_ids and len(a.token_ids) <= 5
    greedy = eng.answer(volume, QUESTIONS[0], max_new_tokens=5).token_ids
    assert eng.answer(volume, QUESTIONS[0], generation=g, do_sample=False).token_ids == greedy
    assert len(eng.answer(volume, QUESTIONS[0], generation=g, max_new_tokens=2).token_ids) <= 2
    assert g == GenerationSettings(max_new_tokens=5, do_sample=True, temperature=0.8, top_k=4,
                                   seed=11)


def test_simulated_oom_fails_that_request_only(toy, volume):
    model, proc = toy
    fail = {"on": True}

    def hook(stage):
        if stage == "prefill" and fail["on"]:
            fail["on"] = False
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    eng = Engine(model, proc, fault_hook=hook)
    s = eng.create_session(volume)
    with pytest.raises(EngineOutOfMemoryError, match="out of memory"):
        eng.answer(question=QUESTIONS[0], session=s, max_new_tokens=4)
    # The session goes on as if the failed question had never been asked: the same answers, turn
    # for turn (the second one sees the history), as a run without the fault.
    got = [eng.answer(question=q, session=s, max_new_tokens=4) for q in QUESTIONS[:2]]
    ref = Engine(model, proc)
    rs = ref.create_session(volume)
    want = [ref.answer(question=q, session=rs, max_new_tokens=4) for q in QUESTIONS[:2]]
    assert [(a.text, a.token_ids, a.question) for a in got] == \
        [(a.text, a.token_ids, a.question) for a in want]
    assert len(s.turns) == len(rs.turns) == 2


def test_tasks_build_the_expected_prompts_and_boxes(toy, volume):
    model, proc = toy
    eng = Engine(model, proc)
    rep = eng.answer(volume, None, task="report", max_new_tokens=2)
    assert rep.question == "Generate radiology report for the CT."
    desc = eng.answer(volume, None, task="describe", box=[2, 4, 8, 6, 12, 16], max_new_tokens=2)
    # voxel (k, j, i) box / shape (8, 16, 16) -> model box in array order, 3 decimals
    assert desc.question == "What is in the region [0.250, 0.250, 0.500, 0.750, 0.750, 1.000]? Describe it."
    find = eng.answer(volume, "nodule", task="find", max_new_tokens=2)
    assert "nodule" in find.question and "bounding box" in find.question
    crop = eng.answer(volume, "What is this?", task="crop_ask", box=[0, 0, 0, 4, 8, 8],
                      max_new_tokens=2)
    assert crop.question == "What is this?"
    assert len(eng.images) == 2  # full image and the crop are cached separately


def test_box_in_answer_maps_to_voxels_and_lps(toy, volume):
    from medmvl_core.engine import tasks as T
    _, proc = toy
    _, geom = proc.preprocess_volume(volume)
    boxes = T.find_model_boxes("It is at [0.250, 0.500, 0.500, 0.750, 1.000, 1.000].", "image3d")
    assert boxes == [[0.25, 0.5, 0.5, 0.75, 1.0, 1.0]]
    m = T.map_box(boxes[0], geom, volume, "image3d")
    assert m["voxel"] == [2.0, 8.0, 8.0, 6.0, 16.0, 16.0]
    # LPS = origin + spacing * (i, j, k) with identity direction
    assert m["physical_lps"] == pytest.approx([-100 + 0.7 * 8, -120 + 0.7 * 8, 30 + 2.5 * 2,
                                               -100 + 0.7 * 16, -120 + 0.7 * 16, 30 + 2.5 * 6])
    assert volume_hash(volume) == volume_hash(ToyVolume(volume.array.copy(), volume.spacing,
                                                        volume.origin))


def test_one_off_answers_and_deleted_sessions_keep_no_cache(toy, volume):
    model, proc = toy
    eng = Engine(model, proc)
    eng.answer(volume, QUESTIONS[0], max_new_tokens=3)
    assert eng.kv_bytes_used() == 0
    s = eng.create_session(volume)
    eng.answer(question=QUESTIONS[0], session=s, max_new_tokens=3)
    assert eng.kv_bytes_used() > 0 and s.kv_bytes == eng.kv_bytes_used()
    eng.delete_session(s.id)
    assert eng.kv_bytes_used() == 0 and s.past is None


def test_idle_sessions_are_evicted_oldest_first(toy, volume):
    model, proc = toy
    eng = Engine(model, proc)
    a, b, c = (eng.create_session(volume) for _ in range(3))
    eng.answer(question=QUESTIONS[0], session=a, max_new_tokens=2)   # a is now the most recent
    assert eng.evict_idle_sessions(keep=1) == 2
    assert list(eng.sessions) == [a.id]


def test_context_limit_clamps_the_answer_then_refuses(toy, volume):
    model, proc = toy
    eng = Engine(model, proc)
    n = len(eng.encode_prompt(eng.conversation([], QUESTIONS[0])))
    eng.context_limit = n + 3
    ans = eng.answer(volume, QUESTIONS[0], max_new_tokens=50)
    assert len(ans.token_ids) <= 3
    eng.context_limit = n
    with pytest.raises(RequestError, match="start a new session"):
        eng.answer(volume, QUESTIONS[0])


def test_sampling_is_opt_in_and_seeded(toy, volume):
    model, proc = toy
    eng = Engine(model, proc)
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5)
    a = eng.answer(volume, QUESTIONS[0], seed=1, **kw).token_ids
    assert eng.answer(volume, QUESTIONS[0], seed=1, **kw).token_ids == a
    others = {tuple(eng.answer(volume, QUESTIONS[0], seed=s, **kw).token_ids) for s in range(2, 6)}
    assert len(others | {tuple(a)}) > 1          # different seeds give different answers
    greedy = eng.answer(volume, QUESTIONS[0], max_new_tokens=12).token_ids
    assert greedy == eng.answer(volume, QUESTIONS[0], max_new_tokens=12).token_ids


def test_engine_refuses_the_tasks_the_protocol_says_need_a_box(toy, volume):
    """A task the protocol's table says needs a box is refused without one, before anything is
    preprocessed (the others are answered without a box above)."""
    from medmvl_core.client.protocol import TASK_SPECS

    eng = Engine(*toy)
    needing = [spec.name for spec in TASK_SPECS.values() if spec.needs_box]
    assert needing == ["describe", "crop_ask"]
    for task in needing:
        with pytest.raises(RequestError, match="needs a box") as info:
            eng.answer(volume, "nodule", task=task, max_new_tokens=1)
        assert info.value.code == "bad_box"
    assert len(eng.images) == 0
