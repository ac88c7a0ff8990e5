"""A segment (or one label of a label map) as the region a question is about (numpy only).

The segment's extent in its own voxel grid becomes RAS corner points, and those go through the
same :func:`~medmvl_core.client.roi_geometry.points_to_voxel_box` as a drawn ROI's corners, so a
segment and an ROI around the same voxels give the same voxel box on the image. Only that box is
sent to the worker ("describe" / "ask about region" crop to it); the mask itself is not sent, see
docs/saving-results.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from medmvl_core.client import roi_geometry as rg
from medmvl_core.errors import RoiError

logger = logging.getLogger(__name__)


@dataclass
class SegmentRegion:
    """box: (k1, j1, i1, k2, j2, i2) on the image, end exclusive; clipped: part of the segment
    lies outside the image; voxels: how many voxels the segment holds."""

    box: tuple[int, int, int, int, int, int]
    clipped: bool
    voxels: int


def mask_extent(mask: np.ndarray) -> tuple[int, int, int, int, int, int] | None:
    """Bounding box (k1, j1, i1, k2, j2, i2) of the non-zero voxels of a [k, j, i] mask, or None."""
    m = np.asarray(mask)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise RoiError(f"a segment mask is [k, j, i] (or [j, i]), got shape {m.shape}")
    nz = [np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    if any(len(n) == 0 for n in nz):
        return None
    return (int(nz[0][0]), int(nz[1][0]), int(nz[2][0]),
            int(nz[0][-1]) + 1, int(nz[1][-1]) + 1, int(nz[2][-1]) + 1)


def segment_region(mask: np.ndarray, mask_ijk_to_ras: Sequence | np.ndarray,
                   volume_shape: Sequence[int], volume_ijk_to_ras: Sequence | np.ndarray,
                   name: str = "segment") -> SegmentRegion:
    """The image voxel box enclosing a segment given on any grid (its own ``mask_ijk_to_ras``).

    Raises :class:`RoiError` when the segment is empty or lies outside the image.
    """
    ext = mask_extent(mask)
    if ext is None:
        raise RoiError(f"segment '{name}' is empty: paint it (Segment Editor) or pick another segment")
    k1, j1, i1, k2, j2, i2 = ext
    # Voxel edges (half a voxel beyond the outer centres), as an ROI drawn around them would be.
    corners = np.array([[i, j, k] for k in (k1 - 0.5, k2 - 0.5) for j in (j1 - 0.5, j2 - 0.5)
                        for i in (i1 - 0.5, i2 - 0.5)])
    ras = rg.ijk_to_ras_points(corners, mask_ijk_to_ras)
    try:
        box = rg.points_to_voxel_box(ras, volume_ijk_to_ras, volume_shape)
    except RoiError:
        raise RoiError(f"segment '{name}' lies outside the image: it was drawn on another image "
                       "or moved; choose the segmentation made on this image") from None
    ijk = rg.ras_to_ijk_points(ras, volume_ijk_to_ras)
    shape = [int(s) for s in volume_shape[:3]][::-1]  # (ni, nj, nk)
    clipped = bool(np.any(ijk < -0.5 - 1e-6) or np.any(ijk > np.array(shape) - 0.5 + 1e-6))
    if clipped:
        logger.warning("the segment extends beyond the image; its region is clipped to the image")
    return SegmentRegion(box=box, clipped=clipped, voxels=int(np.count_nonzero(mask)))


def same_grid(shape_a: Sequence[int], ijk_to_ras_a: Sequence | np.ndarray,
              shape_b: Sequence[int], ijk_to_ras_b: Sequence | np.ndarray, tol: float = 1e-3) -> bool:
    """True when two images share shape and voxel-to-world matrix (within ``tol`` mm)."""
    return (tuple(int(s) for s in shape_a[:3]) == tuple(int(s) for s in shape_b[:3])
            and np.allclose(np.asarray(ijk_to_ras_a, float), np.asarray(ijk_to_ras_b, float), atol=tol))
