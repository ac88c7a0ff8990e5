"""The Slicer-free client: no torch, SSE parsing, typed errors, unreachable workers."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time

import pytest

from medmvl_core.client import WorkerClient, errors
from medmvl_core.client.sse import format_sse, iter_sse


def test_client_imports_without_torch():
    code = ("import sys, medmvl_core.client; "
            "bad = [m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_sse_parser_handles_names_comments_and_multiline_data():
    raw = (b": keep-alive\n\n"
           b"event: token\ndata: {\"text\": \"a\"}\n\n"
           b"event: final\r\ndata: {\"text\":\r\ndata: \"ab\"}\r\n\r\n"
           b"data: [1, 2]\n\n")
    events = list(iter_sse(io.BytesIO(raw)))
    assert [(e.event, e.data) for e in events] == [("token", {"text": "a"}),
                                                   ("final", {"text": "ab"}),
                                                   ("message", [1, 2])]
    assert list(iter_sse(io.BytesIO(format_sse("x", {"k": "é"}))))[0].data == {"k": "é"}


@pytest.mark.parametrize("status,code,cls", [
    (401, "unauthorized", errors.AuthError), (404, "unknown_session", errors.NotFoundError),
    (429, "queue_full", errors.QueueFullError), (409, "session_busy", errors.ConflictError),
    (413, "too_large", errors.PayloadTooLargeError), (400, "bad_dtype", errors.BadRequestError),
    (503, "out_of_memory", errors.WorkerOutOfMemoryError), (499, "cancelled", errors.CancelledError),
    (504, None, errors.WorkerTimeoutError), (500, None, errors.ServerError),
])
def test_error_codes_map_to_typed_exceptions(status, code, cls):
    err = errors.error_from_response(status, code, "what happened")
    assert type(err) is cls and err.status == status and str(err) == "what happened"


def test_bad_url_is_rejected():
    with pytest.raises(errors.WorkerError, match="bad worker URL"):
        WorkerClient("127.0.0.1:80", "t")


def test_unreachable_worker_raises_unavailable_after_retries():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = WorkerClient(f"http://127.0.0.1:{port}", "t", timeout=2, retries=2, retry_delay=0.05)
    t0 = time.monotonic()
    with pytest.raises(errors.WorkerUnavailableError, match="cannot reach the worker"):
        c.health()
    assert time.monotonic() - t0 < 5


def test_silent_server_times_out():
    with socket.socket() as srv:  # accepts connections but never answers
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        c = WorkerClient(f"http://127.0.0.1:{srv.getsockname()[1]}", "t", timeout=0.5, retries=0)
        with pytest.raises(errors.WorkerTimeoutError):
            c.health()


def test_unknown_task_is_refused_before_sending():
    c = WorkerClient("http://127.0.0.1:9", "t")
    with pytest.raises(errors.BadRequestError, match="unknown task"):
        c.ask("sid", task="segment")
