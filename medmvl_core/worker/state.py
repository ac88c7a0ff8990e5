"""Everything a running worker holds: the engine (once loaded), volumes, sessions, the queue.

Memory has one owner per kind: the volume store owns the uploaded arrays (a session refers to
its volume only while the store keeps it: when the store deletes or evicts a volume, the
sessions on it are closed and answer ``volume_evicted``), the engine owns the KV caches and the
encoded images. Sessions closed by the session cap answer ``session_evicted``.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, Callable

from medmvl_core.client.protocol import error_event
from medmvl_core.engine.errors import NotFoundError, RequestError
from medmvl_core.errors import MedMVLError
from medmvl_core.worker.jobs import GpuQueue, Job
from medmvl_core.worker.settings import WorkerSettings
from medmvl_core.worker.volumes import VolumeStore

logger = logging.getLogger(__name__)

#: How many closed session ids are remembered, to answer 410 instead of 404.
EVICTED_MEMORY = 4096

_EVICTED_MESSAGES = {
    "session_evicted": "this conversation was closed by the worker: it keeps at most {cap} "
                       "sessions and this one was the least recently used; start a new "
                       "session (the model no longer has the earlier turns)",
    "volume_evicted": "this conversation's volume was deleted from the worker or evicted from "
                      "its volume store ({budget} bytes); upload the volume again and start a "
                      "new session (the model no longer has the earlier turns)",
}


class WorkerState:
    """status: "loading" until ``set_engine``; "error" when loading failed (``error`` says why);
    "shutting_down" once a shutdown began."""

    def __init__(self, settings: WorkerSettings, engine: Any = None):
        self.settings = settings
        self.engine = engine
        self.status = "ready" if engine is not None else "loading"
        self.error: str | None = None
        self.device = str(getattr(engine, "device", "")) if engine is not None else ""
        self.volumes = VolumeStore(settings.volume_store_bytes, on_drop=self._volume_dropped)
        self.queue = GpuQueue(settings.max_queue, settings.max_batch, self._run_batch)
        self.active: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.evicted: OrderedDict[str, str] = OrderedDict()  # session id -> code
        self.shutting_down = False
        self.upload_bytes_in_flight = 0  # changed in the event loop only

    def _run_batch(self, jobs: list[Job]) -> list[Any]:
        """Answer several queued questions together through ``Engine.answer_batch``."""
        requests, out = [], [None] * len(jobs)
        for i, job in enumerate(jobs):
            try:
                requests.append((i, job.request(job)))
            except MedMVLError as exc:  # e.g. the volume went away while it waited
                out[i] = exc
        results = self.engine.answer_batch([r for _, r in requests]) if requests else []
        for (i, _), r in zip(requests, results):
            out[i] = r if isinstance(r, BaseException) else jobs[i].to_final(jobs[i], r)
        return out

    def set_engine(self, engine: Any) -> None:
        self.engine = engine
        self.device = str(engine.device)
        self.status = "ready"

    def load_in_background(self, loader: Callable[[], Any]) -> threading.Thread:
        """Run ``loader()`` (returns an Engine) in a thread; health says loading meanwhile."""
        def work() -> None:
            try:
                self.set_engine(loader())
                logger.info("model loaded on %s", self.device)
            except BaseException as exc:  # noqa: BLE001 - reported through /v1/health
                logger.exception("model failed to load")
                self.error = f"{exc.__class__.__name__}: {exc}"
                self.status = "error"
        t = threading.Thread(target=work, name="medmvl-load", daemon=True)
        t.start()
        return t

    # ------------------------------------------------------------------ sessions
    def _remember_evicted(self, sid: str, code: str) -> None:
        with self.lock:
            self.evicted[sid] = code
            while len(self.evicted) > EVICTED_MEMORY:
                self.evicted.popitem(last=False)

    def evicted_error(self, sid: str) -> MedMVLError | None:
        code = self.evicted.get(sid)
        if code is None:
            return None
        return MedMVLError(_EVICTED_MESSAGES[code].format(
            cap=self.settings.max_sessions, budget=self.settings.volume_store_bytes), code=code)

    def session(self, sid: str) -> Any:
        """The engine's session ``sid``; 410 when the worker closed it, 404 when never known."""
        try:
            return self.engine.get_session(sid)
        except NotFoundError:
            err = self.evicted_error(sid)
            if err is not None:
                raise err from None
            raise NotFoundError(f"unknown session {sid!r}: the worker may have restarted; create "
                                "a new session", code="unknown_session") from None

    def open_session(self, volume_id: str) -> Any:
        """A new session on a stored volume; past ``max_sessions`` the least recently used idle
        session is closed (and answers ``session_evicted`` from then on)."""
        eng, cap = self.engine, self.settings.max_sessions
        vol = self.volumes.get(volume_id)
        if len(eng.sessions) >= cap:
            before = set(eng.sessions)
            eng.evict_idle_sessions(cap - 1)
            for sid in before - set(eng.sessions):
                self._remember_evicted(sid, "session_evicted")
                logger.info("session %s closed by the session cap (%d)", sid[:8], cap)
        if len(eng.sessions) >= cap:
            raise RequestError(f"too many sessions ({cap}) are answering; retry later",
                               code="too_many_sessions")
        return eng.create_session(vol, volume_id=volume_id)

    def delete_session(self, sid: str) -> None:
        self.session(sid)  # 410 / 404 as for any other use
        job = self.active.get(sid)
        if job is not None:
            job.cancel.set()
        self.engine.delete_session(sid)

    def _volume_dropped(self, vid: str) -> None:
        """The store let a volume go: close the sessions on it, so nothing keeps it alive."""
        eng = self.engine
        if eng is None:
            return
        for s in [s for s in list(eng.sessions.values()) if s.volume_id == vid]:
            try:
                eng.delete_session(s.id)
            except NotFoundError:
                continue
            self._remember_evicted(s.id, "volume_evicted")
            logger.info("session %s closed: its volume %s left the store", s.id[:8], vid[:8])

    # ------------------------------------------------------------------ shutdown
    def begin_shutdown(self) -> None:
        """Refuse new questions and end every running or queued answer with a final
        ``shutting_down`` error event (called on SIGTERM or parent death; thread-safe)."""
        self.shutting_down = True
        self.status = "shutting_down"
        # no lock: this may run in a signal handler that interrupted a holder of ``self.lock``
        jobs = list(self.active.values())
        for job in jobs:
            if not job.done.is_set():
                job.cancel.set()
                job.emit("error", error_event(
                    "shutting_down", "the worker is shutting down; this answer was stopped — "
                                     "restart the worker and ask again"))
        logger.info("shutting down: %d answer(s) stopped", len(jobs))
