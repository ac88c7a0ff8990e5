"""A local worker's life: it dies with the program that started it, a SIGTERM ends running
answers with a ``shutting_down`` event, the launcher's errors are typed, and ``medmvl ask`` refuses
an ROI outside the image."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from medmvl_core.client import WorkerLauncher, errors
from streaming_helpers import ask_in_background, wait_for_pieces
from worker_helpers import pid_alive, toy_checkpoint, toy_python

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


@posix_only
def test_worker_exits_when_the_program_that_started_it_is_killed(tmp_path, reference_dir):
    # the parent starts its worker the way the viewer and the Slicer module do: through the
    # panel controller, from a background thread
    ck, py = toy_checkpoint(tmp_path / "ck", reference_dir), toy_python(tmp_path / "bin")
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from medmvl_core.client.controller import PanelController
        ctl = PanelController()
        ctl.start_local(python={py!r}, checkpoint={str(ck)!r}, device="cpu")
        ctl.wait(120)
        print(ctl.launcher.process.pid, flush=True)
        time.sleep(300)
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=env)
    worker_pid = None
    try:
        worker_pid = int(parent.stdout.readline())
        assert pid_alive(worker_pid)
        parent.send_signal(signal.SIGTERM)          # as when the viewer is killed
        parent.wait(30)
        deadline = time.monotonic() + 20
        while pid_alive(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(worker_pid), "the worker outlived the program that started it"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if worker_pid is not None and pid_alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


@posix_only
def test_sigterm_ends_a_running_answer_with_shutting_down(tmp_path, reference_dir):
    launcher = WorkerLauncher(python=toy_python(tmp_path / "bin"), device="cpu", start_timeout=120,
                              checkpoint=toy_checkpoint(tmp_path / "ck", reference_dir, 0.05))
    try:
        client = launcher.start()
        sid = client.create_session(client.upload_volume(np.zeros((8, 16, 16), np.int16)))
        t, pieces, result = ask_in_background(client, sid, question="Describe everything.",
                                              max_new_tokens=200)
        wait_for_pieces(pieces, 2, timeout=30)
        assert pieces, "no token streamed"
        os.kill(launcher.process.pid, signal.SIGTERM)
        t.join(15)
        exc = result.get("exc")
        assert isinstance(exc, errors.WorkerShuttingDownError), exc
        assert exc.code == "shutting_down" and "restart" in str(exc)
        assert launcher.process.wait(15) is not None
    finally:
        launcher.close()


def test_launcher_errors_are_typed(tmp_path):
    with pytest.raises(errors.LaunchError) as info:
        WorkerLauncher(checkpoint=tmp_path, workdir=tmp_path / "missing")
    assert info.value.code == "bad_workdir" and "does not exist" in str(info.value)
    launcher = WorkerLauncher(python=str(tmp_path / "no-python"), checkpoint=tmp_path,
                              workdir=tmp_path)
    with pytest.raises(errors.LaunchError) as info:
        launcher.start()
    assert info.value.code == "bad_python"
    assert "--parent-pid" in launcher.command() and str(os.getpid()) in launcher.command()


@pytest.fixture()
def inprocess_worker(reference_dir):
    from medmvl_core.engine import Engine
    from medmvl_core.engine.testing import load_toy
    from medmvl_core.worker.server import WorkerServer
    from medmvl_core.worker.settings import WorkerSettings
    token = "ask-cli-token-0123456789"
    srv = WorkerServer(WorkerSettings(token=token),
                       engine=Engine(*load_toy(str(reference_dir / "base" / "llm")))).start_in_thread()
    yield srv, token
    srv.stop()


@pytest.mark.parametrize("roi,words", [
    (["0", "0", "0", "8", "16", "99"], "outside the image"),
    (["6", "0", "0", "2", "16", "16"], "inverted"),
])
def test_ask_refuses_an_roi_outside_the_image_or_inverted(tmp_path, inprocess_worker, capsys,
                                                          roi, words):
    from medmvl_core.cli import main
    srv, token = inprocess_worker
    image = tmp_path / "vol.npy"
    np.save(image, np.zeros((8, 16, 16), np.int16))
    rc = main(["ask", "--url", srv.url, "--token", token, "--image", str(image), "--task",
               "describe", "--max-new-tokens", "3", "--roi", *roi])
    err = capsys.readouterr().err
    assert rc == 1 and words in err, err
