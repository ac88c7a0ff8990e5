"""A Slicer segment as the region of a question: its voxel box on the selected volume.

The segment's own binary labelmap (any grid, parent transforms applied) goes through the same
geometry as a drawn ROI (:mod:`medmvl_core.client.segments`). Only VTK/MRML and numpy are used.
"""

from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

from MedMVLSlicerLib import mrml_geometry
from MedMVLSlicerLib.clientlib import RoiError, client_module

segments = client_module("segments")

LABELMAP = "Binary labelmap"


def segment_region(segmentation_node, segment_id: str, volume_node) -> segments.SegmentRegion:
    """Voxel box ``(k1, j1, i1, k2, j2, i2)`` on ``volume_node`` enclosing the segment, with
    clear errors for a missing, empty or outside segment."""
    if segmentation_node is None or not segment_id:
        raise RoiError("select a segmentation and a segment first")
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise RoiError(f"segment {segment_id!r} is not in '{segmentation_node.GetName()}'")
    name = segment.GetName()
    image = segment.GetRepresentation(LABELMAP)
    if image is None:
        raise RoiError(f"segment '{name}' has no binary labelmap; create one in the Segmentations "
                       "module (Representations: Binary labelmap, Create)")
    ext = image.GetExtent()
    scalars = image.GetPointData().GetScalars() if image.GetPointData() else None
    if scalars is None or ext[1] < ext[0] or ext[3] < ext[2] or ext[5] < ext[4]:
        raise RoiError(f"segment '{name}' is empty: paint it (Segment Editor) or pick another segment")
    dims = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)  # k, j, i
    mask = numpy_support.vtk_to_numpy(scalars).reshape(dims) == segment.GetLabelValue()
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    image_to_world = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    offset = np.eye(4)
    offset[:3, 3] = (ext[0], ext[2], ext[4])  # the array starts at the extent's first index
    mask_ijk_to_world = mrml_geometry.parent_to_world(segmentation_node) @ image_to_world @ offset
    volume_image = volume_node.GetImageData() if volume_node is not None else None
    if volume_image is None:
        raise RoiError("the selected volume has no image data; load an image first")
    i, j, k = volume_image.GetDimensions()
    return segments.segment_region(mask, mask_ijk_to_world, (k, j, i),
                                   mrml_geometry.volume_ijk_to_world(volume_node), name)
