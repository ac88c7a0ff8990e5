"""Slice display arithmetic for the viewer (numpy only): window/level presets and boxes."""

from __future__ import annotations

import numpy as np

#: name -> (window, level) in the image's units (HU for CT); None = automatic (1st-99th percentile).
WL_PRESETS: dict[str, tuple[float, float] | None] = {
    "Auto": None,
    "Lung": (1500.0, -600.0),
    "Soft tissue": (400.0, 40.0),
    "Bone": (1800.0, 400.0),
    "Brain": (80.0, 40.0),
}


def auto_window(array: np.ndarray) -> tuple[float, float]:
    """(window, level) spanning the 1st-99th percentile of the array."""
    a = np.asarray(array, dtype=np.float64)
    lo, hi = np.percentile(a, [1.0, 99.0]) if a.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return float(hi - lo), float((hi + lo) / 2.0)


def to_display(slice_2d: np.ndarray, window: float | None = None, level: float | None = None
               ) -> np.ndarray:
    """A slice [H, W] (grey, windowed) or [H, W, 3] (RGB, shown as is) -> uint8 [H, W, 3]."""
    s = np.asarray(slice_2d)
    if s.ndim == 3 and s.shape[-1] == 3:
        if s.dtype == np.uint8:
            return np.ascontiguousarray(s)
        return np.ascontiguousarray(np.clip(s, 0, 255).astype(np.uint8))
    if s.ndim != 2:
        raise ValueError(f"a slice is [H, W] or [H, W, 3], got shape {s.shape}")
    if window is None or level is None:
        window, level = auto_window(s)
    lo = level - window / 2.0
    g = np.clip((s.astype(np.float64) - lo) / max(window, 1e-6), 0.0, 1.0)
    g8 = (g * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(g8[:, :, None], 3, axis=2))


def drag_to_voxel_box(start_ij: tuple[float, float], end_ij: tuple[float, float], k: int,
                      depth: int, shape: tuple[int, ...]) -> tuple[int, int, int, int, int, int]:
    """A mouse drag (continuous (i, j) indices) on slice ``k`` -> voxel box
    ``(k1, j1, i1, k2, j2, i2)`` spanning ``k - depth .. k + depth`` slices, clipped, >= 1 voxel."""
    nk, nj, ni = int(shape[0]), int(shape[1]), int(shape[2])
    i_lo, i_hi = sorted((start_ij[0], end_ij[0]))
    j_lo, j_hi = sorted((start_ij[1], end_ij[1]))
    i1 = int(np.clip(np.floor(i_lo), 0, ni - 1))
    j1 = int(np.clip(np.floor(j_lo), 0, nj - 1))
    i2 = int(np.clip(np.ceil(i_hi), i1 + 1, ni))
    j2 = int(np.clip(np.ceil(j_hi), j1 + 1, nj))
    k1 = max(0, k - max(0, depth))
    k2 = min(nk, k + max(0, depth) + 1)
    return (k1, j1, i1, k2, j2, i2)
