"""An event loop whose Python main thread holds the GIL between events, as an embedding
application may (3D Slicer's PythonQt is not known to release it while Qt waits). A test helper,
run as a script: ``python qt_gil_harness.py SCENARIO URL TOKEN`` prints one JSON line.

PySide releases the GIL while Qt waits in ``exec()``; here the waits are entered through
``ctypes.PyDLL`` (calls that keep the GIL) into ``QCoreApplication::exec`` and
``QEventLoop::exec``, so Python code runs only inside Qt callbacks (timers, reply signals) on the
main thread, and other Python threads get the GIL only while such a callback runs.

Scenarios: ``idle`` (how far a Python thread gets in 1 s, held vs released), ``qt`` (the Qt
transport: client calls, streaming, cancel, errors, the panel controller with ``QtRunner``),
``selftest`` (the in-Slicer self-test on the
stubs against a real worker), ``threads`` / ``qt_panel`` (connect and one answer through the panel controller, threaded or
with ``QtRunner``, the GUI woken only by the panel's 100 ms poll timer; times for the bench).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import PySide6  # noqa: E402
import shiboken6  # noqa: E402
from qtpy import QtCore  # noqa: E402

from medmvl_core.client import controller as ctl  # noqa: E402
from medmvl_core.client import errors, qt_transport  # noqa: E402
from medmvl_core.client.client import WorkerClient  # noqa: E402

_core = ctypes.PyDLL(str(Path(PySide6.__file__).parent / "Qt" / "lib" / "libQt6Core.so.6"))
_app_exec = _core["_ZN16QCoreApplication4execEv"]
_app_exec.restype, _app_exec.argtypes = ctypes.c_int, []
_loop_exec = _core["_ZN10QEventLoop4execE6QFlagsINS_17ProcessEventsFlagEE"]
_loop_exec.restype, _loop_exec.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]


#: ``HARNESS_RELEASE_GIL=1``: plain PySide waits (the GIL released), for a baseline in the bench.
RELEASE = os.environ.get("HARNESS_RELEASE_GIL") == "1"


def exec_holding_gil(loop) -> None:
    """``QEventLoop::exec()`` without releasing the GIL (replaces ``qt_transport._exec``)."""
    if RELEASE:
        loop.exec()
    else:
        _loop_exec(shiboken6.getCppPointer(loop)[0], 0)


class Probe:
    """A Python thread counting how often it gets the GIL (each step sleeps 1 ms)."""

    def __init__(self):
        self.count, self._stop = 0, False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop:
            self.count += 1
            time.sleep(0.001)

    def stop(self):
        self._stop = True


def run_holding_gil(app, body) -> dict:
    """Run ``body()`` from a timer callback inside ``QCoreApplication::exec`` entered with the GIL
    held; returns what ``body`` returned (or the error it raised)."""
    result: dict = {}

    def start():
        try:
            result.update(body())
        except Exception as exc:  # reported, never swallowed
            result["error"] = f"{type(exc).__name__}: {exc}"
        app.quit()

    QtCore.QTimer.singleShot(0, start)
    app.exec() if RELEASE else _app_exec()
    return result


def scenario_idle(app, url, token) -> dict:
    probe = Probe()
    time.sleep(1.0)  # GIL released: the probe runs freely
    free = probe.count

    def body():
        n0 = probe.count
        qt_transport.qt_sleep(1.0)  # a 1 s wait in the GIL-holding loop
        return {"held": probe.count - n0}

    out = run_holding_gil(app, body)
    probe.stop()
    return dict(out, free=free)


def scenario_qt(app, url, token) -> dict:
    probe = Probe()

    def body():
        t0 = time.monotonic()
        client = qt_transport.QtWorkerClient(url, token, timeout=10)
        health = client.health()
        arr = (np.arange(16 * 32 * 32, dtype=np.int16).reshape(16, 32, 32) % 500) - 1000
        vid = client.upload_volume(arr, (0.8, 0.8, 2.0), (1.0, 2.0, 3.0), modality="CT")
        sid = client.create_session(vid)
        stamps: list[float] = []
        ans = client.ask(sid, question="What is shown?", on_token=lambda p: stamps.append(time.monotonic()))
        # Cancel from inside the stream, as a click on Cancel would during the answer.
        seen: list[str] = []

        def on_token(piece):
            seen.append(piece)
            if len(seen) == 3:
                client.cancel(sid)

        cancelled = client.ask(sid, question="Again?", on_token=on_token)
        try:
            client.ask("missing", question="?")
            missing = "no error"
        except errors.NotFoundError as exc:
            missing = exc.code
        try:
            qt_transport.QtWorkerClient(url, "wrong-token", retries=0).health()
            auth = "no error"
        except errors.WorkerError as exc:
            auth = f"{type(exc).__name__}:{exc.status}"
        try:
            qt_transport.QtWorkerClient("http://127.0.0.1:9", token, retries=0).health()
            refused = "no error"
        except errors.WorkerUnavailableError as exc:
            refused = type(exc).__name__

        # The panel controller as the Slicer module runs it.
        events: list[tuple] = []

        class Listener(ctl.ControllerListener):
            def on_token(self, key, piece):
                events.append(("token", piece))

            def on_answer(self, key, answer):
                events.append(("answer", answer.text, answer.boxes))

        runner = qt_transport.QtRunner()
        c = ctl.PanelController(Listener(), client_factory=runner.client_factory, runner=runner)
        poll = QtCore.QTimer()
        poll.timeout.connect(c.poll)
        poll.start(100)
        c.connect_remote(url, token)
        state_after_connect = c.state
        c.run_task(ctl.VolumeData("vol", arr, np.eye(4)), "find", "the lesion")
        c.poll()
        poll.stop()
        state_after_answer = c.state
        stats = client._json("GET", "/stats")
        return {"health": health["model"], "text": ans.text, "n_stamps": len(stamps),
                "span_s": round(stamps[-1] - stamps[0], 3) if stamps else None,
                "cancelled": [cancelled.finish_reason, len(seen)], "missing": missing,
                "auth": auth, "refused": refused, "state": [state_after_connect, state_after_answer],
                "panel": [e[0] for e in events].count("token"),
                "panel_answer": [e[1:] for e in events if e[0] == "answer"],
                "history": [(h.role, h.text) for h in c.history("vol")],
                "upload": stats["uploads"][0], "asks": len(stats["asks"]),
                "elapsed_s": round(time.monotonic() - t0, 3), "probe": probe.count}

    out = run_holding_gil(app, body)
    probe.stop()
    return out


def _panel_answer_time(c: "ctl.PanelController", limit_s: float) -> dict:
    """Connect and ask once through panel controller ``c``, the GUI waiting only in a loop woken
    by the panel's 100 ms poll timer (as in the module); times from the click, in seconds."""
    loop = QtCore.QEventLoop()
    marks: dict[str, float] = {}
    t0 = time.monotonic()

    def tick():
        c.poll()
        if c.state == ctl.READY and "connected" not in marks:
            marks["connected"] = time.monotonic() - t0
            c.run_task(ctl.VolumeData("vol", np.zeros((4, 8, 8), np.int16), np.eye(4)), "ask", "?")
        if "connected" in marks and c.idle() and c.history("vol")[-1:] and \
                c.history("vol")[-1].role != "user":
            marks["answered"] = time.monotonic() - t0
            loop.quit()
        if time.monotonic() - t0 > limit_s:
            loop.quit()

    poll = QtCore.QTimer()
    poll.timeout.connect(tick)
    poll.start(100)
    c.connect_remote(url_token[0], url_token[1])  # QtRunner: returns once connected
    exec_holding_gil(loop)
    poll.stop()
    return {"state": c.state, "connected_s": round(marks.get("connected", -1), 3),
            "answered_s": round(marks.get("answered", -1), 3),
            "answer": c.history("vol")[-1].text if c.history("vol") else ""}


