"""How the panel controller runs its jobs: :class:`ThreadRunner` (daemon threads, the default;
the Slicer module's ``QtRunner`` in :mod:`medmvl_core.client.qt_transport` gives the same
interface), and :func:`split_progress`, which reads a download's output as it grows.
Standard library only.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any, Callable, Iterator


class ThreadRunner:
    """Runs the controller's jobs on daemon threads (``job`` returns an unstarted
    ``threading.Thread``) and pauses with ``time.sleep``. Another runner (``QtRunner``) gives
    objects with the same ``start`` / ``is_alive``."""

    def job(self, target: Callable[[], None], name: str) -> Any:
        return threading.Thread(target=target, name=name, daemon=True)

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)

def split_progress(out, finished: Callable[[], Any], pause: Callable[[float], None],
                    ) -> Iterator[str]:
    """Lines written to the file ``out`` by a running subprocess, also split on carriage returns
    (tqdm redraws), until ``finished()`` returns not None and the file is read to its end."""
    buf, pos = b"", 0
    while True:
        done = finished() is not None  # checked before reading: nothing written after is lost
        out.seek(pos)
        chunk = out.read()
        pos += len(chunk)
        buf += chunk
        parts = re.split(rb"[\r\n]", buf)
        buf = parts.pop()
        for p in parts:
            if p.strip():
                yield p.decode("utf-8", "replace").strip()
        if done:
            break
        if not chunk:
            pause(0.1)
    if buf.strip():
        yield buf.decode("utf-8", "replace").strip()
