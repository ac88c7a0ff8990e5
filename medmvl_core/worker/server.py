"""Run the worker: bind (port 0 = any free port), write the ready file, serve with uvicorn."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable

from medmvl_core.errors import ConfigError
from medmvl_core.worker.app import create_app
from medmvl_core.worker.settings import WorkerSettings, is_loopback, read_or_create_token  # noqa: F401
from medmvl_core.worker.state import WorkerState

logger = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc}); use --port 0 for any free port"
                          ) from exc
    sock.listen(128)
    return sock


def write_ready_file(path: Path, info: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh)
    os.replace(tmp, path)


class WorkerServer:
    """A worker bound to a socket; ``run()`` blocks, ``start_in_thread()`` for tests."""

    def __init__(self, settings: WorkerSettings, host: str = "127.0.0.1", port: int = 0,
                 loader: Callable[[], Any] | None = None, engine: Any = None,
                 ready_file: Path | None = None, log_level: str = "warning"):
        self.state = WorkerState(settings, engine)
        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host if ':' not in host else '[' + host + ']'}:{self.port}"
        self._loader = loader
        self._ready_file = ready_file
        self._log_level = log_level
        self.app = create_app(self.state)
        self.app.router.lifespan_context = self._lifespan
        self._server = None
        self._thread: threading.Thread | None = None

    @asynccontextmanager
    async def _lifespan(self, _app):
        if self._loader is not None and self.state.engine is None:
            self.state.load_in_background(self._loader)
        if self._ready_file is not None:
            write_ready_file(self._ready_file, {"url": self.url, "host": self.host,
                                                "port": self.port, "pid": os.getpid(),
                                                "token": self.state.settings.token})
        logger.info("worker listening on %s", self.url)
        yield
        self.state.queue.stop()

    def _make_server(self):
        import uvicorn
        config = uvicorn.Config(self.app, log_level=self._log_level, access_log=False,
                                timeout_graceful_shutdown=2, lifespan="on")
        self._server = uvicorn.Server(config)
        return self._server

    def run(self) -> None:
        self._make_server().run(sockets=[self.sock])

    def start_in_thread(self, timeout: float = 30.0) -> "WorkerServer":
        server = self._make_server()
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [self.sock]},
                                        name="medmvl-uvicorn", daemon=True)
        self._thread.start()
        import time
        deadline = time.monotonic() + timeout
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the in-process worker did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.sock.close()