url_token: list[str] = []


def scenario_selftest(app, _url, _token) -> dict:
    """The in-Slicer self-test (MedMVLSlicer/Testing/Python/MedMVLSlicerSelfTest.py) on the
    stubs, inside the GIL-holding loop: the panel's Start (QtWorkerLauncher's waits), ask,
    describe, find and stop against a real worker (``MEDMVL_TEST_PYTHON`` must be set)."""
    import runpy

    import slicer_stubs

    rec = slicer_stubs.install()
    selftest = Path(__file__).resolve().parents[1] / "MedMVLSlicer" / "Testing" / "Python" / "MedMVLSlicerSelfTest.py"

    def body():
        result = runpy.run_path(str(selftest), run_name="medmvl_selftest")["runSelfTest"]()
        widget = sys.modules["slicer"].modules.medmvlslicer.self()
        return {"run": result.testsRun, "skipped": len(result.skipped),
                "problems": [text[-3000:] for _, text in result.failures + result.errors],
                "status": rec.displayed[-1], "runner": type(widget.logic.controller.runner).__name__,
                "chat": widget.ui.chatTextEdit.toPlainText()}

    return run_holding_gil(app, body)


def scenario_threads(app, url, token) -> dict:
    url_token[:] = [url, token]
    return run_holding_gil(app, lambda: _panel_answer_time(
        ctl.PanelController(client_factory=lambda u, t: WorkerClient(u, t, timeout=10)), 20.0))


def scenario_qt_panel(app, url, token) -> dict:
    url_token[:] = [url, token]
    runner = qt_transport.QtRunner()
    return run_holding_gil(app, lambda: _panel_answer_time(
        ctl.PanelController(client_factory=runner.client_factory, runner=runner), 20.0))


def main() -> None:
    scenario, url, token = sys.argv[1], sys.argv[2], sys.argv[3]
    app = QtCore.QCoreApplication([])
    if not RELEASE:
        qt_transport._exec = exec_holding_gil  # every nested wait keeps the GIL too
    fn = {"idle": scenario_idle, "qt": scenario_qt, "threads": scenario_threads,
          "qt_panel": scenario_qt_panel, "selftest": scenario_selftest}[scenario]
    print(json.dumps(fn(app, url, token)), flush=True)
    os._exit(0)  # daemon threads may still wait for the GIL


if __name__ == "__main__":
    main()
