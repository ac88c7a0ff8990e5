"""Data for large corpora: a lazily read JSON Lines index, per-rank shards that never duplicate or
drop an item, and an on-disk cache of preprocessed tensors shared by every rank and worker.

A corpus of tens of thousands of CT volumes is read as ``.jsonl`` through :class:`JsonlIndex`
(one pass records the byte offset of each line; a row is parsed when it is asked for), and each
volume is preprocessed once: :class:`PixelCache` stores the model-ready array as a ``.npy`` file
keyed by the source file (path, size, modification time) and the preprocessing spec, written to a
temporary name and renamed into place (atomic: ranks and loader workers may race on the same key,
a reader never sees a partial file). Later epochs and other ranks read it memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from medmvl_core.errors import DataError

logger = logging.getLogger(__name__)


class JsonlIndex(Sequence):
    """The rows of a JSON Lines file, parsed on access. Holds one int64 offset per row.

    ``len(index)`` is the number of non-empty lines; ``index[i]`` parses row ``i``. Raises
    :class:`DataError` naming the line when a row is not valid JSON.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"data file {self.path} does not exist; check data.datasets[].path")
        offsets = []
        pos = 0
        with open(self.path, "rb") as fh:
            for line in fh:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        self.offsets = np.asarray(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        with open(self.path, "rb") as fh:
            fh.seek(int(self.offsets[i]))
            line = fh.readline()
        try:
            return json.loads(line)
        except ValueError as exc:
            raise DataError(f"{self.path}: row {i} (byte {int(self.offsets[i])}) is not valid JSON ({exc})") from None

    def __iter__(self) -> Iterator[Any]:
        with open(self.path, "rb") as fh:  # sequential: one open, no seeks
            for n, line in enumerate(fh):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError as exc:
                        raise DataError(f"{self.path}: line {n + 1} is not valid JSON ({exc})") from None


def shard(n: int, world: int, rank: int) -> range:
    """Indices ``0..n-1`` of process ``rank`` of ``world``: contiguous, sizes differ by at most one,
    every index in exactly one shard (none dropped, none duplicated)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world} process(es)")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def spec_digest(spec: Any) -> str:
    """A short stable hash of a preprocessing spec (any JSON-serialisable value)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


class PixelCache:
    """Preprocessed arrays on disk: ``root/<spec digest>/<key[:2]>/<key>.npy``.

    ``key_for(path, spec, kind)`` names a source file by its resolved path, size and modification
    time (no read of the file: a hit costs one ``stat`` and a memory map), so an edited file gets a
    new entry; entries of another spec never collide. Writes are atomic (temporary file + rename),
    so concurrent ranks and loader workers can share one folder.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hits = self.misses = 0

    @staticmethod
    def key_for(path: str | Path, spec: Any, kind: str) -> str:
        p = Path(path).resolve()
        st = p.stat()
        h = hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}|{kind}".encode())
        return f"{spec_digest(spec)}/{h.hexdigest()}"

    def _file(self, key: str) -> Path:
        spec, name = key.split("/", 1)
        return self.root / spec / name[:2] / f"{name}.npy"

    def get(self, key: str) -> Optional[np.ndarray]:
        """The cached array (memory-mapped, read-only) or None."""
        f = self._file(key)
        try:
            arr = np.load(f, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            self.misses += 1
            return None
        except ValueError as exc:  # a corrupt entry (e.g. disk full): recompute rather than fail
            logger.warning("pixel cache entry %s is unreadable (%s); recomputing it", f, exc)
            self.misses += 1
            return None
        self.hits += 1
        return arr

    def put(self, key: str, array: np.ndarray) -> None:
        f = self._file(key)
        f.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=f.parent, prefix=f".{f.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
            os.replace(tmp, f)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
