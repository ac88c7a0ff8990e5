"""A real worker on loopback (uvicorn in a thread, tiny model): bad input, cancel, concurrency,
queue bound, simulated OOM. One worker for the whole module."""

from __future__ import annotations

import http.client
import json
import threading
import time

import numpy as np
import pytest
import torch

from medmvl_core.client import WorkerClient, errors
from medmvl_core.engine import Engine
from medmvl_core.engine.testing import ToyVolume, load_toy
from medmvl_core.worker.server import WorkerServer
from medmvl_core.worker.settings import WorkerSettings
from streaming_helpers import ask_in_background, wait_for_pieces

TOKEN = "test-token-0123456789abcdef"
HOOK = {"delay": 0.0, "oom": False}


def _hook(stage: str) -> None:
    if stage == "decode" and HOOK["delay"]:
        time.sleep(HOOK["delay"])
    if stage == "prefill" and HOOK["oom"]:
        HOOK["oom"] = False
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")


@pytest.fixture(scope="module")
def toy(reference_dir):
    return load_toy(str(reference_dir / "base" / "llm"))


@pytest.fixture(scope="module")
def worker(toy):
    model, proc = toy
    engine = Engine(model, proc, fault_hook=_hook, max_new_tokens_limit=64)
    settings = WorkerSettings(token=TOKEN, max_queue=16, max_upload_bytes=64 * 1024,
                              max_question_chars=200, max_new_tokens=64, request_timeout_s=30)
    srv = WorkerServer(settings, engine=engine).start_in_thread()
    yield srv
    srv.stop()


@pytest.fixture()
def client(worker):
    HOOK.update(delay=0.0, oom=False)
    worker.state.queue.max_waiting = 16
    return WorkerClient(worker.url, TOKEN, timeout=20)


