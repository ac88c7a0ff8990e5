"""The panel controller's worker jobs: start a local worker, connect to a remote one, stop, and
download a released model (:class:`WorkerJobsMixin`, a base of
:class:`~medmvl_core.client.controller.PanelController`, whose ``__init__`` sets the state it uses).
Standard library only.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from medmvl_core import __version__
from medmvl_core.client import errors
from medmvl_core.client.client import WorkerClient
from medmvl_core.client.launcher import WorkerLauncher
from medmvl_core.client.model_kinds import ModelKinds, read_model_kinds
from medmvl_core.client.panel_types import API_VERSION, DISCONNECTED, READY, STARTING
from medmvl_core.client.runners import split_progress

logger = logging.getLogger(__name__)


class WorkerJobsMixin:
    """Starting, connecting to and stopping the worker, and model downloads, as background jobs
    (``_run``); results come back as events (``_emit``)."""

    # Set by PanelController.__init__ (declared here for readers and type checkers).
    runner: Any
    launcher: WorkerLauncher | None
    client: WorkerClient | None
    state: str
    health: dict
    model_kinds: ModelKinds | None
    _launcher_factory: Callable[..., WorkerLauncher]
    _client_factory: Callable[..., WorkerClient]
    _uploads: dict
    _download: subprocess.Popen | None
    _atexit: bool
    _emit: Callable[..., None]
    _run: Callable[[str, Callable[[], None]], None]
    _set_state: Callable[..., None]
    _cancel: Any

    def _check_health(self, client: WorkerClient) -> dict:
        h = client.health()
        if int(h.get("api", -1)) != API_VERSION:
            raise errors.WorkerError(
                f"the worker speaks API {h.get('api')!r}, this panel speaks {API_VERSION}; "
                "install matching versions of the worker and the module", code="api_mismatch")
        if h.get("version") and str(h["version"]).split(".")[:2] != __version__.split(".")[:2]:
            logger.warning("worker version %s differs from client %s", h["version"], __version__)
        return h

    def start_local(self, python: str, checkpoint: str, device: str = "auto",
                    quantize: str = "auto", env: dict[str, str] | None = None) -> None:
        """Start (or restart) a local worker in the background."""
        if not checkpoint or not os.path.isdir(checkpoint):
            raise errors.LaunchError(f"checkpoint folder {checkpoint!r} does not exist; choose a "
                                     "model folder or download a released model", code="bad_argument")
        self.stop()
        has_config = os.path.isfile(os.path.join(checkpoint, "config.json"))
        self.model_kinds = read_model_kinds(checkpoint) if has_config else None  # else the worker reports it
        if not self._atexit:
            atexit.register(self.shutdown)  # never leave a worker behind
            self._atexit = True
        self._set_state(STARTING, f"starting the worker on {device}")

        def job() -> None:
            t0 = time.monotonic()
            launcher = self._launcher_factory(python=python or sys.executable,
                                              checkpoint=checkpoint, device=device,
                                              quantize=quantize, env=env)
            self.launcher = launcher
            client = launcher.start()
            h = self._check_health(client)
            self.client, self._uploads = client, {}
            logger.info("worker ready in %.1f s (device %s)", time.monotonic() - t0, h.get("device"))
            self._emit("health", h)
            self._emit("state", READY, f"{h.get('model', '')} on {h.get('device', '?')}")

        self._run("start", job)

    def connect_remote(self, url: str, token: str) -> None:
        """Use a running worker (token kept in memory only); checks health in the background."""
        self.stop()
        self._set_state(STARTING, f"connecting to {url}")

        def job() -> None:
            client = self._client_factory(url, token)
            h = self._check_health(client)
            if h.get("status") != "ready":
                client.wait_ready(timeout=300)
                h = self._check_health(client)
            self.client, self._uploads = client, {}
            self._emit("health", h)
            self._emit("state", READY, f"{h.get('model', '')} on {h.get('device', '?')} at {url}")

        self._run("connect", job)

    def stop(self) -> None:
        """Stop the local worker (if this panel started one) and forget the connection."""
        self._cancel.set()
        if self.launcher is not None:
            # close() also removes the launcher's temporary folder (token, log).
            getattr(self.launcher, "close", self.launcher.stop)()
            self.launcher = None
        self.client, self._uploads, self.health, self.model_kinds = None, {}, {}, None
        if self.state != DISCONNECTED:
            self._set_state(DISCONNECTED, "")

    def shutdown(self) -> None:
        """Stop everything (application exit)."""
        if self._download is not None and self._download.poll() is None:
            self._download.kill()
        self.stop()

    # ------------------------------------------------------------------ download
    def download(self, python: str, repo_id: str, local_dir: str,
                 env: dict[str, str] | None = None) -> None:
        """Run ``medmvl download REPO_ID --local-dir DIR`` in the worker's interpreter (with
        ``env``, e.g. Slicer's startup environment), with progress events from its output."""
        cmd = [python or sys.executable, "-m", "medmvl_core.cli", "download", repo_id,
               "--local-dir", local_dir]
        self._emit("progress", f"downloading {repo_id}", 0.0)

        def job() -> None:
            # Output goes to a temporary file read as it grows (never a pipe that could fill up
            # while nobody reads it), so the same loop serves threads and the inline Qt runner.
            with tempfile.TemporaryFile() as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env)
                self._download = proc
                tail: list[str] = []
                for line in split_progress(out, proc.poll, self.runner.pause):
                    tail = (tail + [line])[-5:]
                    pct = re.findall(r"(\d{1,3})%", line)
                    self._emit("progress", line[-120:], int(pct[-1]) / 100.0 if pct else None)
            if proc.wait() != 0:
                raise errors.WorkerError(f"download of {repo_id} failed:\n" + "\n".join(tail),
                                         code="download_failed")
            self._emit("progress", f"downloaded {repo_id} to {local_dir}", 1.0)

        self._run("download", job)
