"""Validation of uploaded arrays and geometry, and the in-memory volume store (the owner of
uploaded arrays' memory)."""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from medmvl_core.client.protocol import validate_geometry
from medmvl_core.engine.errors import NotFoundError, RequestError
from medmvl_core.engine.hashing import content_hash, geometry_dict
from medmvl_core.errors import MedMVLError

logger = logging.getLogger(__name__)

ALLOWED_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")


@dataclass
class SimpleVolume:
    """Used only when ``medmvl_core.imaging.Volume`` is unavailable (same fields)."""

    array: np.ndarray
    spacing: tuple
    origin: tuple
    direction: np.ndarray
    modality: str = "CT"
    source: str = "upload"


def make_volume(array: np.ndarray, spacing, origin, direction, modality: str) -> Any:
    """A ``medmvl_core.imaging.Volume`` (or the same-shaped fallback)."""
    kwargs = dict(array=array, spacing=tuple(spacing), origin=tuple(origin),
                  direction=np.asarray(direction, dtype=float).reshape(3, 3), modality=modality)
    try:
        from medmvl_core.imaging import Volume
        try:
            return Volume(**kwargs, source="upload")
        except TypeError:
            return Volume(**kwargs)
    except (ImportError, TypeError):
        return SimpleVolume(**kwargs)


def _floats(meta: dict, key: str, n: int) -> list[float]:
    vals = meta.get(key)
    if not isinstance(vals, list) or len(vals) != n:
        raise RequestError(f"'{key}' must be a list of {n} numbers", code="bad_geometry")
    try:
        out = [float(v) for v in vals]
    except (TypeError, ValueError, OverflowError):
        raise RequestError(f"'{key}' must contain numbers only", code="bad_geometry") from None
    if not all(math.isfinite(v) for v in out):
        raise RequestError(f"'{key}' contains NaN or infinity", code="bad_geometry")
    return out


