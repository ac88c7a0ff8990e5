"""The panel when the worker closes a conversation (session cap, volume evicted): it says so,
marks the visible turns as out of the model's context and starts over on the next question —
never silently re-opening a session the chat pretends is the same. Real worker on loopback."""

from __future__ import annotations

import numpy as np
import pytest

from medmvl_core.client import controller as ctl
from medmvl_core.client import errors
from medmvl_core.engine import Engine
from medmvl_core.engine.testing import load_toy
from medmvl_core.worker.server import WorkerServer
from medmvl_core.worker.settings import WorkerSettings

TOKEN = "eviction-token-0123456789"


class Recorder(ctl.ControllerListener):
    def __init__(self):
        self.errors: list[tuple] = []

    def on_error(self, key, message):
        self.errors.append((key, message))


@pytest.fixture(scope="module")
def worker(reference_dir):
    settings = WorkerSettings(token=TOKEN, max_sessions=1, volume_store_bytes=3000)
    srv = WorkerServer(settings, engine=Engine(*load_toy(str(reference_dir / "base" / "llm"))))
    yield srv.start_in_thread()
    srv.stop()


@pytest.fixture()
def panel(worker):
    srv = worker
    rec = Recorder()
    c = ctl.PanelController(rec)
    c.generation.max_new_tokens = 3
    c.connect_remote(srv.url, TOKEN)
    c.wait(30)
    assert c.state == ctl.READY, c.detail
    yield c, rec, srv
    c.shutdown()


def _vol(key: str, value: int, shape=(4, 10, 10)) -> ctl.VolumeData:
    return ctl.VolumeData(key=key, array=np.full(shape, value, np.int16), ijk_to_ras=np.eye(4))


def _ask(c, vol, q="Is there a nodule?"):
    c.run_task(vol, "ask", q)
    c.wait(30)
    c.poll()


@pytest.mark.parametrize("code", ["session_evicted", "volume_evicted"])
def test_a_closed_conversation_is_reported_and_marked(panel, code):
    c, rec, srv = panel
    a, b = _vol("a", 1), _vol("b", 2)
    _ask(c, a)
    assert [e.role for e in c.history("a")] == ["user", "assistant"]
    # the 800-byte volumes: a 3000-byte store keeps three; the cap is one session
    _ask(c, b if code == "session_evicted" else _vol("b", 2, shape=(12, 10, 10)))
    _ask(c, a, "And its size?")
    key, message = rec.errors[-1]
    assert key == "a" and "no longer in the model's context" in message and "start over" in message
    assert not any(e.in_context for e in c.history("a")[:-1])   # all but the notice
    assert "(no longer in the model's context)" in c.transcript("a")
    assert c.history("a")[-1].role == "error"
    _ask(c, a, "And its size?")                       # starts over: a new session, answered
    assert c.history("a")[-1].role == "assistant" and c.history("a")[-1].in_context


def test_the_panel_checks_a_box_against_the_image_before_sending(panel):
    c, _rec, _srv = panel
    with pytest.raises(errors.BadRequestError, match="outside the image"):
        c.run_task(_vol("a", 1), "describe", box=[0, 0, 0, 4, 10, 11])
