"""Label maps for the viewer: read NIfTI / NRRD / MHA label images or a DICOM SEG and turn one
label into the region of a question (its voxel box on the image).

A NIfTI / NRRD label map must be on the image's own grid (what segmentation tools such as
TotalSegmentator write); one on another grid was made for another image, and the viewer says so
rather than guessing. A DICOM SEG stores only the frames it needs, so it is placed through its
patient coordinates; it must share the image's frame of reference when both name one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medmvl_core.client import segments
from medmvl_core.client.roi_geometry import ijk_to_ras_from_lps
from medmvl_core.errors import ImageReadError, RoiError

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class LabelMap:
    """array: [k, j, i] integer labels (0 = background); names: label -> name;
    ijk_to_ras: 4x4; kind: "labelmap" | "dicom-seg"; frame_of_reference_uid: SEG only."""

    array: np.ndarray
    ijk_to_ras: np.ndarray
    names: dict[int, str] = field(default_factory=dict)
    kind: str = "labelmap"
    frame_of_reference_uid: str = ""

    def labels(self) -> list[int]:
        """The non-empty labels, ascending."""
        return [int(v) for v in np.unique(self.array) if v != 0]

    def name(self, label: int) -> str:
        return self.names.get(int(label), f"label {int(label)}")


def _is_dicom_seg(path: Path) -> bool:
    if path.suffix.lower() not in (".dcm", "") or not path.is_file():
        return False
    try:
        import pydicom
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:
        return False
    return str(ds.get("SOPClassUID", "")) == "1.2.840.10008.5.1.4.1.1.66.4"


def _read_seg(path: Path) -> LabelMap:
    try:
        import highdicom as hd
    except ImportError as exc:
        raise ImageReadError("reading a DICOM SEG needs highdicom: pip install "
                             "'medmvl-slicer[export]'") from exc
    seg = hd.seg.segread(str(path))
    try:
        vol = seg.get_volume(combine_segments=True, relabel=False, skip_overlap_checks=True)
    except (ValueError, RuntimeError) as exc:
        raise ImageReadError(f"the DICOM SEG {path.name} is not a regular 3D volume ({exc}); "
                             "export the segmentation as NIfTI or NRRD instead") from exc
    # highdicom: array [slice, row, column], affine maps (slice, row, column) -> LPS.
    ijk_to_lps = np.asarray(vol.affine, float)[:, [2, 1, 0, 3]]
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    return LabelMap(array=np.asarray(vol.array).astype(np.int32), ijk_to_ras=_LPS_TO_RAS @ ijk_to_lps,
                    names=names, kind="dicom-seg",
                    frame_of_reference_uid=str(seg.get("FrameOfReferenceUID", "")))


def read_label_map(path: str | os.PathLike) -> LabelMap:
    """A label map from NIfTI / NRRD / MHA (integer labels) or a DICOM SEG file."""
    p = Path(path)
    if _is_dicom_seg(p):
        return _read_seg(p)
    from medmvl_core.imaging import read_image

    vol = read_image(str(p))
    arr = np.asarray(vol.array)
    if arr.ndim != 3 or not (np.issubdtype(arr.dtype, np.integer) or np.all(arr == np.round(arr))):
        raise ImageReadError(f"{p.name} is not a label map (integer labels on a 3D grid); "
                             "choose the segmentation file, not an image")
    return LabelMap(array=arr.astype(np.int32),
                    ijk_to_ras=ijk_to_ras_from_lps(vol.spacing, vol.origin, vol.direction))


def label_region(labelmap: LabelMap, label: int, image_shape, image_ijk_to_ras,
                 image_frame_uid: str = "") -> segments.SegmentRegion:
    """The voxel box on the image of one label; clear errors for a label map made on another
    image, an empty label or one outside the image."""
    name = labelmap.name(label)
    if labelmap.kind == "dicom-seg":
        if labelmap.frame_of_reference_uid and image_frame_uid and \
                labelmap.frame_of_reference_uid != image_frame_uid:
            raise RoiError("the DICOM SEG belongs to another frame of reference than the image; "
                           "load the segmentation made on this series")
    elif not segments.same_grid(labelmap.array.shape, labelmap.ijk_to_ras, image_shape[:3],
                                image_ijk_to_ras):
        raise RoiError(
            f"the label map's grid (shape {tuple(labelmap.array.shape)}) does not match the image's "
            f"(shape {tuple(image_shape[:3])}, or its spacing / origin / direction differ): it was "
            "made on another image. Load the label map made on this image, or resample it onto "
            "the image first (Slicer: Resample Image (BRAINS); SimpleITK: Resample)")
    return segments.segment_region(labelmap.array == int(label), labelmap.ijk_to_ras, image_shape,
                                   image_ijk_to_ras, name)
