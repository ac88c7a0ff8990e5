"""A real worker on loopback (uvicorn in a thread, tiny model): every bad field is a 4xx in the
worker's own error shape before anything streams, boxes are checked by the one shared function,
closed sessions answer 410, stalled bodies 408, a refused body that is still arriving gets its
answer (lingering close, bounded), and the OpenAPI schema matches the client."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time

import numpy as np
import pytest

from medmvl_core.client import WorkerClient, errors
from medmvl_core.client.client import message_payload
from medmvl_core.client.protocol import ANSWER_FIELDS, GenerationSettings
from medmvl_core.client.protocol import BoxError, validate_box
from medmvl_core.engine import Engine
from medmvl_core.engine.testing import load_toy
from medmvl_core.worker.server import WorkerServer
from medmvl_core.worker.settings import WorkerSettings
from worker_helpers import send_raw

TOKEN = "validation-token-0123456789"
SHAPE = (8, 16, 16)


@pytest.fixture(scope="module")
def worker(reference_dir):
    engine = Engine(*load_toy(str(reference_dir / "base" / "llm")), max_new_tokens_limit=256)
    settings = WorkerSettings(token=TOKEN, max_upload_bytes=64 * 1024, max_new_tokens=256,
                              max_sessions=3, body_timeout_s=0.5, request_timeout_s=30)
    srv = WorkerServer(settings, engine=engine).start_in_thread()
    yield srv
    srv.stop()


@pytest.fixture()
def client(worker):
    return WorkerClient(worker.url, TOKEN, timeout=20)


@pytest.fixture()
def sid(client):
    arr = np.random.RandomState(0).randint(0, 100, size=SHAPE).astype(np.int16)
    return client.create_session(client.upload_volume(arr))


def _post(worker, path: str, body, headers: dict | None = None, token: str = TOKEN):
    """POST ``body`` (bytes, or an iterable of bytes: sent chunked) as ``http.client`` does: the
    whole body first, then the answer is read. GET when ``body`` is None."""
    conn = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=10)
    hdrs = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    hdrs.update(headers or {})
    conn.request("POST" if body is not None else "GET", path, body=body, headers=hdrs)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, resp.getheader("content-type"), json.loads(raw) if raw else None


@pytest.mark.parametrize("task,box", [
    ("describe", [0, 0, 0, 8, 16, 17]),      # past the last column
    ("describe", [0, 0, 0, 9, 16, 16]),      # past the last slice
    ("describe", [4, 2, 2, 2, 8, 8]),        # inverted on k
    ("describe", [-1, 0, 0, 4, 8, 8]),       # negative
    ("describe", [2, 2, 2, 2, 8, 8]),        # empty on k
    ("crop_ask", [0, 0, 0, 8, 16, 40]),
    ("ask", [0, 0, 0, 8, 16, 40]),           # ask about a region
    ("describe", [1, 2, 3, 4]),              # 2D box on a volume
])
def test_every_task_rejects_a_box_outside_or_inverted(worker, sid, task, box):
    body = json.dumps({"task": task, "question": "What is here?", "box": box}).encode()
    status, ctype, out = _post(worker, f"/v1/sessions/{sid}/messages", body)
    assert (status, out["error"]["code"]) == (400, "bad_box"), out
    assert ctype.startswith("application/json")      # refused before any stream started
    with pytest.raises(BoxError):                    # the same rule on the client side
        validate_box(box, SHAPE)


def test_a_box_inside_the_volume_is_answered(client, sid):
    assert validate_box([0, 0, 0, 8, 16, 16], SHAPE) == [0, 0, 0, 8, 16, 16]
    ans = client.ask(sid, task="describe", box=[2, 4, 4, 6, 12, 12], max_new_tokens=3)
    assert ans.num_tokens == 3 and "[" in ans.question   # the box is in the prompt


def test_2d_boxes_follow_the_same_rule():
    assert validate_box([0, 1, 10, 12], (1, 10, 12)) == [0.0, 1.0, 10.0, 12.0]
    assert validate_box([0, 0, 10, 12], (1, 10, 12, 3)) == [0.0, 0.0, 10.0, 12.0]
    for bad in ([0, 0, 11, 12], [5, 0, 4, 12], [0, 0, 10, float("nan")], [0, 0, 0, 1, 1, 1]):
        with pytest.raises(BoxError):
            validate_box(bad, (1, 10, 12))


@pytest.mark.parametrize("fields,status,code", [
    ({"seed": 2**70, "do_sample": True}, 422, "invalid_request"),          # was 500 (overflow)
    ({"seed": -1}, 422, "invalid_request"),
    ({"timeout_s": 0}, 422, "invalid_request"),                           # was "the default"
    ({"top_p": 0}, 422, "invalid_request"),                               # was an error event
    ({"top_k": -3}, 422, "invalid_request"),
    ({"do_sample": True, "temperature": 0}, 400, "bad_sampling"),         # was an error event
    ({"max_tokens": 5}, 422, "invalid_request"),                           # misspelt field
    ({"box": [0, 0, 0, 1, 1, 1, 1]}, 422, "invalid_request"),
])
def test_every_field_is_checked_before_streaming(worker, sid, fields, status, code):
    body = json.dumps({"question": "Is there a nodule?", **fields}).encode()
    got, ctype, out = _post(worker, f"/v1/sessions/{sid}/messages", body)
    assert (got, out["error"]["code"]) == (status, code), out
    assert ctype.startswith("application/json") and out["error"]["message"]


def test_non_finite_timeout_and_lone_surrogate_are_4xx(worker, sid):
    nan = b'{"question": "Is there a nodule?", "timeout_s": NaN}'          # was: no deadline
    status, _, out = _post(worker, f"/v1/sessions/{sid}/messages", nan)
    assert (status, out["error"]["code"]) == (422, "invalid_request"), out
    surrogate = b'{"question": "Is there a nodule? \\ud800"}'              # was 500 (tokenizer)
    status, _, out = _post(worker, f"/v1/sessions/{sid}/messages", surrogate)
    assert (status, out["error"]["code"]) == (422, "invalid_request"), out
    assert "unicode" in out["error"]["message"]


def test_framework_errors_use_the_worker_error_shape(worker, sid):
    status, _, out = _post(worker, f"/v1/sessions/{sid}/messages", b'{"question": "\xff\xfe"}')
    assert (status, out["error"]["code"]) == (400, "malformed_json"), out
    status, _, out = _post(worker, "/v1/nothing-here", b"{}")
    assert (status, out["error"]["code"]) == (404, "unknown_route") and "detail" not in out
    status, _, out = _post(worker, "/v1/health", b"{}")                    # POST on a GET route
    assert (status, out["error"]["code"]) == (405, "method_not_allowed")


def test_shape_overflow_and_absurd_spacing_are_4xx(worker, caplog):
    meta = {"dtype": "float64", "shape": [2**31, 2**31, 2**31], "spacing": [1, 1, 1],
            "origin": [0, 0, 0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    hdrs = {"Content-Type": "application/octet-stream", "X-MedMVL-Meta": json.dumps(meta)}
    with caplog.at_level(logging.ERROR):
        status, _, out = _post(worker, "/v1/volumes", b"\0" * 64, hdrs)
    assert (status, out["error"]["code"]) == (413, "too_large"), out
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]   # no traceback logged
    meta.update(shape=[2, 2, 2], dtype="int8", spacing=[1e300, 1, 1])
    hdrs["X-MedMVL-Meta"] = json.dumps(meta)
    status, _, out = _post(worker, "/v1/volumes", b"\0" * 8, hdrs)
    assert (status, out["error"]["code"]) == (400, "bad_geometry") and "spacing" in out["error"]["message"]


def test_evicted_session_answers_410_not_unknown(worker, client):
    arr = np.ones(SHAPE, np.int16)
    vid = client.upload_volume(arr)
    for s in list(worker.state.engine.sessions):
        worker.state.engine.delete_session(s)
    first = client.create_session(vid)
    for _ in range(3):                               # the cap is 3: the first one is closed
        client.create_session(vid)
    assert first not in worker.state.engine.sessions
    with pytest.raises(errors.SessionEvictedError) as info:
        client.ask(first, question="Is there a nodule?", max_new_tokens=2)
    assert (info.value.code, info.value.status) == ("session_evicted", 410)
    assert "start a new session" in str(info.value)
    with pytest.raises(errors.NotFoundError):       # never known: still 404
        client.ask("f" * 32, question="Is there a nodule?")
    assert client.health()["max_sessions"] == 3


def test_a_stalled_body_gets_408_and_is_closed(worker):
    head = (f"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode()
    t0 = time.monotonic()
    status, _, raw = send_raw(worker.port, head, [b'{"volume_id": '], read_timeout=10)
    assert time.monotonic() - t0 < 5
    assert (status, json.loads(raw)["error"]["code"]) == (408, "body_timeout")


def _meta_header(shape) -> dict:
    return {"Content-Type": "application/octet-stream", "X-MedMVL-Meta": json.dumps(
        {"dtype": "int16", "shape": list(shape), "spacing": [1, 1, 1], "origin": [0, 0, 0],
         "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]})}


MB = 1 << 20


@pytest.mark.parametrize("path,body,headers,status,code", [
    ("/v1/sessions", b"a" * 4 * MB, {}, 413, "too_large"),                      # JSON, Content-Length
    ("/v1/sessions", [b"a" * MB] * 4, {}, 413, "too_large"),                    # JSON, chunked
    ("/v1/volumes", b"\0" * 4 * MB, _meta_header((32, 256, 256)), 413, "too_large"),  # upload over the limit
    ("/v1/volumes", [b"\0" * MB] * 4, _meta_header(SHAPE), 400, "shape_mismatch"),   # chunked, past its shape
], ids=["json-length", "json-chunked", "upload-length", "upload-chunked"])
def test_a_refused_body_still_arriving_gets_its_answer(worker, path, body, headers, status, code):
    """The worker answers as soon as it refuses, while http.client is still sending 4 MB it will
    not read. Closing then would make the kernel reset the connection, discarding the answer
    (before the lingering close every one of these lost its answer to a reset); the worker
    reads and discards the rest first, so the client gets the refusal every time."""
    for _ in range(3):
        got, _, out = _post(worker, path, iter(body) if isinstance(body, list) else body, headers)
        assert (got, out["error"]["code"]) == (status, code), out


def test_lingering_close_is_bounded_in_time_and_bytes(worker, monkeypatch):
    """A client that stops sending (without closing) is closed after LINGER_S, its answer read at
    once; one that keeps sending is cut off after LINGER_BYTES, not read to the end of 64 MB."""
    from medmvl_core.worker import guard

    monkeypatch.setattr(guard, "LINGER_S", 1.0)
    monkeypatch.setattr(guard, "LINGER_BYTES", 1 * MB)
    hdrs = {"Authorization": f"Bearer {TOKEN}", **_meta_header((512, 256, 256)),
            "Content-Length": str(64 * MB)}
    head = ("POST /v1/volumes HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
            + "\r\n").encode()
    with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as sock:
        t0 = time.monotonic()
        sock.sendall(head + b"\0" * 1000)             # then nothing more
        answer = part = sock.recv(65536)
        while part and b"too_large" not in answer:
            answer += (part := sock.recv(65536))
        answered = time.monotonic() - t0
        while sock.recv(65536):                       # until the worker closes
            pass
        closed = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 413") and answered < 0.8, (answer[:40], answered)
    assert 0.9 < closed < 5, closed
    with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as sock:
        sent = 0
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            sock.sendall(head)
            for _ in range(64):
                sock.sendall(b"\0" * MB)
                sent += MB
    # the worker read about 1 MB; the rest is what the two sockets' buffers held
    assert sent < 32 * MB, sent


def test_openapi_schema_is_served_and_matches_the_client(worker):
    status, _, _ = _post(worker, "/v1/openapi.json", None, token="wrong")
    assert status == 401
    status, _, schema = _post(worker, "/v1/openapi.json", None)
    assert status == 200
    comps = schema["components"]["schemas"]
    sent = message_payload("describe", "q", [0, 0, 0, 1, 1, 1], timeout=5.0)
    assert set(sent) <= set(comps["MessageIn"]["properties"])          # all sent fields exist
    assert set(comps["FinalEvent"]["properties"]) == set(ANSWER_FIELDS)  # all read back
    assert set(comps["FinalEvent"]["required"]) == set(ANSWER_FIELDS)
    props = comps["MessageIn"]["properties"]  # every setting, with the protocol's default
    assert {n: props[n].get("default") for n in GenerationSettings.names()} == GenerationSettings().to_dict()
    assert comps["SessionIn"]["required"] == ["volume_id"]
    assert "session_id" in comps["SessionOut"]["properties"]
    assert "volume_id" in comps["VolumeOut"]["properties"]
    paths = schema["paths"]
    assert {"/v1/health", "/v1/volumes", "/v1/sessions", "/v1/sessions/{sid}/messages",
            "/v1/sessions/{sid}/cancel", "/v1/volumes/{vid}", "/v1/sessions/{sid}"} <= set(paths)
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_off_host_binding_without_tls_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="medmvl_core.worker.server"):
        srv = WorkerServer(WorkerSettings(token=TOKEN), host="0.0.0.0")
        srv.sock.close()
        quiet = WorkerServer(WorkerSettings(token=TOKEN), host="127.0.0.1")
        quiet.sock.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "without TLS" in warnings[0] and "0.0.0.0" in warnings[0]


def test_uploads_received_at_once_are_bounded(worker, client):
    st = worker.state.settings
    saved = (st.body_timeout_s, st.upload_buffer_bytes)
    st.body_timeout_s, st.upload_buffer_bytes = 20.0, 6000        # one 4096-byte body at a time
    arr = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    meta = {"dtype": "int16", "shape": list(SHAPE), "spacing": [1, 1, 1], "origin": [0, 0, 0],
            "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    body = arr.tobytes()
    head = (f"POST /v1/volumes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/octet-stream\r\nX-MedMVL-Meta: {json.dumps(meta)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", worker.port), timeout=20)
    try:
        sock.sendall(head + body[:100])                   # one upload in flight, half sent
        deadline = time.monotonic() + 10
        while worker.state.upload_bytes_in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(errors.QueueFullError) as info:
            client.upload_volume(np.zeros(SHAPE, np.int16))
        assert info.value.code == "uploads_busy" and info.value.retry_after == 2
        sock.sendall(body[100:])                           # the first one completes normally
        assert sock.recv(4096).split(b" ")[1] == b"200"
    finally:
        sock.close()
        st.body_timeout_s, st.upload_buffer_bytes = saved
    client.upload_volume(np.zeros(SHAPE, np.int16))        # and the next one is accepted