def parse_meta(header: str | None) -> dict:
    """Parse and check the ``X-MedMVL-Meta`` JSON header of an upload."""
    if not header:
        raise RequestError("missing X-MedMVL-Meta header: JSON with dtype, shape, spacing, "
                           "origin, direction, modality", code="missing_meta")
    try:
        meta = json.loads(header)
    except ValueError:
        raise RequestError("X-MedMVL-Meta is not valid JSON", code="malformed_json") from None
    if not isinstance(meta, dict):
        raise RequestError("X-MedMVL-Meta must be a JSON object", code="malformed_json")
    dtype = meta.get("dtype")
    if dtype not in ALLOWED_DTYPES:
        raise RequestError(f"dtype {dtype!r} is not accepted; use one of {', '.join(ALLOWED_DTYPES)}",
                           code="bad_dtype")
    shape = meta.get("shape")
    if (not isinstance(shape, list) or not 2 <= len(shape) <= 4
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        raise RequestError("shape must be 2 to 4 positive integers: [k, j, i] for a volume, "
                           "[1, H, W] or [1, H, W, 3] for an image", code="bad_shape")
    if len(shape) == 4 and shape[-1] not in (3, 4):
        raise RequestError("a 4-D shape must be [1, H, W, 3] (RGB)", code="bad_shape")
    spacing = _floats(meta, "spacing", 3)
    origin = _floats(meta, "origin", 3)
    try:
        validate_geometry(spacing, origin)
    except MedMVLError as exc:
        raise RequestError(str(exc), code="bad_geometry") from None
    direction = _floats(meta, "direction", 9)
    if not all(abs(v) <= 1e3 for v in direction) or abs(
            np.linalg.det(np.asarray(direction).reshape(3, 3))) < 1e-6:
        raise RequestError("direction must be an invertible 3x3 matrix (9 numbers, columns = axes)",
                           code="bad_geometry")
    modality = meta.get("modality", "CT")
    if not isinstance(modality, str) or len(modality) > 16:
        raise RequestError("modality must be a short string such as 'CT', 'MR', 'XR'",
                           code="bad_geometry")
    return {"dtype": dtype, "shape": shape, "spacing": spacing, "origin": origin,
            "direction": direction, "modality": modality}


def meta_nbytes(meta: dict) -> int:
    """Bytes the body of an upload with this meta must have (exact: Python integers, so a shape
    whose element count overflows 64 bits is just a very large number)."""
    return math.prod(meta["shape"]) * np.dtype(meta["dtype"]).itemsize


def array_from_bytes(data: Any, meta: dict) -> np.ndarray:
    """View ``data`` (bytes or any buffer: no copy) as the array; checks byte count and
    finiteness. Returns a read-only array."""
    dt = np.dtype(meta["dtype"]).newbyteorder("<")
    expected = meta_nbytes(meta)
    got = memoryview(data).nbytes
    if got != expected:
        raise RequestError(f"body has {got} bytes but dtype {meta['dtype']} x shape "
                           f"{meta['shape']} needs {expected}", code="shape_mismatch")
    arr = np.frombuffer(data, dtype=dt).reshape(meta["shape"])
    arr.flags.writeable = False
    # slab by slab: the temporary mask stays small even for a 1 GB float volume
    if arr.dtype.kind == "f" and not all(np.isfinite(s).all() for s in arr.reshape(arr.shape[0], -1)):
        raise RequestError("the array contains NaN or infinite values; replace them "
                           "(e.g. with the background value) before uploading", code="non_finite")
    if arr.ndim == 2:
        arr = arr[None]
    return arr


class VolumeStore:
    """Uploaded volumes by content id, LRU within a byte budget — the one owner of their memory.

    ``on_drop(volume_id)`` is called after a volume leaves the store (deleted or evicted), so
    whoever referred to it (sessions) lets it go too.
    """

    def __init__(self, budget_bytes: int, on_drop: Callable[[str], None] | None = None):
        self.budget_bytes = int(budget_bytes)
        self._data: OrderedDict[str, Any] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self._on_drop = on_drop

    @staticmethod
    def _nbytes(vol: Any) -> int:
        return int(np.asarray(vol.array).nbytes)

    def add(self, data: Any, meta: dict) -> tuple[str, bool]:
        """Store (idempotent); returns (id, created). ``data``: the body (bytes or a buffer,
        kept without a copy)."""
        arr = array_from_bytes(data, meta)
        vid = content_hash(arr, geometry_dict(meta["spacing"], meta["origin"], meta["direction"],
                                              meta["modality"]))
        size = int(arr.nbytes)
        if size > self.budget_bytes:
            raise RequestError("the volume is larger than the worker's volume store; start the "
                               "worker with a larger store or downsample", code="too_large")
        dropped = []
        with self._lock:
            if vid in self._data:
                self._data.move_to_end(vid)
                return vid, False
            while self._used + size > self.budget_bytes and self._data:
                old_id, old = self._data.popitem(last=False)
                self._used -= self._nbytes(old)
                dropped.append(old_id)
            vol = make_volume(arr, meta["spacing"], meta["origin"], meta["direction"],
                              meta["modality"])
            self._data[vid] = vol
            self._used += size
        for old_id in dropped:
            self._dropped(old_id)
        return vid, True

    def _dropped(self, vid: str) -> None:
        logger.info("volume %s left the store", vid[:8])
        if self._on_drop is not None:
            self._on_drop(vid)

    def get(self, vid: str) -> Any:
        with self._lock:
            vol = self._data.get(vid)
            if vol is not None:
                self._data.move_to_end(vid)
        if vol is None:
            raise NotFoundError(f"unknown volume {vid!r}: upload it first (POST /v1/volumes)",
                                code="unknown_volume")
        return vol

    def delete(self, vid: str) -> None:
        with self._lock:
            vol = self._data.pop(vid, None)
            if vol is not None:
                self._used -= self._nbytes(vol)
        if vol is None:
            raise NotFoundError(f"unknown volume {vid!r}", code="unknown_volume")
        del vol
        self._dropped(vid)

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._data)
