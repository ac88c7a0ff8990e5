"""A minimal server-sent-events reader (standard library only)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import IO, Iterator


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
    """Encode one event (server side helper; JSON data on one line)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode("utf-8")
