"""Memory bounds of a real worker process (toy model, loopback): body limits enforced while
reading, uploads at ~1x their size, volumes freed when the store lets them go.

Each check reads the worker's own RSS (``/proc/PID/status``; the peak is reset first) and
allows a margin, so the tests do not depend on timing. Sizes stay at tens of MB.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from medmvl_core.client import WorkerLauncher, errors
from worker_helpers import peak_mb, reset_peak, rss_mb, send_raw, toy_checkpoint, toy_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc for the worker's memory")
MB = 1 << 20
UPLOAD_LIMIT_MB = 100


@pytest.fixture(scope="module")
def toy_worker(tmp_path_factory, reference_dir):
    d = tmp_path_factory.mktemp("memworker")
    launcher = WorkerLauncher(python=toy_python(d), checkpoint=toy_checkpoint(d / "ck", reference_dir),
                              device="cpu", start_timeout=120,
                              extra_args=["--max-upload-mb", str(UPLOAD_LIMIT_MB)])
    client = launcher.start()
    yield launcher, client
    launcher.close()


def _head(method: str, path: str, token: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {token}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _chunked(pieces):
    for p in pieces:
        yield f"{len(p):x}\r\n".encode() + bytes(p) + b"\r\n"
    yield b"0\r\n\r\n"


def _measure(pid: int, fn):
    """Run ``fn()``; return (its result, growth of the peak RSS in MB, RSS after in MB)."""
    if not reset_peak(pid):
        pytest.skip("this kernel does not let us reset the peak RSS (/proc/PID/clear_refs)")
    base = rss_mb(pid)
    out = fn()
    return out, peak_mb(pid) - base, rss_mb(pid)


def _meta(shape, dtype="int16") -> str:
    return json.dumps({"dtype": dtype, "shape": list(shape), "spacing": [1, 1, 1],
                       "origin": [0, 0, 0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]})


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_json_body_over_the_limit_is_refused_before_it_is_read(toy_worker, chunked):
    launcher, client = toy_worker
    pid, port = launcher.process.pid, client._port
    size = 48 * MB
    body = [b'{"volume_id": "'] + [b"a" * MB] * 48 + [b'"}']
    hdrs = {"Content-Type": "application/json"}
    if chunked:
        hdrs["Transfer-Encoding"] = "chunked"
        chunks = _chunked(body)
    else:
        hdrs["Content-Length"] = str(sum(len(b) for b in body))
        chunks = iter(body)
    (status, _h, raw), growth, _ = _measure(pid, lambda: send_raw(
        port, _head("POST", "/v1/sessions", client.token, hdrs), chunks))
    print(f"json body {size // MB} MB ({'chunked' if chunked else 'content-length'}): "
          f"HTTP {status}, worker peak RSS +{growth:.1f} MB")
    assert status == 413 and json.loads(raw)["error"]["code"] == "too_large"
    assert growth < 16, f"the worker's peak RSS grew by {growth:.0f} MB for a refused body"
    assert client.health()["status"] == "ready"


def test_upload_peaks_near_one_times_its_size_and_delete_frees_it(toy_worker):
    launcher, client = toy_worker
    pid = launcher.process.pid
    arr = np.arange(64 * MB // 2, dtype=np.int16).reshape(64, 512, 1024)   # 64 MB
    vid, growth, after = _measure(pid, lambda: client.upload_volume(arr))
    print(f"upload 64 MB: worker peak RSS +{growth:.1f} MB")
    assert 56 < growth < 64 * 1.3, f"peak RSS grew {growth:.0f} MB for a 64 MB upload"
    sid = client.create_session(vid)
    client.delete_volume(vid)
    freed = after - rss_mb(pid)
    print(f"delete of a 64 MB volume with a session open: RSS -{freed:.1f} MB")
    assert freed > 48, f"only {freed:.0f} MB came back after the volume was deleted"
    with pytest.raises(errors.SessionEvictedError) as info:
        client.ask(sid, question="Is there a nodule?", max_new_tokens=2)
    assert info.value.code == "volume_evicted" and info.value.status == 410


def test_chunked_upload_past_its_declared_size_or_the_limit_stops_early(toy_worker):
    launcher, client = toy_worker
    pid, port = launcher.process.pid, client._port
    piece = b"\0" * MB
    # declares 8 MB, then keeps sending: refused once the 8 MB are passed
    hdrs = {"Content-Type": "application/octet-stream", "Transfer-Encoding": "chunked",
            "X-MedMVL-Meta": _meta((8, 512, 1024))}
    (status, _h, raw), growth, _ = _measure(pid, lambda: send_raw(
        port, _head("POST", "/v1/volumes", client.token, hdrs), _chunked([piece] * 64)))
    print(f"chunked upload declaring 8 MB, sending 64 MB: HTTP {status}, peak RSS +{growth:.1f} MB")
    assert (status, json.loads(raw)["error"]["code"]) == (400, "shape_mismatch")
    assert growth < 8 + 8
    # declares more than the limit: refused before a byte of the body is read
    big = (UPLOAD_LIMIT_MB + 28, 512, 1024)
    hdrs["X-MedMVL-Meta"] = _meta(big)
    (status, _h, raw), growth, _ = _measure(pid, lambda: send_raw(
        port, _head("POST", "/v1/volumes", client.token, hdrs), _chunked([piece] * 256)))
    print(f"chunked upload declaring {big[0]} MB over a {UPLOAD_LIMIT_MB} MB limit: "
          f"HTTP {status}, peak RSS +{growth:.1f} MB")
    assert (status, json.loads(raw)["error"]["code"]) == (413, "too_large")
    assert growth < 8
    assert client.health()["status"] == "ready"
