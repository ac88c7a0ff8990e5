"""Medical image input and preprocessing: readers, orientation, MedM-VL transforms, geometry.

Public API (see docs/INTERNALS.md)::

    from medmvl_core.imaging import Volume, read_image, preprocess, GeometryRecord
    vol = read_image(path, series_uid=None)
    tensor, geom = preprocess(vol, spec, roi=None)

Importing this package does not import torch or MONAI.
"""

from medmvl_core.imaging.geometry import GeometryRecord
from medmvl_core.imaging.pipeline import preprocess, validate_volume
from medmvl_core.imaging.readers import list_series, read_image
from medmvl_core.imaging.spec import PRESETS, default_spec, get_preset, spec_from_checkpoint, validate_spec
from medmvl_core.imaging.transforms import AugmentParams, draw_augment
from medmvl_core.imaging.volume import Volume, as_volume

__all__ = [
    "AugmentParams", "GeometryRecord", "PRESETS", "Volume", "as_volume", "default_spec", "draw_augment",
    "get_preset", "list_series", "preprocess", "read_image", "spec_from_checkpoint", "validate_spec",
    "validate_volume",
]
