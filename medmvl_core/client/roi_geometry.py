"""ROI and volume geometry between Slicer's RAS world and the worker's voxel boxes.

Pure numpy (no Slicer, no VTK, no torch), so the Slicer module and the standalone viewer share it.

Conventions:

- A volume array is indexed ``[k, j, i]`` (slice, row, column); 2D images are ``[1, H, W]``
  (or ``[1, H, W, 3]``).
- ``ijk_to_ras`` is a 4x4 matrix mapping homogeneous ``(i, j, k, 1)`` to RAS millimetres
  (Slicer's ``GetIJKToRASMatrix`` composed with any parent transform to world).
- The worker speaks LPS (``spacing``/``origin`` in ``(i, j, k)`` order, ``direction`` columns are
  the i, j, k axes), as :mod:`medmvl_core.imaging` does.
- A voxel box is ``(k1, j1, i1, k2, j2, i2)``: integer voxel indices, start inclusive, end
  exclusive, in array order. Voxel ``n`` covers the continuous index range ``[n - 0.5, n + 0.5]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from medmvl_core.errors import RoiError

#: Homogeneous LPS <-> RAS flip (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
RAS_TO_LPS = LPS_TO_RAS

_TOL = 1e-6


@dataclass(frozen=True)
class RoiBox:
    """An oriented box in RAS: what a Slicer ``vtkMRMLMarkupsROINode`` holds.

    ``center``: [3] mm; ``size``: [3] full edge lengths in mm along the box's own axes;
    ``orientation``: 3x3 rotation whose columns are the box axes in RAS (det +1).
    """

    center: np.ndarray
    size: np.ndarray
    orientation: np.ndarray

    def corners(self) -> np.ndarray:
        """The 8 corners, [8, 3] RAS."""
        return roi_corners(self.center, self.size, self.orientation)

    def object_to_world(self) -> np.ndarray:
        """4x4 matrix from the box frame (centered, axis aligned) to RAS."""
        m = np.eye(4)
        m[:3, :3] = self.orientation
        m[:3, 3] = self.center
        return m


def _as_matrix(m: Sequence | np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(m, dtype=float)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise RoiError(f"{name} must be a finite 4x4 matrix, got shape {a.shape}; "
                       "pass the volume's IJK-to-RAS matrix (including parent transforms)")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise RoiError(f"{name} is singular (zero spacing?); fix the volume geometry first")
    return a


def ijk_to_ras_from_lps(spacing: Sequence[float], origin: Sequence[float],
                        direction: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """IJK-to-RAS 4x4 from LPS geometry (spacing/origin in i, j, k order; direction 3x3 columns)."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d * np.asarray(spacing, dtype=float)[None, :]
    m[:3, 3] = np.asarray(origin, dtype=float)
    return LPS_TO_RAS @ m


def lps_from_ijk_to_ras(ijk_to_ras: Sequence | np.ndarray) -> tuple[tuple[float, float, float],
                                                                   tuple[float, float, float],
                                                                   np.ndarray]:
    """Split an IJK-to-RAS matrix into LPS ``(spacing, origin, direction)`` for the worker.

    ``direction`` is a 3x3 array whose columns are unit i, j, k axes in LPS. A skewed matrix
    keeps its column directions (the worker only needs them for physical boxes).
    """
    m = RAS_TO_LPS @ _as_matrix(ijk_to_ras, "ijk_to_ras")
    cols = m[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)
    direction = cols / spacing[None, :]
    origin = m[:3, 3]
    return (tuple(float(s) for s in spacing), tuple(float(o) for o in origin), direction)


def roi_corners(center: Sequence[float], size: Sequence[float],
                orientation: Sequence[Sequence[float]] | np.ndarray | None = None,
                to_world: Sequence | np.ndarray | None = None) -> np.ndarray:
    """The 8 corners [8, 3] of an oriented box, optionally mapped by a 4x4 ``to_world``
    (a parent transform)."""
    c = np.asarray(center, dtype=float).reshape(3)
    half = np.asarray(size, dtype=float).reshape(3) / 2.0
    r = np.eye(3) if orientation is None else np.asarray(orientation, dtype=float).reshape(3, 3)
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
    pts = c[None, :] + (signs * half[None, :]) @ r.T
    if to_world is not None:
        w = np.asarray(to_world, dtype=float).reshape(4, 4)
        pts = pts @ w[:3, :3].T + w[:3, 3][None, :]
    return pts


def ras_to_ijk_points(points_ras: np.ndarray, ijk_to_ras: Sequence | np.ndarray) -> np.ndarray:
    """Map [N, 3] RAS points to continuous (i, j, k) indices [N, 3]."""
    inv = np.linalg.inv(_as_matrix(ijk_to_ras, "ijk_to_ras"))
    p = np.asarray(points_ras, dtype=float).reshape(-1, 3)
    return p @ inv[:3, :3].T + inv[:3, 3][None, :]


def ijk_to_ras_points(points_ijk: np.ndarray, ijk_to_ras: Sequence | np.ndarray) -> np.ndarray:
    """Map [N, 3] continuous (i, j, k) indices to RAS points [N, 3]."""
    m = _as_matrix(ijk_to_ras, "ijk_to_ras")
    p = np.asarray(points_ijk, dtype=float).reshape(-1, 3)
    return p @ m[:3, :3].T + m[:3, 3][None, :]


def _axis_range(lo: float, hi: float, n: int) -> tuple[int, int]:
    """Voxels whose centers lie in [lo, hi], at least the one nearest the middle, clipped."""
    start = int(np.ceil(lo - _TOL))
    stop = int(np.floor(hi + _TOL)) + 1
    if stop <= start:  # thinner than a voxel: keep the voxel that holds its middle
        start = int(np.floor((lo + hi) / 2.0 + 0.5))
        stop = start + 1
    return max(start, 0), min(stop, n)


