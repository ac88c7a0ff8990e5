"""The worker client over Qt's own networking, for GUI processes that must not depend on Python
threads (3D Slicer's embedded Python). Standard library + numpy + a Qt binding, never torch.

Why: the threaded :class:`~medmvl_core.client.client.WorkerClient` path makes progress only when
the GUI's main thread releases the GIL, which an embedding application (PythonQt in Slicer) is
free not to do while it sits in its event loop. Here every byte moves in Qt's C++ networking
(``QNetworkAccessManager``); Python runs only on the main thread, in short slices, when a reply
signals ``readyRead`` / ``finished`` or a timer fires.

How: :class:`QtConnection` looks like ``http.client.HTTPConnection`` (``request``,
``getresponse``, ``close``) and its response like ``HTTPResponse`` (``status``, ``read``,
``readline``), so :class:`QtWorkerClient` is :class:`WorkerClient` with only the connection
swapped: the same retries, error mapping and SSE parsing. A call waits for its reply in a local
``QEventLoop`` (the GUI keeps repainting and handling clicks, e.g. Cancel), the way Slicer's own
``slicer.cli.runSync`` keeps the application alive while it waits. :class:`InlineJob` runs the
panel controller's jobs this way instead of on threads (``PanelController(runner=QtRunner())``).

The Qt binding is passed in (Slicer's ``qt`` module) or found: ``qt`` when it has
``QNetworkAccessManager`` (Slicer), else ``qtpy`` (the viewer and the tests).
"""

from __future__ import annotations

import http.client
import logging
import socket
import types
from typing import Any, Callable

from medmvl_core.client import errors
from medmvl_core.client.client import WorkerClient
from medmvl_core.client.launcher import WorkerLauncher

logger = logging.getLogger(__name__)

_NAMES = ("QEventLoop", "QTimer", "QUrl", "QByteArray", "QNetworkAccessManager", "QNetworkRequest",
          "QNetworkReply")


def qt_namespace(qt: Any = None) -> types.SimpleNamespace:
    """The Qt classes this module uses, from ``qt`` (a module with all of them, as Slicer's) or,
    when None, from Slicer's ``qt`` if present, else ``qtpy.QtCore`` + ``qtpy.QtNetwork``."""
    if qt is None:
        try:
            import qt as slicer_qt  # type: ignore[import-not-found]  # Slicer's PythonQt

            if hasattr(slicer_qt, "QNetworkAccessManager"):
                qt = slicer_qt
        except ImportError:
            pass
    if qt is not None:
        return types.SimpleNamespace(**{n: getattr(qt, n) for n in _NAMES})
    try:
        from qtpy import QtCore, QtNetwork
    except ImportError as exc:  # no binding at all: say what to install
        raise errors.WorkerError("the Qt transport needs a Qt binding: run inside 3D Slicer, or "
                                 "install the viewer extra (pip install 'medmvl-slicer[viewer]')",
                                 code="no_qt") from exc
    return types.SimpleNamespace(**{n: getattr(QtCore, n, None) or getattr(QtNetwork, n)
                                    for n in _NAMES})


# ---------------------------------------------------------------------- binding differences
def _enum(cls: Any, scope: str, name: str) -> Any:
    """An enum value across bindings: scoped (PyQt6 / PySide6: ``cls.Scope.Name``) or flat
    (PythonQt / PyQt5: ``cls.Name``)."""
    scoped = getattr(cls, scope, None)
    if scoped is not None and hasattr(scoped, name):
        return getattr(scoped, name)
    return getattr(cls, name)


def _connect(obj: Any, signature: str, slot: Callable) -> None:
    """Connect a Qt signal: ``obj.signal.connect`` (PyQt, PySide, PythonQt 3) or PythonQt's
    ``obj.connect("signal()", slot)``."""
    signal = getattr(obj, signature.split("(")[0], None)
    if signal is not None and hasattr(signal, "connect"):
        signal.connect(slot)
    else:
        obj.connect(signature, slot)


def _exec(loop: Any) -> int:
    """Run a local event loop; -1 when it could not run because the application is quitting
    (``QCoreApplication::exit`` makes every later ``QEventLoop::exec`` return -1 at once)."""
    rc = (getattr(loop, "exec_", None) or loop.exec)()
    return rc if isinstance(rc, int) else 0


def _quitting() -> errors.CancelledError:
    return errors.CancelledError("the application is quitting; the request was abandoned")


def _to_bytes(data: Any) -> bytes:
    """A QByteArray (or bytes) as bytes: ``.data()`` is bytes in PythonQt and PySide."""
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    raw = data.data()
    return raw.encode("latin-1") if isinstance(raw, str) else bytes(raw)


