"""The wire protocol shared by the worker and its clients (standard library + numpy, no torch).

One place for what both sides must agree on:

- the SSE codec (``format_sse`` on the worker, ``iter_sse`` in the client);
- the error-code table: each ``code`` the worker sends and its HTTP status (``ERROR_STATUS``);
- the request limits that are part of the contract (JSON body size, box and geometry rules);
- :func:`validate_box`, the one check every task that takes a box goes through — in the worker
  before a question is queued, and in the viewer / Slicer panel before it is sent.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import IO, Iterator, Sequence

from medmvl_core.errors import MedMVLError

API_VERSION = 1
API_PREFIX = "/v1"

#: Error code -> HTTP status. Codes not listed are 400 (a bad request).
ERROR_STATUS: dict[str, int] = {
    "unauthorized": 401,
    "not_found": 404, "unknown_session": 404, "unknown_volume": 404, "unknown_route": 404,
    "method_not_allowed": 405,
    "body_timeout": 408,
    "session_busy": 409,
    "session_evicted": 410, "volume_evicted": 410,
    "too_large": 413,
    "unsupported_media_type": 415,
    "invalid_request": 422,
    "queue_full": 429, "uploads_busy": 429,
    "cancelled": 499,
    "internal": 500,
    "loading": 503, "out_of_memory": 503, "shutting_down": 503,
    "timeout": 504,
}

#: Seconds a client should wait before retrying, sent as ``Retry-After`` with these codes.
RETRY_AFTER_S: dict[str, int] = {"queue_full": 2, "uploads_busy": 2, "loading": 5}

#: Largest JSON request body the worker reads (sessions, messages, cancel); uploads have their own.
MAX_JSON_BODY_BYTES = 64 * 1024

#: Voxel spacing the worker accepts, in mm (1e-4 mm .. 10 m); origins within +-1e7 mm.
SPACING_RANGE_MM = (1e-4, 1e4)
MAX_ABS_ORIGIN_MM = 1e7


def status_for(code: str) -> int:
    """The HTTP status of an error ``code`` (400 when the table does not list it)."""
    return ERROR_STATUS.get(code, 400)


class BoxError(MedMVLError, ValueError):
    """A voxel box that does not describe a non-empty region inside the image."""

    code = "bad_box"


# ---------------------------------------------------------------------------------- boxes
def image_kind(shape: Sequence[int]) -> str:
    """``"image"`` for a 2D image ([1, H, W], [1, H, W, 3] or [H, W]), else ``"image3d"``."""
    shape = tuple(int(v) for v in shape)
    if len(shape) in (2, 4) or (len(shape) == 3 and shape[0] == 1):
        return "image"
    return "image3d"


def validate_box(box: Sequence[float], shape: Sequence[int]) -> list[float]:
    """Check a voxel box against the image it refers to; return it as floats.

    box: 3D ``(k1, j1, i1, k2, j2, i2)``, 2D ``(j1, i1, j2, i2)`` (row, column), start inclusive,
    end exclusive. shape: the uploaded array's shape ([k, j, i], [1, H, W] or [1, H, W, 3]).
    Raises :class:`BoxError` when the box has the wrong length, is not finite, is inverted or
    empty, or reaches outside the image — never reorders or clips (that would answer about a
    region the user did not draw).
    """
    kind = image_kind(shape)
    dims = [int(v) for v in shape]
    if kind == "image":
        dims = dims[-3:-1] if len(dims) == 4 else dims[-2:]
        names, n = ("j", "i"), 4
    else:
        names, n = ("k", "j", "i"), 6
    fmt = "(j1, i1, j2, i2)" if n == 4 else "(k1, j1, i1, k2, j2, i2)"
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError):
        raise BoxError(f"the box must be {n} numbers {fmt}, got {box!r}") from None
    if len(vals) != n:
        raise BoxError(f"a box on this {'image' if n == 4 else 'volume'} has {n} numbers "
                       f"{fmt} in voxels, got {len(vals)}")
    if not all(math.isfinite(v) for v in vals):
        raise BoxError("the box contains NaN or infinity; send voxel indices")
    half = n // 2
    for axis, (lo, hi, size) in enumerate(zip(vals[:half], vals[half:], dims)):
        name = names[axis]
        if lo < 0 or hi > size:
            raise BoxError(f"the box reaches outside the image on axis {name}: {lo:g}..{hi:g}, "
                           f"the image has 0..{size}; draw the region inside the image")
        if not hi > lo:
            raise BoxError(f"the box is empty or inverted on axis {name} ({name}1={lo:g}, "
                           f"{name}2={hi:g}); give start < end")
    return vals


def validate_geometry(spacing: Sequence[float], origin: Sequence[float]) -> None:
    """Spacing within :data:`SPACING_RANGE_MM` and origins within :data:`MAX_ABS_ORIGIN_MM`.

    Raises ``MedMVLError(code="bad_geometry")``; a spacing of 1e300 mm would put boxes at
    absurd positions rather than fail.
    """
    lo, hi = SPACING_RANGE_MM
    for v in spacing:
        if not (math.isfinite(v) and lo <= v <= hi):
            raise MedMVLError(f"spacing values must be between {lo:g} and {hi:g} mm, got {v:g}; "
                              "check the image's header", code="bad_geometry")
    for v in origin:
        if not (math.isfinite(v) and abs(v) <= MAX_ABS_ORIGIN_MM):
            raise MedMVLError(f"origin values must be within +-{MAX_ABS_ORIGIN_MM:g} mm, got {v:g}",
                              code="bad_geometry")


# ---------------------------------------------------------------------------------- SSE
@dataclass
class SSEEvent:
    """One event: ``event`` name (default ``"message"``) and its ``data`` decoded from JSON."""

    event: str
    data: object


def iter_sse(stream: IO[bytes]) -> Iterator[SSEEvent]:
    """Yield events from a byte stream in the text/event-stream format.

    ``data:`` lines are joined with newlines and parsed as JSON (the worker always sends JSON);
    comment lines (``:``) are keep-alives and skipped. Raises ``ValueError`` on a non-JSON
    payload. Ends when the stream ends.
    """
    event, data_lines = "message", []
    while True:
        raw = stream.readline()
        if not raw:
            break
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data_lines:
                yield SSEEvent(event, json.loads("\n".join(data_lines)))
            event, data_lines = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            event = value
        elif field == "data":
            data_lines.append(value)


def format_sse(event: str, data: object) -> bytes:
    """Encode one event (JSON data on one line)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode("utf-8")


def error_event(code: str, message: str) -> dict:
    """The data of an SSE ``error`` event: ``{"code", "message", "status"}``."""
    return {"code": code, "message": message, "status": status_for(code)}
