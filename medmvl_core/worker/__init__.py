"""The HTTP worker process: owns the model, serves the API in :mod:`medmvl_core.worker.app`."""

from medmvl_core.worker.settings import WorkerSettings

__all__ = ["WorkerSettings"]
