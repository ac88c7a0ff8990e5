"""Start, watch and stop a local worker process (standard library only).

The launcher runs ``PYTHON -m medmvl_core.cli serve --checkpoint DIR --port 0 --token-file F``
with a fresh random token in ``F`` (mode 0600), waits for the worker to write its ready file
``F.json`` (``{"url", "port", "pid", ...}``), then for ``/v1/health`` to say ``ready``.
The worker's output goes to ``worker.log`` next to the token file.

The worker's environment starts from ``base_env`` (default ``os.environ``) updated with ``env``.
The folder holding this ``medmvl_core`` goes first on its ``PYTHONPATH`` only when that folder
holds the full package (``medmvl_core/cli.py``): a Slicer extension ships a client-only copy,
which must not hide the full package installed in the worker's Python.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medmvl_core.client import errors
from medmvl_core.client.client import WorkerClient

logger = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parents[2]


def has_full_package(parent: str | os.PathLike) -> bool:
    """True when ``parent/medmvl_core`` is the full package (not a client-only copy)."""
    return (Path(parent) / "medmvl_core" / "cli.py").is_file()


def ready_file_for(token_file: str | os.PathLike) -> Path:
    """Where a worker started with ``--token-file F`` writes its port and URL: ``F.json``."""
    p = Path(token_file)
    return p.with_name(p.name + ".json")


class WorkerLauncher:
    """Runs one local worker. ``start()`` returns a ready :class:`WorkerClient`.

    python: the interpreter that has torch (Slicer's own Python usually does not).
    extra_args: more ``medmvl serve`` arguments (e.g. ``["--max-queue", "4"]``).
    base_env: the environment the worker starts from (default: this process's ``os.environ``;
    Slicer passes its startup environment). env: variables set on top of it.
    watch_parent: the worker shuts down when this process exits (``--parent-pid``), so a
    killed viewer or Slicer never leaves an orphaned worker holding memory or the GPU.
    Raises :class:`~medmvl_core.client.errors.LaunchError` for bad arguments (code
    ``bad_argument``, ``bad_workdir``, ``bad_python``) and failed starts (``launch_failed``).
    """

    def __init__(self, python: str | None = None, checkpoint: str | os.PathLike = "",
                 device: str = "auto", dtype: str | None = None, quantize: str = "auto",
                 extra_args: list[str] | None = None, workdir: str | os.PathLike | None = None,
                 start_timeout: float = 180.0, env: dict[str, str] | None = None,
                 base_env: dict[str, str] | None = None, watch_parent: bool = True):
        if not checkpoint:
            raise errors.LaunchError("WorkerLauncher needs checkpoint=DIR (a model folder)",
                                     code="bad_argument")
        if workdir is not None and not Path(workdir).is_dir():
            raise errors.LaunchError(f"the worker folder {str(workdir)!r} does not exist; create "
                                     "it or leave workdir unset (a temporary folder)",
                                     code="bad_workdir")
        if not start_timeout > 0:
            raise errors.LaunchError(f"start_timeout must be > 0 seconds, got {start_timeout}",
                                     code="bad_argument")
        self.watch_parent = watch_parent
        self.python = python or sys.executable
        self.checkpoint = str(checkpoint)
        self.device, self.dtype, self.quantize = device, dtype, quantize
        self.extra_args = list(extra_args or [])
        self.start_timeout = start_timeout
        self.env = dict(env or {})
        self.base_env = None if base_env is None else dict(base_env)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="medmvl-worker-"))
        self.token_file = self.workdir / "token"
        self.log_file = self.workdir / "worker.log"
        self.process: subprocess.Popen | None = None
        self.client: WorkerClient | None = None

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "medmvl_core.cli", "serve", "--checkpoint", self.checkpoint,
               "--device", self.device, "--quantize", self.quantize, "--host", "127.0.0.1",
               "--port", "0", "--token-file", str(self.token_file)]
        if self.dtype:
            cmd += ["--dtype", self.dtype]
        if self.watch_parent:
            cmd += ["--parent-pid", str(os.getpid())]
        return cmd + self.extra_args

    def worker_env(self) -> dict[str, str]:
        """The worker's environment: ``base_env`` (default ``os.environ``) updated with ``env``;
        this package's folder first on ``PYTHONPATH`` only if it holds the full package."""
        env = dict(os.environ if self.base_env is None else self.base_env)
        env.update(self.env)
        if has_full_package(_REPO_ROOT):
            env["PYTHONPATH"] = os.pathsep.join(
                [str(_REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        return env

    def start(self, wait: bool = True) -> WorkerClient:
        """Start the worker (if not running) and return a client; ``wait`` for model ready."""
        if self.running():
            assert self.client is not None
            return self.client
        token = secrets.token_urlsafe(32)
        ready = ready_file_for(self.token_file)
        try:
            fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(token)
            ready.unlink(missing_ok=True)
            log = open(self.log_file, "ab")
        except OSError as exc:
            raise errors.LaunchError(f"cannot write the worker's token and log in {self.workdir} "
                                     f"({exc}); use a writable workdir", code="bad_workdir") from exc
        env = self.worker_env()
        logger.info("starting worker: %s", " ".join(self.command()))
        try:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env,
                                            start_new_session=True)
        except OSError as exc:
            raise errors.LaunchError(f"cannot run the worker's Python {self.python!r} ({exc}); "
                                     "give the path of a Python that has medmvl installed",
                                     code="bad_python") from exc
        finally:
            log.close()
        info = self._wait_ready_file(ready)
        self.client = WorkerClient(info["url"], token)
        if wait:
            remaining = max(1.0, self.start_timeout)
            try:
                self.client.wait_ready(timeout=remaining)
            except errors.WorkerError:
                self.stop()
                raise
        return self.client

    def _wait_ready_file(self, ready: Path) -> dict:
        deadline = time.monotonic() + self.start_timeout
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:  # exited, or stopped meanwhile
                code = None if self.process is None else self.process.returncode
                raise errors.LaunchError(
                    f"the worker exited with code {code} before it was ready; "
                    f"last log lines:\n{self.log_tail()}")
            if ready.exists():
                try:
                    return json.loads(ready.read_text())
                except ValueError:
                    pass  # being written
            self._pause(0.05)
        self.stop()
        raise errors.LaunchError(f"the worker did not start within {self.start_timeout:.0f} s; "
                                 f"log:\n{self.log_tail()}")

    def _pause(self, seconds: float) -> None:
        """Wait between checks of the ready file (the Qt launcher processes GUI events meanwhile)."""
        time.sleep(seconds)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker (SIGTERM, then SIGKILL after ``timeout``)."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self.client = None

    def kill(self) -> None:
        """Kill the worker at once (tests and emergencies)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def restart(self, wait: bool = True) -> WorkerClient:
        """Stop (if needed) and start again; returns the new client (new port and token)."""
        self.stop()
        return self.start(wait=wait)

    def close(self) -> None:
        """Stop the worker and remove the temporary folder the launcher made."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> WorkerClient:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
