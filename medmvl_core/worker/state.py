"""Everything a running worker holds: the engine (once loaded), volumes, sessions, the queue."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from medmvl_core.worker.jobs import GpuQueue, Job
from medmvl_core.worker.settings import WorkerSettings
from medmvl_core.worker.volumes import VolumeStore

logger = logging.getLogger(__name__)


class WorkerState:
    """status: "loading" until ``set_engine``; "error" when loading failed (``error`` says why)."""

    def __init__(self, settings: WorkerSettings, engine: Any = None):
        self.settings = settings
        self.engine = engine
        self.status = "ready" if engine is not None else "loading"
        self.error: str | None = None
        self.device = str(getattr(engine, "device", "")) if engine is not None else ""
        self.volumes = VolumeStore(settings.volume_store_bytes)
        self.queue = GpuQueue(settings.max_queue, settings.max_batch, self._run_batch)
        self.active: dict[str, Job] = {}
        self.lock = threading.Lock()

    def _run_batch(self, jobs: list[Job]) -> list[Any]:
        """Answer several queued questions together through ``Engine.answer_batch``."""
        results = self.engine.answer_batch([job.request(job) for job in jobs])
        return [r if isinstance(r, BaseException) else job.to_final(job, r)
                for job, r in zip(jobs, results)]

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