def _vol(seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(-1000, 1000, size=(8, 16, 16)).astype(np.int16)


def _raw(worker, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=10)
    hdrs = {"Authorization": f"Bearer {TOKEN}"}
    hdrs.update(headers or {})
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else None


def _expected(toy, arr, questions, n):
    """What a fresh, uncached engine answers (re-preprocess, re-encode, re-prefill)."""
    model, proc = toy
    ref = Engine(model, proc, use_cache=False)
    s = ref.create_session(ToyVolume(arr))
    return [ref.answer(question=q, session=s, max_new_tokens=n).text for q in questions]


def test_every_bad_input_gets_a_4xx_and_the_worker_stays_healthy(worker, client, toy):
    arr = _vol(1)
    meta = {"dtype": "int16", "shape": [8, 16, 16], "spacing": [1, 1, 1], "origin": [0, 0, 0],
            "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1], "modality": "CT"}
    vid = client.upload_volume(arr)
    sid = client.create_session(vid)
    hdr = lambda m: {"X-MedMVL-Meta": json.dumps(m), "Content-Type": "application/octet-stream"}
    nan = np.zeros((8, 16, 16), np.float32)
    nan[1, 2, 3] = np.nan
    cases = [
        # (method, path, body, headers, status, code)
        ("POST", "/v1/sessions", b"{not json", {"Content-Type": "application/json"}, 400, "malformed_json"),
        ("POST", "/v1/volumes", arr.tobytes(), hdr({**meta, "dtype": "complex64"}), 400, "bad_dtype"),
        ("POST", "/v1/volumes", arr.tobytes(), hdr({**meta, "shape": [8, 16, 15]}), 400, "shape_mismatch"),
        ("POST", "/v1/volumes", arr.tobytes(), hdr({**meta, "spacing": [1, 0, 1]}), 400, "bad_geometry"),
        ("POST", "/v1/volumes", arr.tobytes(), hdr({**meta, "direction": [0] * 9}), 400, "bad_geometry"),
        ("POST", "/v1/volumes", arr.tobytes(), {"Content-Type": "application/octet-stream"}, 400, "missing_meta"),
        ("POST", "/v1/volumes", nan.tobytes(), hdr({**meta, "dtype": "float32"}), 400, "non_finite"),
        ("POST", "/v1/volumes", np.zeros((64, 64, 64), np.int16).tobytes(),
         hdr({**meta, "shape": [64, 64, 64]}), 413, "too_large"),
        ("POST", f"/v1/sessions/{sid}/messages", json.dumps({"question": ""}).encode(),
         {"Content-Type": "application/json"}, 400, "empty_question"),
        ("POST", f"/v1/sessions/{sid}/messages", json.dumps({"question": "x" * 201}).encode(),
         {"Content-Type": "application/json"}, 400, "question_too_long"),
        ("POST", f"/v1/sessions/{sid}/messages", json.dumps({"question": "x", "max_new_tokens": 10**6}).encode(),
         {"Content-Type": "application/json"}, 400, "bad_max_new_tokens"),
        ("POST", f"/v1/sessions/{sid}/messages", json.dumps({"question": "x", "task": "segment"}).encode(),
         {"Content-Type": "application/json"}, 400, "bad_task"),
        ("POST", f"/v1/sessions/{sid}/messages", json.dumps({"question": 5}).encode(),
         {"Content-Type": "application/json"}, 422, "invalid_request"),
        ("POST", "/v1/sessions/nope/messages", json.dumps({"question": "x"}).encode(),
         {"Content-Type": "application/json"}, 404, "unknown_session"),
        ("POST", "/v1/sessions", json.dumps({"volume_id": "0" * 32}).encode(),
         {"Content-Type": "application/json"}, 404, "unknown_volume"),
        ("GET", "/v1/health", b"", {"Authorization": "Bearer wrong"}, 401, "unauthorized"),
        ("GET", "/v1/health", b"", {"Authorization": ""}, 401, "unauthorized"),
    ]
    for method, path, body, headers, status, code in cases:
        got_status, got = _raw(worker, method, path, body, headers)
        assert (got_status, got["error"]["code"]) == (status, code), (path, code, got)
        assert got["error"]["message"]
        assert client.health()["status"] == "ready"
    # the typed client errors
    with pytest.raises(errors.AuthError):
        WorkerClient(worker.url, "wrong").health()
    with pytest.raises(errors.NotFoundError):
        client.create_session("f" * 32)
    with pytest.raises(errors.BadRequestError):
        client.ask(sid, task="describe", box=[1, 2, 3])
    # and a normal question is answered correctly afterwards
    ans = client.ask(sid, question="Is there a nodule?", max_new_tokens=8)
    assert ans.text == _expected(toy, arr, ["Is there a nodule?"], 8)[0]


def test_upload_is_idempotent_and_content_addressed(client):
    arr = _vol(2)
    a = client.upload_volume(arr, spacing=(0.5, 0.5, 2))
    assert client.upload_volume(arr.copy(), spacing=(0.5, 0.5, 2)) == a
    assert client.upload_volume(arr, spacing=(0.5, 0.5, 3)) != a


def test_cancel_mid_answer_returns_promptly_and_next_request_is_served(client, toy):
    arr = _vol(3)
    sid = client.create_session(client.upload_volume(arr))
    HOOK["delay"] = 0.05
    t, pieces, result = ask_in_background(client, sid, question="Describe the lungs.",
                                          max_new_tokens=64)
    wait_for_pieces(pieces, 2, timeout=30)
    assert len(pieces) >= 2, "the answer did not stream"
    t0 = time.monotonic()
    assert client.cancel(sid)
    t.join(5)
    assert time.monotonic() - t0 < 1.0
    assert isinstance(result.get("exc"), errors.CancelledError)
    HOOK["delay"] = 0.0
    ans = client.ask(sid, question="Is there a nodule?", max_new_tokens=6)
    assert ans.text == _expected(toy, arr, ["Is there a nodule?"], 6)[0]


def test_eight_concurrent_clients_all_answered_correctly(worker, toy):
    questions = ["Is there a nodule?", "Where is it?", "How large is it?"]
    results: dict[int, list[str]] = {}
    failures: list[BaseException] = []

    def user(i: int) -> None:
        try:
            c = WorkerClient(worker.url, TOKEN, timeout=60)
            sid = c.create_session(c.upload_volume(_vol(100 + i)))
            results[i] = [c.ask(sid, question=q, max_new_tokens=6).text for q in questions]
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    for i in range(8):
        assert results[i] == _expected(toy, _vol(100 + i), questions, 6), i


def test_queue_bound_gives_429(worker, client):
    worker.state.queue.max_waiting = 1
    HOOK["delay"] = 0.05
    sids = [client.create_session(client.upload_volume(_vol(200 + i))) for i in range(3)]
    outcome: dict[int, BaseException | str] = {}

    def ask(i):
        try:
            outcome[i] = client.ask(sids[i], question="Describe it.", max_new_tokens=60).text
        except errors.WorkerError as exc:
            outcome[i] = exc

    t0 = threading.Thread(target=ask, args=(0,))
    t0.start()
    while not client.health()["busy"]:
        time.sleep(0.01)
    t1 = threading.Thread(target=ask, args=(1,))
    t1.start()
    while client.health()["queue_waiting"] < 1:
        time.sleep(0.01)
    with pytest.raises(errors.QueueFullError) as info:
        client.ask(sids[2], question="Describe it.", max_new_tokens=4)
    assert info.value.retry_after == 2            # the worker's Retry-After header
    client.cancel(sids[0])
    client.cancel(sids[1])
    t0.join(10)
    t1.join(10)
    assert all(isinstance(outcome[i], errors.CancelledError) for i in (0, 1)), outcome


def test_simulated_oom_fails_one_request_only(client, toy):
    arr = _vol(4)
    sid = client.create_session(client.upload_volume(arr))
    HOOK["oom"] = True
    with pytest.raises(errors.WorkerOutOfMemoryError):
        client.ask(sid, question="Is there a nodule?", max_new_tokens=6)
    assert client.health()["status"] == "ready"
    ans = client.ask(sid, question="Is there a nodule?", max_new_tokens=6)
    assert ans.text == _expected(toy, arr, ["Is there a nodule?"], 6)[0]


def test_same_session_twice_at_once_is_409(client):
    sid = client.create_session(client.upload_volume(_vol(5)))
    HOOK["delay"] = 0.05
    done = {}
    t = threading.Thread(target=lambda: done.setdefault(
        "r", pytest.raises(errors.CancelledError, client.ask, sid, question="a", max_new_tokens=60)))
    t.start()
    while not client.health()["busy"]:
        time.sleep(0.01)
    with pytest.raises(errors.ConflictError):
        client.ask(sid, question="b", max_new_tokens=4)
    client.cancel(sid)
    t.join(10)


def test_delete_session_then_unknown(client):
    sid = client.create_session(client.upload_volume(_vol(6)))
    client.delete_session(sid)
    with pytest.raises(errors.NotFoundError):
        client.ask(sid, question="x")


def test_request_time_limit_gives_a_timeout_and_frees_the_queue(client):
    sid = client.create_session(client.upload_volume(_vol(7)))
    HOOK["delay"] = 0.05
    t0 = time.monotonic()
    with pytest.raises(errors.WorkerTimeoutError):
        client.ask(sid, question="Describe it.", max_new_tokens=60, timeout=0.3)
    assert time.monotonic() - t0 < 2.0
    HOOK["delay"] = 0.0
    assert client.ask(sid, question="Is there a nodule?", max_new_tokens=2).num_tokens == 2


def test_no_prompt_or_answer_in_logs_above_debug(client, caplog):
    import logging
    marker = "Zebra-marker-question"
    with caplog.at_level(logging.INFO):
        sid = client.create_session(client.upload_volume(_vol(8)))
        ans = client.ask(sid, question=marker, max_new_tokens=4)
        with pytest.raises(errors.BadRequestError):
            client.ask(sid, task="describe", question=marker, box=[1, 2])
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not any(marker in m or (ans.text.strip() and ans.text.strip() in m) for m in info), info


def test_questions_waiting_together_share_decode_steps(client, toy):
    HOOK["delay"] = 0.05
    arrs = [_vol(300 + i) for i in range(3)]
    sids = [client.create_session(client.upload_volume(a)) for a in arrs]
    out: dict[int, object] = {}

    def ask(i, n):
        out[i] = client.ask(sids[i], question="Is there a nodule?", max_new_tokens=n)

    first = threading.Thread(target=ask, args=(0, 20))
    first.start()
    while not client.health()["busy"]:
        time.sleep(0.01)
    rest = [threading.Thread(target=ask, args=(i, 5)) for i in (1, 2)]
    for t in rest:
        t.start()
    while client.health()["queue_waiting"] < 2:
        time.sleep(0.01)
    for t in [first, *rest]:
        t.join(30)
    assert out[0].timings["decode_path"] == "plain"
    for i in (1, 2):
        assert out[i].timings["decode_path"] == "batch2"
        assert out[i].text == _expected(toy, arrs[i], ["Is there a nodule?"], 5)[0]
