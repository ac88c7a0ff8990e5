"""The :class:`Volume` record: voxels plus the geometry needed to map them to patient space.

Conventions (the same as SimpleITK / ITK and 3D Slicer's LPS file convention):

* ``array`` axis order is ``[k, j, i]`` = ``[slice, row, column]`` (what
  ``SimpleITK.GetArrayFromImage`` returns). 2D images are ``[1, H, W]`` (grey) or
  ``[1, H, W, 3]`` (RGB).
* ``spacing`` and ``origin`` are in ``(i, j, k)`` order, millimetres, LPS.
* ``direction`` is 3x3; its columns are the unit vectors of the i, j, k axes in LPS.
  The physical position of voxel index ``(k, j, i)`` is
  ``origin + direction @ (spacing * (i, j, k))``.

No patient data is carried: ``source`` names only the kind of file it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medmvl_core.errors import InvalidImageError


TWO_D_MODALITIES = ("XR", "image", "photo")


@dataclass
class Volume:
    """A 3D volume or a 2D image with its geometry.

    Attributes:
        array: voxels, ``[k, j, i]`` (3D), ``[1, H, W]`` (grey 2D) or ``[1, H, W, 3]`` (RGB 2D).
        spacing: ``(i, j, k)`` voxel size in mm.
        origin: ``(i, j, k)``-ordered LPS position of voxel ``(0, 0, 0)`` in mm.
        direction: 3x3 matrix, columns = i, j, k axis directions in LPS.
        modality: ``"CT"``, ``"MR"``, ``"XR"``, ``"photo"``, ``"unknown"`` ...
        source: the kind of file read (``"dicom-series"``, ``"nifti"``, ``"npy"`` ...).
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    modality: str = "unknown"
    source: str = "array"

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if len(self.spacing) != 3 or len(self.origin) != 3:
            raise InvalidImageError(
                "spacing and origin must have three values (i, j, k); "
                f"got spacing={self.spacing}, origin={self.origin}")
        if any(not np.isfinite(s) or s <= 0 for s in self.spacing):
            raise InvalidImageError(
                f"voxel spacing must be positive and finite, got {self.spacing}; "
                "fix the file's spacing header or pass spacing explicitly")

    @property
    def is_2d(self) -> bool:
        """True for a 2D image: colour ``[1, H, W, 3]``, or ``[1, H, W]`` read from a 2D format
        (modality ``XR``/``image``/``photo``). A single CT/MR slice stays a (thin) volume."""
        return self.is_rgb or (self.array.shape[0] == 1 and self.modality in TWO_D_MODALITIES)

    @property
    def is_rgb(self) -> bool:
        """True for ``[1, H, W, 3]`` colour images."""
        return self.array.ndim == 4 and self.array.shape[-1] == 3

    @property
    def shape(self) -> tuple[int, ...]:
        """The array shape ``(K, J, I)`` (plus 3 for RGB)."""
        return tuple(self.array.shape)

    def geometry_dict(self) -> dict:
        """JSON-serialisable geometry (no voxels)."""
        return {
            "shape": list(self.array.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": self.direction.tolist(),
            "modality": self.modality,
            "source": self.source,
        }


def as_volume(x, modality: str = "unknown") -> Volume:
    """Wrap an array (``[D, H, W]`` 3D, ``[H, W]`` / ``[H, W, 3]`` 2D) or pass a Volume through.

    A bare ``[D, H, W]`` array gets identity geometry (1 mm isotropic, origin 0, identity
    direction) — the MedM-VL ``.npy`` convention, where no geometry exists.
    """
    if isinstance(x, Volume):
        return x
    arr = np.asarray(x)
    if arr.ndim == 2:
        return Volume(arr[None], modality="image" if modality == "unknown" else modality,
                      source="array")
    if arr.ndim == 3 and arr.shape[-1] == 3 and arr.dtype == np.uint8:
        return Volume(arr[None], modality="photo" if modality == "unknown" else modality,
                      source="array")
    return Volume(arr, modality=modality, source="array")
