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

TESTING = Path(__file__).resolve().parents[1]
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


# ---------------------------------------------------------------------- in-process (PySide waits)
@pytest.fixture()
def qapp():
    from qtpy import QtCore

    return QtCore.QCoreApplication.instance() or QtCore.QCoreApplication([])


def test_a_worker_that_never_answers_is_a_timeout(qapp):
    import socket

    from medmvl_core.client import errors, qt_transport

    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        client = qt_transport.QtWorkerClient(f"http://127.0.0.1:{silent.getsockname()[1]}", TOKEN,
                                             timeout=0.5, retries=0)
        with pytest.raises(errors.WorkerTimeoutError, match="did not answer GET /health in time"):
            client.health()


def test_a_worker_killed_mid_answer_is_a_lost_connection(qapp):
    from medmvl_core.client import errors, qt_transport

    proc = subprocess.Popen([sys.executable, str(TESTING / "fake_worker_server.py"), TOKEN, "50", "0.05"],
                            stdout=subprocess.PIPE, text=True)
    try:
        client = qt_transport.QtWorkerClient(f"http://127.0.0.1:{int(proc.stdout.readline())}", TOKEN)
        pieces: list[str] = []

        def on_token(piece):
            pieces.append(piece)
            if len(pieces) == 2:
                proc.kill()  # the worker dies while the answer streams

        with pytest.raises(errors.WorkerConnectionLostError, match="restart it and ask again"):
            client.ask("s-v1", question="?", on_token=on_token)
        assert pieces[:2] == ["w0 ", "w1 "]
    finally:
        proc.kill()
        proc.wait(10)


def test_waits_end_when_the_application_quits(qapp):
    """QCoreApplication::exit during a wait: the job unwinds with a clear error instead of
    spinning (every later QEventLoop::exec returns at once)."""
    from qtpy import QtCore

    from medmvl_core.client import errors, qt_transport

    seen: list[str] = []

    def body():
        try:
            for _ in range(3):
                qt_transport.qt_sleep(2.0)
            seen.append("slept through")
        except errors.CancelledError as exc:
            seen.append(str(exc))

    QtCore.QTimer.singleShot(0, body)
    QtCore.QTimer.singleShot(100, qapp.quit)
    qapp.exec()
    assert seen == ["the application is quitting; the request was abandoned"]


def test_inline_runner_download_reports_progress(qapp, tmp_path):
    """The controller's download on the Qt runner: output read from a file as it grows, pausing
    in local event loops, the same progress events as with threads."""
    import stat

    from medmvl_core.client import controller as ctl
    from medmvl_core.client import qt_transport

    events: list[tuple] = []

    class Listener(ctl.ControllerListener):
        def on_progress(self, text, fraction):
            events.append((text, fraction))

    py = tmp_path / "python"
    py.write_text('#!/bin/sh\nprintf "model:  25%%|##\\r"; sleep 0.3; printf "model: 100%%|####\\n"\n')
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    c = ctl.PanelController(Listener(), runner=qt_transport.QtRunner())
    c.download(str(py), "x/y", str(tmp_path / "m"))  # returns when done (inline)
    assert not c.busy()
    c.poll()
    assert [f for _, f in events if f is not None] == [0.0, 0.25, 1.0, 1.0]
