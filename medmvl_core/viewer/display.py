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


#: sliced array axis -> (row axis, column axis) of the displayed plane: axial k -> (j, i),
#: coronal j -> (k, i), sagittal i -> (k, j).
PLANES: dict[int, tuple[int, int]] = {0: (1, 2), 1: (0, 2), 2: (0, 1)}


def plane_image(array: np.ndarray, axis: int, index: int, flip_rows: bool = False) -> np.ndarray:
    """The plane ``index`` across ``axis`` of [k, j, i(, 3)] as [rows, columns(, 3)]; rows
    reversed with ``flip_rows`` (coronal / sagittal: the last slice, superior, on top)."""
    sl = [slice(None)] * 3
    sl[axis] = int(index)
    plane = np.asarray(array)[tuple(sl)]
    return plane[::-1] if flip_rows else plane


def box_in_plane(box, axis: int, index: int):
    """The ((c1, r1), (c2, r2)) edges of a voxel box ``(k1, j1, i1, k2, j2, i2)`` in the plane
    ``index`` across ``axis``, or None when the plane misses the box."""
    lo, hi = box[:3], box[3:]
    if not lo[axis] <= index < hi[axis]:
        return None
    r_axis, c_axis = PLANES[axis]
    return (lo[c_axis], lo[r_axis]), (hi[c_axis], hi[r_axis])


def drag_to_box(start_cr: tuple[float, float], end_cr: tuple[float, float], axis: int, index: int,
                depth: int, shape: tuple[int, ...]) -> tuple[int, int, int, int, int, int]:
    """A drag (continuous (column, row) plane coordinates) on plane ``index`` across ``axis`` ->
    voxel box ``(k1, j1, i1, k2, j2, i2)`` spanning ``index - depth .. index + depth`` across
    the plane, clipped, at least one voxel on every axis."""
    r_axis, c_axis = PLANES[axis]
    lo, hi = [0, 0, 0], [0, 0, 0]
    for ax, (a, b) in ((c_axis, (start_cr[0], end_cr[0])), (r_axis, (start_cr[1], end_cr[1]))):
        n = int(shape[ax])
        s, e = sorted((a, b))
        lo[ax] = int(np.clip(np.floor(s), 0, n - 1))
        hi[ax] = int(np.clip(np.ceil(e), lo[ax] + 1, n))
    lo[axis] = max(0, int(index) - max(0, depth))
    hi[axis] = min(int(shape[axis]), int(index) + max(0, depth) + 1)
    return (lo[0], lo[1], lo[2], hi[0], hi[1], hi[2])


def choose_preset(array: np.ndarray, modality: str) -> str:
    """The window preset an image opens in: a chest CT (much aerated lung inside the body) in
    "Lung", a head CT (skull around brain-density tissue, little lung-density air) in "Brain",
    other CT in "Soft tissue", anything else (MR, X-ray, photos) in "Auto". An image without a
    modality (NIfTI, NRRD) counts as CT when its values reach down to air in HU."""
    a = np.asarray(array)
    if a.ndim != 3 or a.shape[0] < 2:
        return "Auto"
    # NIfTI / NRRD carry no modality: values down to air (-1000) are Hounsfield units.
    looks_ct = modality == "CT" or (modality in ("", "unknown") and float(a.min()) < -500)
    if not looks_ct:
        return "Auto"
    v = a[:, ::2, ::2].astype(np.float32)  # a quarter of the voxels is plenty for fractions
    inside = v > -950  # outside air excluded
    n = max(int(inside.sum()), 1)
    lung = float(((v > -950) & (v < -600)).sum()) / n
    bone = float((v > 300).sum()) / n
    brain = float(((v > 0) & (v < 80)).sum()) / n
    if lung > 0.10:
        return "Lung"
    if bone > 0.05 and brain > 0.25:
        return "Brain"
    return "Soft tissue"


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
