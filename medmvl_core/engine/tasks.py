"""Box geometry for the tasks: voxel boxes to the model's box text, and boxes in answers back
to voxels and mm.

The tasks themselves (which there are, what each needs, the prompt it sends) are the protocol's
task table (:func:`medmvl_core.client.protocol.task_spec`). Box text follows the training data
(``medmvl_core.processing.boxes``): 2D ``{<x1><y1><x2><y2>}`` integers 0-100, 3D
``[z1, y1, x1, z2, y2, x2]`` floats 0-1 in model-input array order.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

_BOX3D = re.compile(r"\[\s*([-+]?\d*\.?\d+)\s*,\s*([-+]?\d*\.?\d+)\s*,\s*([-+]?\d*\.?\d+)\s*,"
                    r"\s*([-+]?\d*\.?\d+)\s*,\s*([-+]?\d*\.?\d+)\s*,\s*([-+]?\d*\.?\d+)\s*\]")
_BOX2D = re.compile(r"\{<(\d+)><(\d+)><(\d+)><(\d+)>\}")


def format_box(box: Sequence[float], kind: str) -> str:
    """Model-space box -> the model's native text (through processing.boxes when present)."""
    try:
        from medmvl_core.processing import boxes as pb
        return pb.format_box_3d(box) if kind == "image3d" else pb.format_box_2d(box)
    except (ImportError, AttributeError):
        if kind == "image3d":
            return "[" + ", ".join(f"{float(v):.3f}" for v in box) + "]"
        return "{" + "".join(f"<{int(round(float(v)))}>" for v in box) + "}"


def find_model_boxes(text: str, kind: str) -> list[list[float]]:
    """All boxes written in ``text``, in model space (3D: 6 floats, 2D: 4 ints 0-100)."""
    try:
        from medmvl_core.processing import boxes as pb
        found = pb.find_boxes(text)
        out = []
        for b in found:
            vals = getattr(b, "box", None) or getattr(b, "values", None) or b
            if isinstance(vals, dict):
                vals = vals.get("box") or vals.get("values") or []
            vals = [float(v) for v in vals]
            if (kind == "image3d" and len(vals) == 6) or (kind == "image" and len(vals) == 4):
                out.append(vals)
        return out
    except (ImportError, AttributeError, TypeError, ValueError):
        pat = _BOX3D if kind == "image3d" else _BOX2D
        return [[float(v) for v in m.groups()] for m in pat.finditer(text)]


def voxel_to_physical(volume: Any, ijk: np.ndarray) -> np.ndarray:
    """Continuous voxel indices (i, j, k) [N, 3] -> LPS mm [N, 3]: origin + D @ (spacing * ijk)."""
    spacing = np.asarray(getattr(volume, "spacing", (1, 1, 1)), dtype=float)[:3]
    origin = np.asarray(getattr(volume, "origin", (0, 0, 0)), dtype=float)[:3]
    direction = np.asarray(getattr(volume, "direction", np.eye(3)), dtype=float).reshape(3, 3)
    return origin + (direction @ (np.asarray(ijk, dtype=float) * spacing).T).T


def map_box(model_box: list[float], geom: Any, volume: Any, kind: str) -> dict:
    """One model-space box -> ``{"model", "voxel", "physical_lps"}``.

    voxel: 3D ``(k1, j1, i1, k2, j2, i2)``, 2D ``(j1, i1, j2, i2)`` (row, column), integer
    inclusive-exclusive in the uploaded array. physical_lps: the axis-aligned box
    ``[x1, y1, z1, x2, y2, z2]`` in LPS mm (through the geometry record).
    """
    if kind == "image3d":
        mb3 = list(model_box)
    else:  # 2D model boxes are (x1, y1, x2, y2) in 0-100
        x1, y1, x2, y2 = (float(v) / 100.0 for v in model_box)
        mb3 = [0.0, y1, x1, 1.0, y2, x2]
    vox = [float(v) for v in geom.model_box_to_voxel(mb3)]
    if hasattr(geom, "model_box_to_physical"):
        phys = [float(v) for v in geom.model_box_to_physical(mb3)]
    else:
        k1, j1, i1, k2, j2, i2 = vox
        c = voxel_to_physical(volume, np.array([[i1, j1, k1], [i2, j2, k2]]))
        phys = np.concatenate([c.min(axis=0), c.max(axis=0)]).tolist()
    voxel = vox if kind == "image3d" else [vox[1], vox[2], vox[4], vox[5]]
    return {"model": [float(v) for v in model_box], "voxel": voxel, "physical_lps": phys}


def voxel_box_to_model(box: Sequence[float], geom: Any, kind: str) -> list[float]:
    """Voxel box (3D ``(k1, j1, i1, k2, j2, i2)``, 2D ``(j1, i1, j2, i2)``) -> model box."""
    if kind == "image3d":
        return [float(v) for v in geom.voxel_box_to_model(list(box))]
    j1, i1, j2, i2 = box
    z1, y1, x1, z2, y2, x2 = geom.voxel_box_to_model([0, j1, i1, 1, j2, i2])
    return [x1 * 100, y1 * 100, x2 * 100, y2 * 100]
