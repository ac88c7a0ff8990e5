"""Run the worker: bind (port 0 = any free port), write the ready file, serve with uvicorn.

Shutdown (SIGTERM, Ctrl-C, or the death of the parent process given as ``parent_pid``) first
ends every running answer with a final ``shutting_down`` error event, then lets uvicorn close.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
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


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (never signals it)."""
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate the process on Windows
        import ctypes
        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x00100000, False, pid)  # SYNCHRONIZE
        if not handle:
            return False
        try:
            return kernel32.WaitForSingleObject(handle, 0) != 0  # 0 = signalled = exited
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch_parent(parent_pid: int, on_death: Callable[[], None], poll_s: float = 0.5) -> threading.Thread:
    """Call ``on_death()`` once when ``parent_pid`` exits (or this process is re-parented away
    from it). A polling thread rather than ``PR_SET_PDEATHSIG``: that signal fires when the
    *thread* that started the worker ends, which in the GUIs is a short-lived helper thread."""
    direct = os.getppid() == parent_pid

    def loop() -> None:
        while process_alive(parent_pid) and not (direct and os.getppid() != parent_pid):
            time.sleep(poll_s)
        logger.warning("the process that started this worker (pid %d) is gone; shutting down",
                       parent_pid)
        on_death()
    t = threading.Thread(target=loop, name="medmvl-parent-watch", daemon=True)
    t.start()
    return t


def _server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server that first tells running streams it is shutting down."""

        on_exit: Callable[[], None] | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:  # signal handler, event-loop thread
            if self.on_exit is not None and not self.should_exit:
                self.on_exit()
            super().handle_exit(sig, frame)

    return GracefulServer


class WorkerServer:
    """A worker bound to a socket; ``run()`` blocks, ``start_in_thread()`` for tests.

    ssl_certfile / ssl_keyfile: serve HTTPS (uvicorn's TLS). Bound off-host without them, the
    worker warns: the token would cross the network in clear (put a TLS reverse proxy in front
    or pass the certificate). parent_pid: shut down when that process exits.
    """

    def __init__(self, settings: WorkerSettings, host: str = "127.0.0.1", port: int = 0,
                 loader: Callable[[], Any] | None = None, engine: Any = None,
                 ready_file: Path | None = None, log_level: str = "warning",
                 ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
                 parent_pid: int | None = None):
        if bool(ssl_certfile) != bool(ssl_keyfile):
            raise ConfigError("give both --ssl-certfile and --ssl-keyfile (or neither)")
        self.state = WorkerState(settings, engine)
        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        scheme = "https" if ssl_certfile else "http"
        self.url = f"{scheme}://{host if ':' not in host else '[' + host + ']'}:{self.port}"
        self._ssl = {"ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile} if ssl_certfile else {}
        self._parent_pid = parent_pid
        self._loader = loader
        self._ready_file = ready_file
        self._log_level = log_level
        if not is_loopback(host) and not ssl_certfile:
            logger.warning("the worker listens on %s without TLS: the token and the images cross "
                           "the network in clear. Put it behind a TLS reverse proxy, or pass "
                           "--ssl-certfile/--ssl-keyfile", host)
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
        if self._parent_pid is not None:
            watch_parent(self._parent_pid, self.request_exit)
        yield
        self.state.queue.stop()

    def _make_server(self):
        import uvicorn
        config = uvicorn.Config(self.app, log_level=self._log_level, access_log=False,
                                timeout_graceful_shutdown=2, lifespan="on", **self._ssl)
        self._server = _server_class()(config)
        self._server.on_exit = self._on_exit
        return self._server

    def _on_exit(self) -> None:
        """From the signal handler or the parent watchdog: end running answers (``shutting_down``)."""
        self.state.begin_shutdown()

    def request_exit(self) -> None:
        """Shut down as on SIGTERM (from any thread)."""
        # handle_exit only sets flags and begin_shutdown posts to the loop thread-safely
        if self._server is not None:
            self._server.handle_exit(signal.SIGTERM, None)

    def run(self) -> None:
        self._make_server().run(sockets=[self.sock])

    def start_in_thread(self, timeout: float = 30.0) -> "WorkerServer":
        server = self._make_server()
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [self.sock]},
                                        name="medmvl-uvicorn", daemon=True)
        self._thread.start()
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
