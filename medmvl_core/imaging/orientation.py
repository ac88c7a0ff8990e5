"""Reorientation of a volume to a canonical orientation code (e.g. ``"LPS"``, ``"RAS"``).

A code names, for the i, j, k axes in that order, the patient direction each axis points
to: ``"LPS"`` = i towards Left, j towards Posterior, k towards Superior (so the array, in
``[k, j, i]`` order, runs inferior->superior, anterior->posterior, right->left: the radiological
display convention of axial slices). ``"RAS"`` flips i and j.

Any direction matrix is handled by permuting and flipping array axes only (no resampling):
the source axis assigned to each target axis is the permutation with the largest total
``|cos|`` between source and target axes, and an axis is flipped when its cosine is negative.
For oblique volumes this is the nearest axis permutation; the residual rotation stays in
the direction matrix of the result, so physical coordinates remain exact.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from medmvl_core.errors import ConfigError
from medmvl_core.imaging.volume import Volume

_LETTER = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


@dataclass(frozen=True)
class Reorientation:
    """How the array axes were rearranged: ``new = flip(transpose(old, perm), flips)``.

    ``perm[a]`` is the source array axis that becomes array axis ``a`` (array order [k, j, i]);
    ``flip[a]`` tells whether new array axis ``a`` runs opposite to that source axis.
    """

    perm: tuple[int, int, int] = (0, 1, 2)
    flip: tuple[bool, bool, bool] = (False, False, False)
    source_shape: tuple[int, int, int] = (1, 1, 1)

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape after reorientation."""
        return tuple(self.source_shape[p] for p in self.perm)  # type: ignore[return-value]

    def to_source_edges(self, e: np.ndarray) -> np.ndarray:
        """Map edge coordinates [..., 3] (array order, voxel n spans [n, n+1)) back to the source."""
        e = np.asarray(e, dtype=np.float64)
        out = np.empty_like(e)
        shp = self.shape
        for a in range(3):
            v = shp[a] - e[..., a] if self.flip[a] else e[..., a]
            out[..., self.perm[a]] = v
        return out

    def from_source_edges(self, e: np.ndarray) -> np.ndarray:
        """Map source edge coordinates [..., 3] to the reoriented array."""
        e = np.asarray(e, dtype=np.float64)
        out = np.empty_like(e)
        shp = self.shape
        for a in range(3):
            v = e[..., self.perm[a]]
            out[..., a] = shp[a] - v if self.flip[a] else v
        return out

    def to_dict(self) -> dict:
        return {"perm": list(self.perm), "flip": list(self.flip), "source_shape": list(self.source_shape)}


def parse_axcode(code: str) -> np.ndarray:
    """3x3 matrix whose columns are the LPS unit vectors of the code's i, j, k axes."""
    code = str(code).upper()
    if len(code) != 3 or any(c not in _LETTER for c in code) or \
            len({_LETTER[c][0] for c in code}) != 3:
        raise ConfigError(f"orientation code {code!r} is not valid; use three letters, one of "
                          "L/R, P/A, S/I each, such as 'LPS' or 'RAS', or 'native'")
    m = np.zeros((3, 3))
    for col, c in enumerate(code):
        row, sign = _LETTER[c]
        m[row, col] = sign
    return m


def plan_reorientation(direction: np.ndarray, code: str, shape: tuple[int, int, int]) -> Reorientation:
    """The axis permutation and flips that bring ``direction`` closest to ``code``."""
    target = parse_axcode(code)
    cos = target.T @ np.asarray(direction, dtype=np.float64)  # cos[t, s]: target ijk axis t vs source ijk axis s
    best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(cos[t, p[t]]) for t in range(3)))
    # ijk axis t -> array axis 2 - t
    perm = [0, 0, 0]
    flip = [False, False, False]
    for t in range(3):
        s = best[t]
        perm[2 - t] = 2 - s
        flip[2 - t] = bool(cos[t, s] < 0)
    return Reorientation(tuple(perm), tuple(flip), tuple(int(n) for n in shape))  # type: ignore[arg-type]


def reorient(vol: Volume, code: str) -> tuple[Volume, Reorientation]:
    """Reorient a 3D volume to ``code`` (``"native"``: unchanged). Returns (volume, plan).

    The array is a view where possible (transposes and flips copy nothing).
    """
    shape = tuple(vol.array.shape[:3])
    if code == "native":
        return vol, Reorientation(source_shape=shape)  # type: ignore[arg-type]
    plan = plan_reorientation(vol.direction, code, shape)  # type: ignore[arg-type]
    if plan.is_identity:
        return vol, plan
    arr = np.transpose(vol.array, plan.perm + tuple(range(3, vol.array.ndim)))
    flip_axes = [a for a in range(3) if plan.flip[a]]
    if flip_axes:
        arr = np.flip(arr, axis=flip_axes)
    # ijk-ordered geometry: new ijk axis t = source ijk axis s
    src_spacing = np.asarray(vol.spacing)
    new_spacing = [0.0] * 3
    new_dir = np.zeros((3, 3))
    idx0 = np.zeros(3)  # source ijk index of the new first voxel
    for a in range(3):
        t, s = 2 - a, 2 - plan.perm[a]
        new_spacing[t] = src_spacing[s]
        new_dir[:, t] = vol.direction[:, s] * (-1.0 if plan.flip[a] else 1.0)
        if plan.flip[a]:
            idx0[s] = shape[plan.perm[a]] - 1
    new_origin = np.asarray(vol.origin) + vol.direction @ (src_spacing * idx0)
    out = Volume(arr, tuple(new_spacing), tuple(new_origin), new_dir, vol.modality, vol.source)
    return out, plan
