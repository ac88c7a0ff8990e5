"""The worker as a real process: `medmvl serve` via the launcher, kill mid-answer, restart."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from medmvl_core.client import WorkerLauncher, errors, ready_file_for
from streaming_helpers import ask_in_background, wait_for_pieces
from worker_helpers import toy_checkpoint as make_toy_checkpoint
from worker_helpers import toy_python


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory, reference_dir):
    return make_toy_checkpoint(tmp_path_factory.mktemp("toyck"), reference_dir, step_delay_s=0.05)


def test_kill_mid_answer_gives_a_clear_error_and_restart_works(toy_checkpoint):
    launcher = WorkerLauncher(python=toy_python(toy_checkpoint.parent / "bin"),
                              checkpoint=toy_checkpoint, device="cpu", start_timeout=120)
    try:
        client = launcher.start()
        info = json.loads(ready_file_for(launcher.token_file).read_text())
        assert info["port"] > 0 and info["url"] == client.url and info["pid"] == launcher.process.pid
        assert client.health()["status"] == "ready"
        arr = np.random.RandomState(0).randn(8, 16, 16).astype(np.float32)
        sid = client.create_session(client.upload_volume(arr))
        t, pieces, result = ask_in_background(client, sid, question="Describe everything.",
                                              max_new_tokens=200)
        wait_for_pieces(pieces, 2, timeout=30)
        assert pieces, "no token streamed"
        launcher.kill()
        t.join(10)
        assert isinstance(result.get("exc"), errors.WorkerConnectionLostError), result
        assert "restart" in str(result["exc"])
        with pytest.raises(errors.WorkerUnavailableError):
            client.health()
        client2 = launcher.restart()
        sid2 = client2.create_session(client2.upload_volume(arr))
        ans = client2.ask(sid2, question="Is there a nodule?", max_new_tokens=3)
        assert ans.num_tokens == 3 and ans.timings["total_s"] > 0
    finally:
        launcher.close()
    assert not launcher.running()


def test_serve_refuses_a_network_host_without_a_token_file(toy_checkpoint):
    out = subprocess.run([sys.executable, "-m", "medmvl_core.cli", "serve", "--checkpoint",
                          str(toy_checkpoint), "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "--token-file" in out.stderr


def test_launcher_reports_a_worker_that_dies_at_start(tmp_path):
    launcher = WorkerLauncher(python=sys.executable, checkpoint=tmp_path / "missing", device="cpu")
    with pytest.raises(errors.LaunchError, match="does not exist"):
        launcher.start()
    launcher.close()


def test_health_says_loading_until_the_model_is_ready(reference_dir):
    import threading as th

    from medmvl_core.client import WorkerClient
    from medmvl_core.engine import Engine
    from medmvl_core.engine.testing import load_toy
    from medmvl_core.worker.server import WorkerServer
    from medmvl_core.worker.settings import WorkerSettings

    release = th.Event()

    def loader():
        release.wait(30)
        return Engine(*load_toy(str(reference_dir / "base" / "llm")))

    token = "loading-test-token-0123456789"
    srv = WorkerServer(WorkerSettings(token=token), loader=loader).start_in_thread()
    try:
        c = WorkerClient(srv.url, token)
        assert c.health()["status"] == "loading"
        vid = c.upload_volume(np.zeros((4, 8, 8), np.int16))   # uploads work while loading
        with pytest.raises(errors.NotReadyError, match="loading"):
            c.create_session(vid)
        release.set()
        assert c.wait_ready(timeout=30)["status"] == "ready"
        assert c.ask(c.create_session(vid), question="Hi?", max_new_tokens=2).num_tokens == 2
    finally:
        release.set()
        srv.stop()
