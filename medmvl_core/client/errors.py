"""Typed errors raised by :class:`~medmvl_core.client.WorkerClient` (standard library only).

Each HTTP error body of the worker is ``{"error": {"code": str, "message": str}}``; the client
turns it into the subclass registered for that code (or, failing that, for the HTTP status), so
callers can ``except QueueFullError`` rather than parse strings.
"""

from __future__ import annotations

from medmvl_core.errors import MedMVLError


class WorkerError(MedMVLError):
    """Base class of every client-side error. ``status`` is the HTTP status (0 when none);
    ``retry_after``: seconds the worker asked to wait before retrying (``Retry-After``), or None."""

    code = "worker_error"

    def __init__(self, message: str, *, code: str | None = None, status: int = 0):
        super().__init__(message, code=code)
        self.status = status
        self.retry_after: float | None = None


class WorkerUnavailableError(WorkerError):
    """The worker cannot be reached (not started, crashed, wrong URL)."""

    code = "worker_unavailable"


class WorkerConnectionLostError(WorkerUnavailableError):
    """The connection dropped in the middle of an answer (the worker died or was killed)."""

    code = "connection_lost"


class WorkerTimeoutError(WorkerError):
    """No answer within the timeout (client side) or the request hit the worker's time limit."""

    code = "timeout"


class AuthError(WorkerError):
    code = "unauthorized"


class BadRequestError(WorkerError):
    """The worker rejected the input (bad array, geometry, prompt, box...)."""

    code = "bad_request"


class NotFoundError(WorkerError):
    """Unknown volume or session (the worker may have restarted or evicted it)."""

    code = "not_found"


class SessionEvictedError(WorkerError):
    """The worker closed this conversation (HTTP 410): ``code`` is ``session_evicted`` (the
    session cap) or ``volume_evicted`` (its volume left the worker's store). The model no
    longer has the earlier turns: start a new session (upload the volume again)."""

    code = "session_evicted"


class WorkerShuttingDownError(WorkerUnavailableError):
    """The worker is shutting down (SIGTERM, or the program that started it exited)."""

    code = "shutting_down"


class ConflictError(WorkerError):
    """The session is busy with another question."""

    code = "session_busy"


class PayloadTooLargeError(BadRequestError):
    code = "too_large"


class QueueFullError(WorkerError):
    """The worker's queue is full: retry later."""

    code = "queue_full"


class NotReadyError(WorkerError):
    """The worker is still loading the model."""

    code = "loading"


class CancelledError(WorkerError):
    """The answer was cancelled."""

    code = "cancelled"


class WorkerOutOfMemoryError(WorkerError):
    """The worker ran out of GPU memory for this request (others are unaffected)."""

    code = "out_of_memory"


class ServerError(WorkerError):
    code = "internal"


class LaunchError(WorkerError):
    """The local worker process could not be started or did not become ready. ``code``:
    ``launch_failed``, ``bad_argument``, ``bad_workdir`` or ``bad_python``."""

    code = "launch_failed"


_BY_CODE: dict[str, type[WorkerError]] = {
    "unauthorized": AuthError,
    "not_found": NotFoundError,
    "unknown_volume": NotFoundError,
    "unknown_session": NotFoundError,
    "session_busy": ConflictError,
    "session_evicted": SessionEvictedError,
    "volume_evicted": SessionEvictedError,
    "shutting_down": WorkerShuttingDownError,
    "too_large": PayloadTooLargeError,
    "queue_full": QueueFullError,
    "uploads_busy": QueueFullError,
    "loading": NotReadyError,
    "cancelled": CancelledError,
    "timeout": WorkerTimeoutError,
    "out_of_memory": WorkerOutOfMemoryError,
    "internal": ServerError,
}

_BY_STATUS: dict[int, type[WorkerError]] = {
    400: BadRequestError, 401: AuthError, 403: AuthError, 404: NotFoundError,
    409: ConflictError, 410: SessionEvictedError, 413: PayloadTooLargeError, 422: BadRequestError, 429: QueueFullError,
    503: NotReadyError, 504: WorkerTimeoutError,
}


def error_from_response(status: int, code: str | None, message: str) -> WorkerError:
    """Build the typed error for an HTTP error answer (status, body code, body message)."""
    cls = _BY_CODE.get(code or "") or _BY_STATUS.get(status) or (
        ServerError if status >= 500 else BadRequestError)
    return cls(message or f"worker answered HTTP {status}", code=code or cls.code, status=status)
