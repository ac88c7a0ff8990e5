"""Referring-expression box parsing and IoU, as the papers' eval code does it (METRICS.md §4).

2D (Uni-Med): answers ``{<x1><y1><x2><y2>}`` with integers 0-100 of the image width/height;
ground truth is the original pixel box ``[x, y, w, h]`` plus the image size ``[W, H]``;
inclusive-pixel IoU (+1). 3D (M3D): ``[d1, h1, w1, d2, h2, w2]`` fractions; M3D's "IoU" divides
the intersection by the *enclosing* box volume (+1e-6); the standard IoU is offered too.
Nothing here raises on model output: an unparseable answer scores 0 (2D) or -1 (3D).
"""

from __future__ import annotations

import re
from typing import Sequence

_BOX2D = re.compile(r"\{<\d{1,3}><\d{1,3}><\d{1,3}><\d{1,3}>\}")
_INT = re.compile(r"\d+")
_NUM = r"([-+]?\d*\.\d+|[-+]?\d+)"
_BOX3D = re.compile(r"\[" + ", ".join([_NUM] * 6) + r"\]")


def parse_box_2d(answer: str, image_size: Sequence[float], res: int = 100) -> list[float] | None:
    """Uni-Med parsing: drop ``<unk>`` and *all* spaces, anchored match at the start, first four
    integers scaled by W/100, H/100. Returns pixel ``[x1, y1, x2, y2]`` or None."""
    if not isinstance(answer, str):
        return None
    text = answer.replace("<unk>", "").replace(" ", "").strip()
    if not _BOX2D.match(text):
        return None
    x1, y1, x2, y2 = (int(v) for v in _INT.findall(text)[:4])
    w, h = float(image_size[0]), float(image_size[1])
    return [x1 / res * w, y1 / res * h, x2 / res * w, y2 / res * h]


def xywh_to_xyxy(box: Sequence[float]) -> list[float]:
    """Pixel ``[x, y, w, h]`` -> ``[x, y, x + w, y + h]`` (as Uni-Med builds its ground truth)."""
    x, y, w, h = (float(v) for v in box[:4])
    return [x, y, x + w, y + h]


def iou_2d_inclusive(a: Sequence[float], b: Sequence[float]) -> float:
    """Uni-Med ``computeIoU`` on ``[x1, y1, x2, y2]``: inclusive pixels (+1 on each side length).

    Kept as in the reference (a reversed box is not re-ordered); only a zero union is guarded.
    """
    x1, y1, x2, y2 = a
    x3, y3, x4, y4 = b
    inter = max(0.0, min(x2, x4) - max(x1, x3) + 1) * max(0.0, min(y2, y4) - max(y1, y3) + 1)
    area_a = (x2 - x1 + 1) * (y2 - y1 + 1)
    area_b = (x4 - x3 + 1) * (y4 - y3 + 1)
    union = area_a + area_b - inter
    if union == 0:
        return 0.0
    return float(inter / union)


def parse_box_3d(text: str) -> list[float] | None:
    """M3D ``extract_box_from_text``: the first ``[a, b, c, d, e, f]`` with ", " separators."""
    if not isinstance(text, str):
        return None
    m = _BOX3D.search(text)
    return [float(v) for v in m.groups()] if m else None


def iou_3d_m3d(a: Sequence[float], b: Sequence[float]) -> float:
    """M3D ``calculate_iou``: intersection volume / (enclosing-box volume + 1e-6).

    Never above the true IoU (the enclosing box contains the union)."""
    inter = 1.0
    enclosing = 1.0
    for i in range(3):
        lo_a, hi_a, lo_b, hi_b = a[i], a[i + 3], b[i], b[i + 3]
        inter *= max(0.0, min(hi_a, hi_b) - max(lo_a, lo_b))
        enclosing *= max(hi_a, hi_b) - min(lo_a, lo_b)
    return float(inter / (enclosing + 1e-6))


def iou_3d_standard(a: Sequence[float], b: Sequence[float]) -> float:
    """Standard IoU of two axis-aligned boxes ``[lo0, lo1, lo2, hi0, hi1, hi2]`` (continuous)."""
    inter = 1.0
    vol_a = 1.0
    vol_b = 1.0
    for i in range(3):
        inter *= max(0.0, min(a[i + 3], b[i + 3]) - max(a[i], b[i]))
        vol_a *= max(0.0, a[i + 3] - a[i])
        vol_b *= max(0.0, b[i + 3] - b[i])
    union = vol_a + vol_b - inter
    return float(inter / union) if union > 0 else 0.0
