"""The GPU queue: one thread runs questions one after another; a bounded number may wait."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from medmvl_core.client.protocol import error_event
from medmvl_core.engine.errors import CancelledError, QueueFullError, RequestTimeoutError
from medmvl_core.errors import MedMVLError

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One question. ``run(job)`` returns the final event's data; ``emit(event, data)`` is
    called from the GPU thread (a thread-safe sink). ``done`` is set before the final or error
    event is emitted, so a client that reacts to it at once finds the session free."""

    session_id: str
    run: Callable[["Job"], dict]
    emit: Callable[[str, dict], None]
    deadline: float
    request: Callable[["Job"], Any] | None = None       # -> engine Request (for batching)
    to_final: Callable[["Job", Any], dict] | None = None  # Answer -> final event data
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None

    def fail(self, exc: BaseException) -> None:
        if isinstance(exc, MedMVLError):
            code, msg = exc.code, str(exc)
        else:
            code, msg = "internal", "internal error while answering; see the worker log"
        self.emit("error", error_event(code, msg))


class GpuQueue:
    """Bounded FIFO served by one daemon thread.

    With ``max_batch > 1`` and a ``batch_runner(jobs) -> list[dict | BaseException]``, jobs
    waiting together are answered in one batch (shared decode steps).
    """

    def __init__(self, max_waiting: int, max_batch: int = 1,
                 batch_runner: Callable[[list[Job]], list[Any]] | None = None):
        self._q: queue.Queue[Job | None] = queue.Queue()
        self.max_waiting = max_waiting
        self.max_batch = max(1, max_batch)
        self.batch_runner = batch_runner
        self._submit_lock = threading.Lock()
        self.running: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="medmvl-gpu", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Enqueue or raise :class:`QueueFullError` (HTTP 429)."""
        with self._submit_lock:
            if self._q.qsize() >= max(self.max_waiting, 0) and (
                    self.running is not None or self._q.qsize() > 0):
                raise QueueFullError(f"the worker's queue is full ({self.max_waiting} waiting); "
                                     "retry shortly")
            self._q.put_nowait(job)

    @property
    def waiting(self) -> int:
        return self._q.qsize()

    def stop(self) -> None:
        self._q.put_nowait(None)

    def _take(self) -> list[Job] | None:
        job = self._q.get()
        if job is None:
            return None
        jobs = [job]
        while self.batch_runner is not None and len(jobs) < self.max_batch:
            try:
                nxt = self._q.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._q.put_nowait(None)  # stop after this batch
                break
            jobs.append(nxt)
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            ready = []
            for job in jobs:
                job.started = time.monotonic()
                if job.cancel.is_set():
                    self._end(job, CancelledError("the answer was cancelled before it started"))
                elif time.monotonic() > job.deadline:
                    self._end(job, RequestTimeoutError(
                        "the request waited in the queue past its time limit; retry when the "
                        "worker is less busy"))
                else:
                    ready.append(job)
            if not ready:
                continue
            self.running = ready[0]
            if len(ready) == 1 or self.batch_runner is None:
                for job in ready:
                    self.running = job
                    try:
                        final = job.run(job)
                    except BaseException as exc:  # noqa: BLE001 - one request never stops the queue
                        self._end(job, exc)
                    else:
                        self._end(job, final)
                continue
            try:
                results = self.batch_runner(ready)
            except BaseException as exc:  # noqa: BLE001
                results = [exc] * len(ready)
            for job, res in zip(ready, results):
                self._end(job, res)

    def _end(self, job: Job, result: Any) -> None:
        """Mark done (so the session is free), then send the final or error event."""
        self.running = None
        job.done.set()
        try:
            self._emit_result(job, result)
        except Exception:  # noqa: BLE001 - a dead listener must not stop the GPU thread
            logger.exception("could not deliver a result")

    @staticmethod
    def _emit_result(job: Job, result: Any) -> None:
        if isinstance(result, BaseException):
            if not isinstance(result, MedMVLError):
                logger.error("request failed: %s", result.__class__.__name__,
                             exc_info=(type(result), result, result.__traceback__))
            else:
                logger.info("request failed: %s", result.code)
            job.fail(result)
        else:
            job.emit("final", result)
