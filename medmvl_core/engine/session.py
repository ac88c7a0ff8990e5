"""A conversation about one image, with the KV cache of everything said so far."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


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
