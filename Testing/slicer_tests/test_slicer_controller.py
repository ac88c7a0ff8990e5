"""The panel controller shared by the Slicer module and the viewer, with a scripted client
(the real worker is exercised in test_viewer_e2e.py)."""

from __future__ import annotations

import functools
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slicer_stubs import FakeWorkerClient  # noqa: E402

from medmvl_core.client import controller as ctl  # noqa: E402
from medmvl_core.client import errors  # noqa: E402


class Recorder(ctl.ControllerListener):
    def __init__(self):
        self.events = []

    def on_state(self, state, detail):
        self.events.append(("state", state, detail))

    def on_token(self, key, piece):
        self.events.append(("token", key, piece))

    def on_answer(self, key, answer):
        self.events.append(("answer", key, answer.text))

    def on_error(self, key, message):
        self.events.append(("error", key, message))

    def on_progress(self, text, fraction):
        self.events.append(("progress", text, fraction))

    def on_health(self, health):
        self.events.append(("health", health.get("model")))


def _volume(key="ct1", value=0):
    return ctl.VolumeData(key=key, array=np.full((4, 5, 6), value, np.int16),
                          ijk_to_ras=np.diag([-0.5, -0.5, 2.0, 1.0]), modality="CT")


def _connected(**client_kw):
    rec = Recorder()
    c = ctl.PanelController(rec, client_factory=functools.partial(FakeWorkerClient, **client_kw))
    c.connect_remote("http://fake:1", "tok")
    c.wait(10)
    assert c.state == ctl.READY, c.detail
    return c, rec, FakeWorkerClient.instances[-1]


def test_ask_streams_tokens_then_answer_in_order():
    c, rec, client = _connected()
    c.run_task(_volume(), "ask", "Is the lung clear?")
    c.wait(10)
    kinds = [e[0] for e in rec.events if e[0] in ("token", "answer")]
    assert kinds == ["token"] * 4 + ["answer"]
    assert "".join(e[2] for e in rec.events if e[0] == "token") == "The lungs are clear."
    assert c.transcript("ct1") == "You: Is the lung clear?\n\nMedM-VL: The lungs are clear."
    # The worker got LPS geometry: RAS diag(-0.5, -0.5, 2) is LPS spacing (0.5, 0.5, 2), identity.
    up = client.uploads[0]
    assert up["spacing"] == (0.5, 0.5, 2.0) and np.allclose(up["direction"], np.eye(3))
    assert ("health", "fake-model") in rec.events


def test_history_is_per_volume_and_uploads_are_cached():
    c, _rec, client = _connected()
    c.run_task(_volume("a"), "report")
    c.wait(10)
    c.run_task(_volume("a"), "ask", "More?")
    c.wait(10)
    assert len(client.uploads) == 1  # same voxels: one upload, one session
    c.run_task(_volume("b", value=7), "find", "the heart")
    c.wait(10)
    assert len(client.uploads) == 2
    assert [e.role for e in c.history("a")] == ["user", "assistant"] * 2
    assert [e.text for e in c.history("b")][0] == "Find: the heart"
    assert c.last_question["b"] == "the heart"
    c.run_task(_volume("a", value=3), "report")  # the volume changed under the same key
    c.wait(10)
    assert len(client.uploads) == 3
    c.clear_history("a")
    assert c.history("a") == [] and len(c.history("b")) == 2
    # After Clear the model starts a new conversation on the volume already uploaded.
    c.run_task(_volume("a", value=3), "ask", "again?")
    c.wait(10)
    assert len(client.uploads) == 3 and len(client.sessions) == 4
    assert client.asked[-1]["session"] == "sess4" and client.asked[-2]["session"] == "sess3"
    assert client.sessions[-1] == client.sessions[-2]  # same volume id
    # ... and the cleared conversation is deleted on the worker (in the background).
    _until(lambda: client.deleted == ["sess3"])