def _int(value: Any) -> int:
    """A status attribute (int, or a QVariant in old bindings) as int; 0 when absent."""
    if value is None:
        return 0
    if hasattr(value, "toInt"):
        value = value.toInt()
        value = value[0] if isinstance(value, tuple) else value
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def qt_sleep(seconds: float, qt: types.SimpleNamespace | None = None) -> None:
    """Wait ``seconds`` while the application keeps processing events (a local event loop)."""
    ns = qt or qt_namespace()
    loop, timer = ns.QEventLoop(), ns.QTimer()
    timer.setSingleShot(True)
    _connect(timer, "timeout()", lambda: loop.quit())
    timer.start(max(0, int(seconds * 1000)))
    rc = _exec(loop)
    timer.stop()
    if rc == -1:  # else callers polling with qt_sleep would spin until their deadline
        raise _quitting()


# ---------------------------------------------------------------------- http.client look-alikes
class QtResponse:
    """The part of ``http.client.HTTPResponse`` that :class:`WorkerClient` uses, over a
    ``QNetworkReply``. ``read``/``readline`` wait in a local event loop; a wait longer than the
    connection's timeout raises ``socket.timeout``, a reply that fails mid-body ``OSError``."""

    def __init__(self, conn: "QtConnection"):
        self._conn = conn
        self.status = conn._status
        self.reason = ""

    def getheader(self, name: str, default: str | None = None) -> str | None:
        reply = self._conn._reply
        if reply is None:
            return default
        # rawHeaderPairs() rather than rawHeader(name): the bindings disagree on rawHeader's
        # argument type (PySide6 takes str, PythonQt QByteArray); both return QByteArray pairs.
        wanted = name.lower()
        for key, value in reply.rawHeaderPairs():
            if _to_bytes(key).decode("latin-1").lower() == wanted:
                text = _to_bytes(value).decode("latin-1")
                return text if text else default
        return default

    def read(self, amt: int | None = None) -> bytes:
        """The whole body (``amt`` is accepted for the interface and ignored)."""
        c = self._conn
        c._wait_until(lambda: c._finished)
        c._raise_if_broken()
        data, c._buf = bytes(c._buf), bytearray()
        return data

    def readline(self) -> bytes:
        c = self._conn
        c._wait_until(lambda: b"\n" in c._buf or c._finished)
        i = c._buf.find(b"\n")
        if i >= 0:
            line = bytes(c._buf[:i + 1])
            del c._buf[:i + 1]
            return line
        c._raise_if_broken()
        line, c._buf = bytes(c._buf), bytearray()
        return line

    def close(self) -> None:
        self._conn.close()


