"""A thread-safe LRU map with a byte budget (preprocessed tensors, encoder outputs)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


class LRUCache(Generic[V]):
    """Keeps entries while the sum of ``sizeof(value)`` stays within ``budget_bytes``.

    Inserting evicts least-recently-used entries until the new one fits; a value larger than
    the whole budget is not stored (``put`` returns False). ``get`` refreshes recency.
    """

    def __init__(self, budget_bytes: int, sizeof: Callable[[V], int]):
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = int(budget_bytes)
        self._sizeof = sizeof
        self._data: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: V) -> bool:
        size = int(self._sizeof(value))
        with self._lock:
            if key in self._data:
                self._used -= self._data.pop(key)[1]
            if size > self.budget_bytes:
                return False
            while self._used + size > self.budget_bytes and self._data:
                _, (_, old) = self._data.popitem(last=False)
                self._used -= old
                self.evictions += 1
            self._data[key] = (value, size)
            self._used += size
            return True

    def pop(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._data.pop(key, None)
            if item is None:
                return None
            self._used -= item[1]
            return item[0]

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._used = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def keys(self) -> list:
        with self._lock:
            return list(self._data.keys())
