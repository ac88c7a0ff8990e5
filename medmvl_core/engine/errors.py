"""Errors of the engine and the worker (no torch import). ``code`` goes into HTTP error bodies."""

from __future__ import annotations

from medmvl_core.errors import MedMVLError


class RequestError(MedMVLError, ValueError):
    """The request is malformed or out of limits (HTTP 400)."""

    code = "bad_request"


class NotFoundError(MedMVLError, KeyError):
    """Unknown volume or session (HTTP 404)."""

    code = "not_found"

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


class SessionBusyError(MedMVLError):
    """A session answers one question at a time (HTTP 409)."""

    code = "session_busy"


class QueueFullError(MedMVLError):
    """The GPU queue is full (HTTP 429)."""

    code = "queue_full"


class CancelledError(MedMVLError):
    """The answer was cancelled by the user."""

    code = "cancelled"


class RequestTimeoutError(MedMVLError):
    """The request exceeded its time limit (HTTP 504)."""

    code = "timeout"


class EngineOutOfMemoryError(MedMVLError):
    """The device ran out of memory during this request; the worker keeps serving others."""

    code = "out_of_memory"
