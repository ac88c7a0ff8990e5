"""Content hashes of volumes: the same voxels and geometry always give the same id."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np


def geometry_dict(spacing: Sequence[float], origin: Sequence[float],
                  direction: Any, modality: str) -> dict:
    """The geometry part of a volume's identity, as plain floats (direction flattened 3x3)."""
    return {"spacing": [float(v) for v in spacing], "origin": [float(v) for v in origin],
            "direction": [float(v) for v in np.asarray(direction, dtype=float).reshape(-1)],
            "modality": str(modality)}


def content_hash(array: np.ndarray, geometry: dict) -> str:
    """sha256 over dtype, shape, the raw little-endian bytes and the geometry JSON (hex, 32 chars)."""
    arr = np.ascontiguousarray(array)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    h = hashlib.sha256()
    h.update(json.dumps({"dtype": arr.dtype.name, "shape": list(arr.shape)}).encode())
    h.update(memoryview(arr).cast("B"))
    h.update(json.dumps(geometry, sort_keys=True).encode())
    return h.hexdigest()[:32]


def volume_hash(volume: Any) -> str:
    """Hash of a Volume-like object (``array``, ``spacing``, ``origin``, ``direction``, ``modality``)."""
    geom = geometry_dict(getattr(volume, "spacing", (1.0, 1.0, 1.0)),
                         getattr(volume, "origin", (0.0, 0.0, 0.0)),
                         getattr(volume, "direction", np.eye(3)),
                         getattr(volume, "modality", "") or "")
    return content_hash(np.asarray(volume.array), geom)