def _until(cond, timeout=10.0):
    import time

    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_clear_when_the_worker_lost_the_session_and_while_answering():
    c, rec, client = _connected(fail_delete=True)
    c.run_task(_volume(), "report")
    c.wait(10)
    c.clear_history("ct1")  # the delete fails (session gone): logged, nothing raised or shown
    c.run_task(_volume(), "ask", "next?")
    c.wait(10)
    assert client.asked[-1]["session"] == "sess2" and c.history("ct1")[-1].role == "assistant"
    assert not [e for e in rec.events if e[0] == "error"]
    # Clear while an answer streams: the answering session is not deleted under it.
    c2, _rec2, client2 = _connected(slow=0.05)
    c2.run_task(_volume(), "report")
    _until(lambda: c2._session is not None)
    c2.clear_history("ct1")
    c2.wait(10)
    assert client2.deleted == [] and client2.cancelled == []


def test_session_lost_on_the_worker_is_uploaded_again():
    c, rec, client = _connected(missing_session_once=True)
    c.run_task(_volume(), "ask", "q")
    c.wait(10)
    assert len(client.uploads) == 2 and len(client.asked) == 2
    assert c.history("ct1")[-1].role == "assistant"


def test_task_inputs_are_checked_before_anything_is_sent():
    c, _rec, client = _connected()
    with pytest.raises(errors.BadRequestError, match="needs what to find"):
        c.run_task(_volume(), "find", "  ")
    with pytest.raises(errors.BadRequestError, match="needs a region"):
        c.run_task(_volume(), "crop_ask", "what is it?")
    with pytest.raises(errors.BadRequestError, match="unknown task"):
        c.run_task(_volume(), "segment", "x")
    assert client.asked == [] and c.history("ct1") == []
    c.run_task(_volume(), "describe", box=(0, 1, 2, 3, 4, 5))
    c.wait(10)
    assert client.asked[-1]["box"] == [0, 1, 2, 3, 4, 5] and client.asked[-1]["question"] is None


def test_generation_settings_are_checked_sent_and_recorded():
    c, _rec, client = _connected()
    c.generation = c.generation.replace(max_new_tokens=32, do_sample=True, temperature=0.7, seed=1)
    c.max_new_tokens = 24  # the shorthand sets the same object
    c.run_task(_volume(), "ask", "Is the lung clear?")
    c.wait(10)
    sent = client.asked[-1]["generation"]
    assert sent.to_dict() == {"max_new_tokens": 24, "do_sample": True, "temperature": 0.7,
                              "top_p": 1.0, "top_k": 0, "seed": 1}
    assert sent is not c.generation  # the question's own copy: later changes do not touch it
    assert c.conversations["ct1"].turns[-1].generation == {
        **sent.to_dict(), "finish_reason": "stop", "num_tokens": 4}
    c.generation.top_p = 0.0
    with pytest.raises(errors.BadRequestError, match="top_p must be > 0") as info:
        c.run_task(_volume(), "ask", "again?")
    assert info.value.code == "bad_sampling" and len(client.asked) == 1
    assert len(c.history("ct1")) == 2  # the refused question is not in the transcript


def test_no_worker_and_busy_errors():
    c = ctl.PanelController()
    with pytest.raises(errors.WorkerUnavailableError, match="start a local worker"):
        c.run_task(_volume(), "ask", "q")
    c, _rec, _client = _connected(slow=0.05, tokens=["x"] * 40)
    c.run_task(_volume(), "ask", "q")
    with pytest.raises(errors.ConflictError, match="busy"):
        c.run_task(_volume(), "ask", "again")
    c.cancel()
    c.wait(10)


def test_cancel_stops_the_answer():
    c, rec, client = _connected(slow=0.05, tokens=["word "] * 200)
    c.run_task(_volume(), "ask", "long please")
    while not any(e[0] == "token" for e in rec.events):
        c.poll()
    c.cancel()
    c.wait(10)
    assert client.cancelled == ["sess1"]
    assert c.state == ctl.READY and c.detail == "cancelled"
    assert c.history("ct1")[-1].text == "cancelled"
    assert sum(e[0] == "token" for e in rec.events) < 200


