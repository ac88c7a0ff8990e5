"""The geometry record of one preprocessing run and the mappings it allows.

Coordinate systems (all in array order ``[k, j, i]`` = ``[z, y, x]`` unless named):

* **model** — normalised coordinates in [0, 1] along each axis of the model input array
  (the 3D box format ``[z1, y1, x1, z2, y2, x2]``; 2D boxes use x/y in 0–100).
* **voxel** — edge coordinates of the *source* array as read (voxel ``n`` spans ``[n, n+1)``);
  voxel boxes are integer ``(k1, j1, i1, k2, j2, i2)``, inclusive-exclusive.
* **physical** — LPS millimetres (or RAS with ``space="RAS"``), ``x, y, z`` order, at voxel centres.

The chain is: source voxel -> (reorientation: axis permutation + flips) -> oriented voxel ->
(region: ROI offset + foreground-crop offset, extent) -> model. The resize maps the region's
extent linearly onto the model axis (MONAI/torch ``align_corners=False``), so a normalised
coordinate ``t`` corresponds to oriented edge coordinate ``start + t * extent``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from medmvl_core.errors import RoiError
from medmvl_core.imaging.orientation import Reorientation


@dataclass
class GeometryRecord:
    """What a preprocessing run did to the geometry (JSON-serialisable via :meth:`to_dict`).

    Attributes:
        kind: the spec kind (``volume``, ``volume_preprocessed``, ``image``).
        source_shape: source array shape (K, J, I) (2D: (1, H, W)).
        spacing, origin, direction: source geometry (ijk order, LPS).
        reorientation: axis permutation/flips applied (``orientation`` of the spec).
        orientation: the spec's orientation code.
        roi: ROI box in oriented voxel indices, or None.
        crop_box: foreground crop, half-open per axis, relative to the ROI (or the volume).
        region_start / region_extent: oriented edge coordinates the model axes span.
        model_shape: spatial shape of the model input (D, H, W) (2D: (1, S, S)).
        scale: model voxels per oriented voxel, per axis.
        augment: train-time rot90/flip parameters, if any (not invertible here).
    """

    kind: str
    source_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: list
    reorientation: Reorientation
    orientation: str
    roi: list | None
    crop_box: list | None
    region_start: tuple[float, float, float]
    region_extent: tuple[float, float, float]
    model_shape: tuple[int, int, int]
    axis_order: str = "zyx"
    augment: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def scale(self) -> tuple[float, float, float]:
        """Model voxels per oriented voxel along z, y, x."""
        return tuple(m / e for m, e in zip(self.model_shape, self.region_extent))  # type: ignore[return-value]

    # ------------------------------------------------------------------ points
    def model_to_voxel(self, points) -> np.ndarray:
        """Normalised model coordinates [..., 3] (z, y, x in [0, 1]) -> source voxel edge coordinates."""
        t = np.asarray(points, dtype=np.float64)
        oriented = np.asarray(self.region_start) + t * np.asarray(self.region_extent)
        return self.reorientation.to_source_edges(oriented)

    def voxel_to_model(self, points) -> np.ndarray:
        """Source voxel edge coordinates [..., 3] -> normalised model coordinates (z, y, x)."""
        oriented = self.reorientation.from_source_edges(np.asarray(points, dtype=np.float64))
        return (oriented - np.asarray(self.region_start)) / np.asarray(self.region_extent)

    def voxel_to_physical(self, points, space: str = "LPS") -> np.ndarray:
        """Source voxel *index* coordinates [..., 3] (k, j, i; voxel centres are integers)
        -> physical x, y, z in mm (LPS, or RAS with ``space="RAS"``)."""
        p = np.asarray(points, dtype=np.float64)
        ijk = p[..., ::-1] * np.asarray(self.spacing)
        xyz = ijk @ np.asarray(self.direction).T + np.asarray(self.origin)
        return _lps_ras(xyz, space)

    def physical_to_voxel(self, points, space: str = "LPS") -> np.ndarray:
        """Physical x, y, z [..., 3] (LPS or RAS) -> source voxel index coordinates (k, j, i)."""
        xyz = _lps_ras(np.asarray(points, dtype=np.float64), space)
        ijk = (xyz - np.asarray(self.origin)) @ np.linalg.inv(np.asarray(self.direction)).T
        return (ijk / np.asarray(self.spacing))[..., ::-1]

    def model_to_physical(self, points, space: str = "LPS") -> np.ndarray:
        """Normalised model coordinates -> physical (edge coordinates shifted to index space)."""
        return self.voxel_to_physical(self.model_to_voxel(points) - 0.5, space)

    def physical_to_model(self, points, space: str = "LPS") -> np.ndarray:
        """Physical coordinates -> normalised model coordinates."""
        return self.voxel_to_model(self.physical_to_voxel(points, space) + 0.5)

    # ------------------------------------------------------------------ boxes
    def model_box_to_voxel(self, box) -> tuple[int, int, int, int, int, int]:
        """Model box ``[z1, y1, x1, z2, y2, x2]`` (0–1) -> source voxel box (k1, j1, i1, k2, j2, i2).

        The smallest integer half-open box covering the model box, clipped to the volume.
        """
        b = np.asarray(box, dtype=np.float64).reshape(2, 3)
        corners = self.model_to_voxel(b)
        lo = np.floor(np.min(corners, axis=0) + 1e-6)
        hi = np.ceil(np.max(corners, axis=0) - 1e-6)
        shape = np.asarray(self.source_shape)
        lo = np.clip(lo, 0, shape)
        hi = np.clip(np.maximum(hi, lo + 1), 0, shape)
        return tuple(int(v) for v in np.concatenate([lo, hi]))  # type: ignore[return-value]

    def voxel_box_to_model(self, box, clip: bool = True) -> list[float]:
        """Source voxel box (k1, j1, i1, k2, j2, i2) -> model box ``[z1, y1, x1, z2, y2, x2]``."""
        b = np.asarray(box, dtype=np.float64).reshape(2, 3)
        m = self.voxel_to_model(b)
        lo, hi = np.min(m, axis=0), np.max(m, axis=0)
        if clip:
            lo, hi = np.clip(lo, 0.0, 1.0), np.clip(hi, 0.0, 1.0)
        return [float(v) for v in np.concatenate([lo, hi])]

    def model_box_to_physical(self, box, space: str = "LPS") -> list[float]:
        """Model box -> axis-aligned physical box ``[x1, y1, z1, x2, y2, z2]`` (corner min/max)."""
        b = np.asarray(box, dtype=np.float64).reshape(2, 3)
        corners = np.array([[b[z, 0], b[y, 1], b[x, 2]] for z in (0, 1) for y in (0, 1) for x in (0, 1)])
        p = self.model_to_physical(corners, space)
        return [float(v) for v in np.concatenate([p.min(axis=0), p.max(axis=0)])]

    def box2d_to_pixels(self, box) -> tuple[int, int, int, int]:
        """2D model box ``(x1, y1, x2, y2)`` in 0–100 -> pixel box (x1, y1, x2, y2) of the source image."""
        x1, y1, x2, y2 = (float(v) / 100.0 for v in box)
        k1, j1, i1, k2, j2, i2 = self.model_box_to_voxel([0.0, y1, x1, 1.0, y2, x2])
        return i1, j1, i2, j2

    def pixels_to_box2d(self, box) -> tuple[int, int, int, int]:
        """Pixel box (x1, y1, x2, y2) -> 2D model box in integers 0–100 (rounded)."""
        x1, y1, x2, y2 = box
        z1, b_y1, b_x1, z2, b_y2, b_x2 = self.voxel_box_to_model([0, y1, x1, 1, y2, x2])
        return tuple(int(round(v * 100)) for v in (b_x1, b_y1, b_x2, b_y2))  # type: ignore[return-value]

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict:
        """JSON-serialisable dict."""
        d = asdict(self)
        d["reorientation"] = self.reorientation.to_dict()
        d["scale"] = list(self.scale)
        return _jsonable(d)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "GeometryRecord":
        d = dict(d)
        d.pop("scale", None)
        r = d["reorientation"]
        d["reorientation"] = Reorientation(tuple(r["perm"]), tuple(r["flip"]), tuple(r["source_shape"]))
        for k in ("source_shape", "spacing", "origin", "region_start", "region_extent", "model_shape"):
            d[k] = tuple(d[k])
        return cls(**d)


def _lps_ras(xyz: np.ndarray, space: str) -> np.ndarray:
    space = space.upper()
    if space == "LPS":
        return xyz
    if space == "RAS":
        return xyz * np.array([-1.0, -1.0, 1.0])
    raise RoiError(f"unknown physical space {space!r}; use 'LPS' or 'RAS'")


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x
