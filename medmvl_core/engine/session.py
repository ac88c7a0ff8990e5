"""A conversation about one image, with the KV cache of everything said so far, and the store
that keeps an engine's conversations."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from medmvl_core.engine.errors import NotFoundError
from medmvl_core.engine.hashing import volume_hash

logger = logging.getLogger(__name__)


@dataclass
class Session:
    """turns: (question text without placeholder, answer text) pairs, oldest first.

    ``past`` holds the KV cache of exactly the token ids ``kv_ids`` (prompt of the last turn +
    the generated tokens fed back), so the next turn prefills only what differs.
    """

    volume: Any
    volume_id: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    turns: list[tuple[str, str]] = field(default_factory=list)
    past: Any = None
    kv_ids: list[int] = field(default_factory=list)
    kv_bytes: int = 0
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def drop_kv(self) -> None:
        """Forget the KV cache (memory pressure or a failed request); history is kept."""
        self.past, self.kv_ids, self.kv_bytes = None, [], 0


def cache_nbytes(past: Any) -> int:
    """Bytes held by a transformers KV cache (DynamicCache of any recent version, or tuples)."""
    if past is None:
        return 0
    total = 0
    layers = getattr(past, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if t is not None and hasattr(t, "numel"):
                    total += t.numel() * t.element_size()
        return total
    seqs = []
    if hasattr(past, "key_cache"):
        seqs = list(past.key_cache) + list(past.value_cache)
    elif isinstance(past, (tuple, list)):
        seqs = [t for layer in past for t in layer]
    for t in seqs:
        if hasattr(t, "numel"):
            total += t.numel() * t.element_size()
    return total


class SessionStore:
    """The engine's conversations: create / get / delete / evict idle ones, and the accounting
    of their KV caches (LRU over sessions within ``kv_cache_bytes``; a session whose cache is
    evicted keeps its history and prefills it again on its next turn). Thread-safe."""

    def __init__(self, kv_cache_bytes: int):
        self.kv_cache_bytes = int(kv_cache_bytes)
        self.sessions: dict[str, Session] = {}
        self._kv_lru: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.sessions)

    def create(self, volume: Any, volume_id: str | None = None,
               session_id: str | None = None) -> Session:
        """Open a conversation about ``volume`` (its content hash is computed unless given)."""
        s = Session(volume=volume, volume_id=volume_id or volume_hash(volume))
        if session_id:
            s.id = session_id
        with self._lock:
            self.sessions[s.id] = s
        return s

    def get(self, session_id: str) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise NotFoundError(f"unknown session {session_id!r}: it was deleted, evicted or never "
                                "created; open a new session for the volume", code="unknown_session")
        return s

    def delete(self, session_id: str) -> None:
        with self._lock:
            s = self.sessions.pop(session_id, None)
            self._kv_lru.pop(session_id, None)
        if s is None:
            raise NotFoundError(f"unknown session {session_id!r}: it was deleted, evicted or never "
                                "created", code="unknown_session")
        s.drop_kv()

    def holds(self, s: Session) -> bool:
        """True when ``s`` is registered here (one-off answers and deleted sessions are not)."""
        return self.sessions.get(s.id) is s

    def evict_idle(self, keep: int) -> int:
        """Delete least-recently-used idle sessions until at most ``keep`` remain; returns how many."""
        removed = 0
        with self._lock:
            idle = sorted((s for s in self.sessions.values() if not s.lock.locked()),
                          key=lambda s: s.last_used)
            while len(self.sessions) > keep and idle:
                victim = idle.pop(0)
                self.sessions.pop(victim.id, None)
                self._kv_lru.pop(victim.id, None)
                victim.drop_kv()
                removed += 1
        return removed

    def kv_bytes_used(self) -> int:
        return sum(self._kv_lru.values())

    def account(self, s: Session) -> None:
        """Count ``s``'s (new) KV cache and evict least-recently-used caches over the budget."""
        s.kv_bytes = cache_nbytes(s.past)
        with self._lock:
            self._kv_lru.pop(s.id, None)
            if s.past is None:
                return
            self._kv_lru[s.id] = s.kv_bytes
            while sum(self._kv_lru.values()) > self.kv_cache_bytes and len(self._kv_lru) > 0:
                victim_id, _ = self._kv_lru.popitem(last=False)
                victim = self.sessions.get(victim_id)
                if victim is not None:
                    victim.drop_kv()
                    logger.info("KV cache of session %s evicted (budget %d bytes)",
                                victim_id[:8], self.kv_cache_bytes)