def points_to_voxel_box(points_ras: np.ndarray, ijk_to_ras: Sequence | np.ndarray,
                        shape: Sequence[int]) -> tuple[int, int, int, int, int, int]:
    """Voxel box ``(k1, j1, i1, k2, j2, i2)`` enclosing RAS points [N, 3] (e.g. an ROI's 8
    corners), clipped to a volume of array ``shape`` ([k, j, i, ...]).

    A single-slice volume (2D image) always gets ``k1, k2 = 0, 1``. Raises :class:`RoiError`
    when the points do not overlap the volume.
    """
    if len(shape) < 3 or any(int(s) < 1 for s in shape[:3]):
        raise RoiError(f"volume shape must be [k, j, i] with positive sizes, got {tuple(shape)}")
    nk, nj, ni = (int(s) for s in shape[:3])
    ijk = ras_to_ijk_points(points_ras, ijk_to_ras)
    lo, hi = ijk.min(axis=0), ijk.max(axis=0)
    i1, i2 = _axis_range(lo[0], hi[0], ni)
    j1, j2 = _axis_range(lo[1], hi[1], nj)
    k1, k2 = (0, 1) if nk == 1 else _axis_range(lo[2], hi[2], nk)
    if i2 <= i1 or j2 <= j1 or k2 <= k1:
        raise RoiError("the ROI does not overlap the selected volume; move the ROI onto the "
                       "image (or choose the volume it was drawn on)")
    return (k1, j1, i1, k2, j2, i2)


def roi_to_voxel_box(roi: RoiBox, ijk_to_ras: Sequence | np.ndarray, shape: Sequence[int],
                     roi_to_world: Sequence | np.ndarray | None = None
                     ) -> tuple[int, int, int, int, int, int]:
    """Voxel box of an oriented ROI (all 8 corners, so rotated ROIs are enclosed), clipped."""
    return points_to_voxel_box(roi_corners(roi.center, roi.size, roi.orientation, roi_to_world),
                               ijk_to_ras, shape)


def as_volume_box(box: Sequence[float]) -> tuple[float, ...]:
    """A worker voxel box as ``(k1, j1, i1, k2, j2, i2)``: a 2D image's pixel box ``(j1, i1, j2, i2)``
    (rows, columns; what a 2D model's answer maps to) becomes the box on its one slice, ``k`` 0-1, so
    views draw it as any box (an ROI on the single-slice volume in Slicer). 6 numbers pass unchanged."""
    if len(box) == 4:
        j1, i1, j2, i2 = box
        return (0, j1, i1, 1, j2, i2)
    if len(box) != 6:
        raise RoiError(f"a voxel box has 6 numbers (k1, j1, i1, k2, j2, i2) or 4 for a 2D image "
                       f"(j1, i1, j2, i2), got {len(box)}")
    return tuple(box)


def validate_voxel_box(box: Sequence[float], shape: Sequence[int]) -> tuple[int, ...]:
    """Check a worker voxel box against the array shape; returns it as ints, clipped."""
    if len(box) != 6:
        raise RoiError(f"a voxel box has 6 numbers (k1, j1, i1, k2, j2, i2), got {len(box)}")
    b = [int(round(float(v))) for v in box]
    lo = [max(0, min(b[a], int(shape[a]))) for a in range(3)]
    hi = [max(0, min(b[a + 3], int(shape[a]))) for a in range(3)]
    if any(h <= l for l, h in zip(lo, hi)):
        raise RoiError(f"voxel box {tuple(box)} is empty inside a volume of shape "
                       f"{tuple(shape[:3])}; the model returned a degenerate box")
    return tuple(lo + hi)


def voxel_box_to_roi(box: Sequence[float], ijk_to_ras: Sequence | np.ndarray) -> RoiBox:
    """The RAS ROI that exactly covers voxel box ``(k1, j1, i1, k2, j2, i2)`` (voxel edges).

    The ROI axes follow the volume's i, j, k axes (so oblique volumes give oblique ROIs);
    a left-handed (flipped) volume gets its k axis negated so the orientation is a rotation.
    """
    if len(box) != 6:
        raise RoiError(f"a voxel box has 6 numbers (k1, j1, i1, k2, j2, i2), got {len(box)}")
    m = _as_matrix(ijk_to_ras, "ijk_to_ras")
    k1, j1, i1, k2, j2, i2 = (float(v) for v in box)
    if i2 <= i1 or j2 <= j1 or k2 <= k1:
        raise RoiError(f"voxel box {tuple(box)} is empty (end must exceed start on every axis)")
    center_ijk = np.array([(i1 + i2) / 2.0 - 0.5, (j1 + j2) / 2.0 - 0.5, (k1 + k2) / 2.0 - 0.5])
    center = m[:3, :3] @ center_ijk + m[:3, 3]
    cols = m[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)
    axes = cols / spacing[None, :]
    # Orthonormalise (a skewed IJK matrix has no exact box; the nearest rotation is used).
    u, _, vt = np.linalg.svd(axes)
    rot = u @ vt
    if np.linalg.det(rot) < 0:
        rot[:, 2] = -rot[:, 2]
    size = np.array([i2 - i1, j2 - j1, k2 - k1]) * spacing
    return RoiBox(center=center, size=size, orientation=rot)


def flip_lps_ras_points(points: np.ndarray) -> np.ndarray:
    """Convert [N, 3] points LPS <-> RAS (negate the first two coordinates)."""
    p = np.array(points, dtype=float).reshape(-1, 3)
    p[:, :2] *= -1.0
    return p
