"""Helpers for tests that interrupt an answer while it streams from a real worker."""

from __future__ import annotations

import threading
import time

from medmvl_core.client import errors


def ask_in_background(client, session_id: str, **ask_kwargs):
    """Start ``client.ask`` in a thread. Returns (thread, streamed pieces, result), where
    ``result["exc"]`` holds the WorkerError the answer ended with, if any."""
    pieces: list[str] = []
    result: dict = {}

    def ask() -> None:
        try:
            client.ask(session_id, on_token=pieces.append, **ask_kwargs)
        except errors.WorkerError as exc:
            result["exc"] = exc

    thread = threading.Thread(target=ask)
    thread.start()
    return thread, pieces, result


def wait_for_pieces(pieces: list, n: int = 2, timeout: float = 30.0) -> None:
    """Wait until ``n`` pieces have streamed (or ``timeout`` seconds have passed)."""
    deadline = time.monotonic() + timeout
    while len(pieces) < n and time.monotonic() < deadline:
        time.sleep(0.01)
