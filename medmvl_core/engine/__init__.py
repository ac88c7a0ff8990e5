"""Inference engine: sessions, caches (content-hash keyed), KV reuse, streaming decode, cancel."""

from medmvl_core.engine.engine import Answer, Engine, ImageEntry, Request, input_kind, is_oom
from medmvl_core.engine.session import Session

__all__ = ["Answer", "Engine", "ImageEntry", "Request", "Session", "input_kind", "is_oom"]
