"""Box text formats of MedM-VL's training data, parse and format.

* 2D (Uni-Med style): ``{<x1><y1><x2><y2>}`` — integers 0–100, percent of the image width/height.
* 3D (M3D style): ``[z1, y1, x1, z2, y2, x2]`` — floats in [0, 1] with 3 decimals, in the
  model-input array order (slice, row, column). M3D wraps boxes in ``<bx_start>...<bx_end>``;
  the parser accepts that and any surrounding text.

Parsing is tolerant: it finds boxes inside free text, orders each axis (start <= end) and
clips to the valid range. Geometry (model box <-> voxels <-> physical) is in
:class:`medmvl_core.imaging.GeometryRecord`.
"""

from __future__ import annotations

import re
from typing import Sequence

from medmvl_core.errors import BoxParseError

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
BOX2D_RE = re.compile(r"\{?\s*<\s*(\d{1,3})\s*>\s*<\s*(\d{1,3})\s*>\s*<\s*(\d{1,3})\s*>\s*<\s*(\d{1,3})\s*>\s*\}?")
BOX3D_RE = re.compile(r"(?:<bx_start>\s*)?\[\s*" + r"\s*,\s*".join([f"({_NUM})"] * 6) + r"\s*\](?:\s*<bx_end>)?")


def format_box_2d(box: Sequence[float]) -> str:
    """``(x1, y1, x2, y2)`` in 0–100 -> ``{<x1><y1><x2><y2>}`` (rounded, clipped, ordered)."""
    x1, y1, x2, y2 = _ordered_2d([float(v) for v in _check_len(box, 4)])
    vals = [min(100, max(0, int(round(v)))) for v in (x1, y1, x2, y2)]
    return "{" + "".join(f"<{v}>" for v in vals) + "}"


def parse_box_2d(text: str) -> tuple[int, int, int, int]:
    """The first 2D box in ``text`` as ``(x1, y1, x2, y2)`` integers 0–100. Raises BoxParseError."""
    m = BOX2D_RE.search(text or "")
    if not m:
        raise BoxParseError(f"no 2D box like '{{<x1><y1><x2><y2>}}' in {_snippet(text)}")
    return _box2d_from_match(m)


def format_box_3d(box: Sequence[float]) -> str:
    """``(z1, y1, x1, z2, y2, x2)`` in [0, 1] -> ``[z1, y1, x1, z2, y2, x2]`` with 3 decimals."""
    vals = _ordered_3d([float(v) for v in _check_len(box, 6)])
    return "[" + ", ".join(f"{min(1.0, max(0.0, v)):.3f}" for v in vals) + "]"


def parse_box_3d(text: str) -> tuple[float, float, float, float, float, float]:
    """The first 3D box in ``text`` as ``(z1, y1, x1, z2, y2, x2)`` in [0, 1]. Raises BoxParseError."""
    m = BOX3D_RE.search(text or "")
    if not m:
        raise BoxParseError(f"no 3D box like '[z1, y1, x1, z2, y2, x2]' in {_snippet(text)}")
    return _box3d_from_match(m)


def find_boxes(text: str) -> list[dict]:
    """All boxes in ``text``, in order: ``[{"kind": "2d"|"3d", "box": [...], "span": [start, end]}]``."""
    found = []
    for m in BOX3D_RE.finditer(text or ""):
        found.append({"kind": "3d", "box": list(_box3d_from_match(m)), "span": [m.start(), m.end()]})
    for m in BOX2D_RE.finditer(text or ""):
        found.append({"kind": "2d", "box": list(_box2d_from_match(m)), "span": [m.start(), m.end()]})
    found.sort(key=lambda d: d["span"][0])
    return found


def _box2d_from_match(m: re.Match) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = _ordered_2d([min(100, int(g)) for g in m.groups()])
    return int(x1), int(y1), int(x2), int(y2)


def _box3d_from_match(m: re.Match) -> tuple[float, float, float, float, float, float]:
    vals = _ordered_3d([min(1.0, max(0.0, float(g))) for g in m.groups()])
    return tuple(vals)  # type: ignore[return-value]


def _ordered_2d(v):
    x1, y1, x2, y2 = v
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def _ordered_3d(v):
    lo = [min(v[a], v[a + 3]) for a in range(3)]
    hi = [max(v[a], v[a + 3]) for a in range(3)]
    return lo + hi


def _check_len(box, n: int):
    try:
        b = list(box)
    except TypeError as exc:
        raise BoxParseError(f"a box must be a sequence of {n} numbers, got {box!r}") from exc
    if len(b) != n:
        raise BoxParseError(f"a box must have {n} numbers, got {len(b)}: {b!r}")
    return b


def _snippet(text) -> str:
    s = repr(text if text is not None else "")
    return s if len(s) < 80 else s[:77] + "...'"