class QtConnection:
    """The part of ``http.client.HTTPConnection`` that :class:`WorkerClient` uses, over
    ``QNetworkAccessManager``: one request, its reply buffered as it arrives."""

    def __init__(self, ns: types.SimpleNamespace, manager: Any, base_url: str, timeout: float):
        self._ns, self._manager, self._base, self.timeout = ns, manager, base_url, timeout
        self._reply: Any = None
        self._buf = bytearray()
        self._status = 0
        self._finished = False
        self._error: tuple[int, str] | None = None
        self._loop: Any = None

    # signals (main thread, from the event loop)
    def _wake(self) -> None:
        if self._loop is not None:
            self._loop.quit()

    def _on_ready_read(self) -> None:
        if self._reply is not None:
            self._buf += _to_bytes(self._reply.readAll())
            self._on_meta()
        self._wake()

    def _on_meta(self) -> None:
        if not self._status and self._reply is not None:
            attr = _enum(self._ns.QNetworkRequest, "Attribute", "HttpStatusCodeAttribute")
            self._status = _int(self._reply.attribute(attr))

    def _on_meta_changed(self) -> None:
        self._on_meta()
        self._wake()

    def _on_finished(self) -> None:
        reply = self._reply
        if reply is not None:
            self._buf += _to_bytes(reply.readAll())
            self._on_meta()
            no_error = _enum(self._ns.QNetworkReply, "NetworkError", "NoError")
            if reply.error() != no_error and not self._status:
                self._error = (int(_int(reply.error())), str(reply.errorString()))
            elif reply.error() != no_error and self._status < 400:
                # headers came but the body broke off (worker killed mid-answer)
                self._error = (int(_int(reply.error())), str(reply.errorString()))
        self._finished = True
        self._wake()

    # http.client API
    def request(self, method: str, url: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> None:
        ns = self._ns
        req = ns.QNetworkRequest(ns.QUrl(self._base + url))
        # Python bytes go straight into QByteArray parameters: every binding converts them with
        # their length (PythonQt: PyBytes_AS_STRING + PyBytes_GET_SIZE). QByteArray(bytes) could
        # pick PythonQt's const char* constructor and stop at the first zero byte of a volume.
        for k, v in (headers or {}).items():
            req.setRawHeader(k.encode("latin-1"), v.encode("latin-1"))
        verb = method.encode("ascii")
        if body is None:
            self._reply = self._manager.sendCustomRequest(req, verb)
        else:
            self._reply = self._manager.sendCustomRequest(req, verb, bytes(body))
        _connect(self._reply, "readyRead()", self._on_ready_read)
        _connect(self._reply, "metaDataChanged()", self._on_meta_changed)
        _connect(self._reply, "finished()", self._on_finished)

    def getresponse(self) -> QtResponse:
        self._wait_until(lambda: bool(self._status) or self._finished)
        if self._error is not None and not self._status:
            code, text = self._error
            refused = _enum(self._ns.QNetworkReply, "NetworkError", "ConnectionRefusedError")
            if code == _int(refused):
                raise ConnectionRefusedError(text)
            raise OSError(f"{text} (Qt network error {code})")
        return QtResponse(self)

    def close(self) -> None:
        reply, self._reply = self._reply, None
        if reply is not None:
            if not self._finished:
                reply.abort()
            reply.deleteLater()
        self._finished = True
        self._wake()

    # waiting
    def _wait_until(self, ready: Callable[[], bool]) -> None:
        """Run a local event loop until ``ready()``; no progress for ``timeout`` s raises
        ``socket.timeout`` (the client maps it to WorkerTimeoutError)."""
        ns = self._ns
        while not ready():
            if self._reply is None:
                raise OSError("the connection was closed")
            loop, timer, expired = ns.QEventLoop(), ns.QTimer(), []

            def on_timeout() -> None:
                expired.append(True)
                loop.quit()

            timer.setSingleShot(True)
            _connect(timer, "timeout()", on_timeout)
            self._loop = loop
            timer.start(max(1, int(self.timeout * 1000)))
            try:
                rc = _exec(loop)
            finally:
                self._loop = None
                timer.stop()
            if rc == -1 and not ready():
                self.close()
                raise _quitting()
            if expired and not ready():
                raise socket.timeout(f"no data for {self.timeout:.0f} s")

    def _raise_if_broken(self) -> None:
        if self._error is not None:
            raise http.client.IncompleteRead(bytes(self._buf))


# ---------------------------------------------------------------------- client, launcher, runner
class QtWorkerClient(WorkerClient):
    """:class:`WorkerClient` whose requests go through ``QNetworkAccessManager`` (see the module
    docstring); same methods, same errors. Create and use it on the GUI thread."""

    def __init__(self, url: str, token: str, timeout: float = 30.0, retries: int = 3,
                 retry_delay: float = 0.3, qt: Any = None):
        super().__init__(url, token, timeout=timeout, retries=retries, retry_delay=retry_delay)
        self._ns = qt if isinstance(qt, types.SimpleNamespace) else qt_namespace(qt)
        self._manager = self._ns.QNetworkAccessManager()

    def _connect(self, timeout: float) -> QtConnection:  # type: ignore[override]
        return QtConnection(self._ns, self._manager, self.url, timeout)

    def _pause(self, seconds: float) -> None:
        qt_sleep(seconds, self._ns)  # health polls with the application processing events


class QtWorkerLauncher(WorkerLauncher):
    """:class:`WorkerLauncher` that waits for the worker with the application processing events
    and returns a :class:`QtWorkerClient`."""

    def __init__(self, *args: Any, qt: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._ns = qt if isinstance(qt, types.SimpleNamespace) else qt_namespace(qt)

    def start(self, wait: bool = True) -> WorkerClient:
        if self.running():
            assert self.client is not None
            return self.client
        plain = super().start(wait=False)  # writes the token, starts the process, reads the port
        self.client = QtWorkerClient(plain.url, plain.token, qt=self._ns)
        if wait:
            try:
                self.client.wait_ready(timeout=max(1.0, self.start_timeout))
            except errors.WorkerError:
                self.stop()
                raise
        return self.client

    def _pause(self, seconds: float) -> None:
        qt_sleep(seconds, self._ns)  # ready-file checks with the application processing events


class InlineJob:
    """``threading.Thread``'s ``start``/``is_alive`` for a job run on the calling (GUI) thread:
    ``start()`` returns when the job has finished; ``is_alive()`` is True meanwhile (the panel
    is busy while its waits process events)."""

    def __init__(self, target: Callable[[], None], name: str = "", daemon: bool = True):
        self._target, self.name = target, name
        self._alive = False

    def start(self) -> None:
        self._alive = True
        try:
            self._target()
        finally:
            self._alive = False

    def is_alive(self) -> bool:
        return self._alive

    def join(self, timeout: float | None = None) -> None:
        return None


class QtRunner:
    """How :class:`~medmvl_core.client.controller.PanelController` runs its jobs without Python
    threads: inline on the GUI thread (:class:`InlineJob`), pausing with :func:`qt_sleep`."""

    def __init__(self, qt: Any = None):
        self.qt = qt if isinstance(qt, types.SimpleNamespace) else qt_namespace(qt)

    def job(self, target: Callable[[], None], name: str) -> InlineJob:
        return InlineJob(target, name)

    def pause(self, seconds: float) -> None:
        qt_sleep(seconds, self.qt)

    def client_factory(self, url: str, token: str, timeout: float = 30.0) -> QtWorkerClient:
        return QtWorkerClient(url, token, timeout=timeout, qt=self.qt)

    def launcher_factory(self, base_env: dict[str, str] | None = None) -> Callable[..., WorkerLauncher]:
        def make(**kwargs: Any) -> WorkerLauncher:
            if base_env is not None:
                kwargs.setdefault("base_env", dict(base_env))
            return QtWorkerLauncher(qt=self.qt, **kwargs)
        return make
