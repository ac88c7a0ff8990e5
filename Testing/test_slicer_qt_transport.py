"""The Slicer panel's transport (``medmvl_core.client.qt_transport``): Qt networking, no Python
threads, tested in an event loop whose main thread holds the GIL between events
(``qt_gil_harness.py``) against a worker stand-in in its own process (``fake_worker_server.py``).
The same loop drives the in-Slicer self-test against a real worker: test_slicer_selftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("qtpy.QtNetwork", reason="the viewer extra (qtpy + PySide6) is needed")
import PySide6  # noqa: E402

TESTING = Path(__file__).resolve().parent
REPO = TESTING.parent
TOKEN = "s3cret"
HAS_QTCORE_SO = (Path(PySide6.__file__).parent / "Qt" / "lib" / "libQt6Core.so.6").is_file()


@pytest.fixture(scope="module")
def fake_worker():
    proc = subprocess.Popen([sys.executable, str(TESTING / "fake_worker_server.py"), TOKEN, "20", "0.02"],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(10)


def _harness(scenario: str, url: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTING)]),
               QT_QPA_PLATFORM="offscreen")
    out = subprocess.run([sys.executable, str(TESTING / "qt_gil_harness.py"), scenario, url, TOKEN],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "error" not in result, result["error"]
    return result


needs_harness = pytest.mark.skipif(not sys.platform.startswith("linux") or not HAS_QTCORE_SO,
                                   reason="the GIL-holding harness calls PySide6's libQt6Core on Linux")


@needs_harness
def test_the_harness_holds_the_gil_between_events(fake_worker):
    got = _harness("idle", fake_worker)
    # A Python thread that runs ~hundreds of steps a second with the GIL free gets almost none
    # while the main thread waits in the harness's event loop: the harness is strict.
    assert got["free"] > 200 and got["held"] * 20 < got["free"], got


@needs_harness
def test_qt_transport_works_while_the_main_thread_holds_the_gil(fake_worker):
    got = _harness("qt", fake_worker)
    words = " ".join(f"w{i}" for i in range(20)) + " "
    assert got["health"] == "fake-worker" and got["text"] == words and got["n_stamps"] == 20
    assert got["cancelled"] == ["cancelled", 3]  # cancel sent from inside the stream
    assert got["missing"] == "unknown_session" and got["auth"] == "AuthError:401"
    assert got["refused"] == "WorkerUnavailableError"
    meta = got["upload"]["meta"]
    assert got["upload"]["bytes"] == 16 * 32 * 32 * 2 and meta["shape"] == [16, 32, 32]
    assert meta["dtype"] == "int16" and meta["spacing"] == [0.8, 0.8, 2.0]
    # The panel controller with QtRunner: connected, streamed, answered with the box, ready again.
    assert got["state"] == ["starting", "ready"]  # READY is dispatched by the next poll
    assert got["panel"] == 20
    assert got["panel_answer"] == [[words, [{"voxel": [0, 1, 2, 3, 4, 5]}]]]
    assert got["history"] == [["user", "Find: the lesion"], ["assistant", words]]
    # Everything above ran with Python threads starved (each step of the probe needs the GIL).
    assert got["probe"] < got["elapsed_s"] * 200, got


@needs_harness
def test_qt_panel_connects_and_answers_from_the_poll_timer(fake_worker):
    got = _harness("qt_panel", fake_worker)
    assert got["state"] == "ready" and got["answered_s"] > 0
    assert got["answer"] == " ".join(f"w{i}" for i in range(20)) + " "