def test_api_mismatch_is_refused():
    rec = Recorder()
    c = ctl.PanelController(rec, client_factory=functools.partial(FakeWorkerClient, api=2))
    c.connect_remote("http://fake:1", "tok")
    c.wait(10)
    assert c.client is None and c.state == ctl.DISCONNECTED
    assert any(e[0] == "error" and "API 2" in e[2] for e in rec.events)


class FakeLauncher:
    def __init__(self, **kw):
        self.kw, self.alive, self.stopped = kw, True, False

    def start(self):
        return FakeWorkerClient()

    def running(self):
        return self.alive

    def stop(self):
        self.stopped, self.alive = True, False

    def log_tail(self, n=20):
        return "Traceback: CUDA error"


def test_local_worker_death_is_reported_and_stop_kills_it(tmp_path):
    rec = Recorder()
    c = ctl.PanelController(rec, launcher_factory=FakeLauncher)
    with pytest.raises(errors.LaunchError, match="does not exist"):
        c.start_local(sys.executable, str(tmp_path / "nope"))
    c.start_local("/env/python", str(tmp_path), device="cuda", quantize="4bit", env={"A": ""})
    c.wait(10)
    launcher = c.launcher
    assert c.state == ctl.READY
    assert launcher.kw == {"python": "/env/python", "checkpoint": str(tmp_path), "device": "cuda",
                           "quantize": "4bit", "env": {"A": ""}}
    launcher.alive = False
    c.poll()
    assert c.state == ctl.DEAD and "CUDA error" in c.detail
    c.start_local("/env/python", str(tmp_path))  # restart
    c.wait(10)
    assert c.state == ctl.READY and c.launcher is not launcher
    second = c.launcher
    c.shutdown()
    assert second.stopped and c.state == ctl.DISCONNECTED


def _fake_python(tmp_path, body):
    p = tmp_path / "python"
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return str(p)


def test_download_reports_progress(tmp_path):
    rec = Recorder()
    c = ctl.PanelController(rec)
    py = _fake_python(tmp_path, 'echo "$@"; printf "model.safetensors:  25%%|##  \\rmodel.safetensors:  75%%|######\\r'
                                'model.safetensors: 100%%|########\\n"\n')
    c.download(py, "shiym2000/MedM-VL-2D-3B-en", str(tmp_path / "m"))
    c.wait(10)
    prog = [e for e in rec.events if e[0] == "progress"]
    assert [e[2] for e in prog if e[2] is not None] == [0.0, 0.25, 0.75, 1.0, 1.0]
    assert f"download shiym2000/MedM-VL-2D-3B-en --local-dir {tmp_path / 'm'}".endswith(prog[1][1][-60:])
    bad = _fake_python(tmp_path, 'echo "error: no network"; exit 3\n')
    c.download(bad, "x/y", str(tmp_path / "m"))
    c.wait(10)
    err = [e for e in rec.events if e[0] == "error"]
    assert err and "download of x/y failed" in err[-1][2] and "no network" in err[-1][2]


def test_small_helpers():
    assert ctl.format_memory({"cuda_allocated_bytes": 3 * 2**20, "volumes_bytes": 0}) == \
        "cuda allocated: 3 MiB, volumes: 0 MiB"
    assert ctl.format_memory(None) == "-"
    boxes = [{"voxel": [1.0, 2, 3, 4, 5, 6]}, {"voxel": [1, 2, 3, 4, 5, 6]}, {"model": [0.1] * 6}]
    assert ctl.unique_voxel_boxes(boxes) == [(1, 2, 3, 4, 5, 6)]
    a = np.zeros((2, 2), np.int16)
    assert ctl.content_key(a) == ctl.content_key(a.copy()) != ctl.content_key(a.astype(np.int32))
