"""Geometry between MRML nodes and the worker: volume node -> array + IJK-to-world,
ROI node -> voxel box, voxel box -> new ROI node.

Only VTK and numpy are imported, so this runs inside Slicer and headless against the
``slicer-core`` MRML classes. The arithmetic lives in the client's ``roi_geometry``.
"""

from __future__ import annotations

import logging

import numpy as np
import vtk
from vtk.util import numpy_support

from MedMVLSlicerLib.clientlib import RoiError
from MedMVLSlicerLib.clientlib import roi_geometry as rg

logger = logging.getLogger(__name__)


def _vtk_to_numpy_matrix(m: "vtk.vtkMatrix4x4") -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def _numpy_to_vtk_matrix(a: np.ndarray) -> "vtk.vtkMatrix4x4":
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def parent_to_world(node) -> np.ndarray:
    """4x4 matrix from the node's own coordinates to world (identity without a parent).

    Raises :class:`RoiError` for a non-linear parent transform (the worker needs a linear
    geometry): harden or remove the transform first.
    """
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise RoiError(f"node '{node.GetName()}' is under a non-linear transform; harden the "
                       "transform (Transforms module) or remove it before asking the model")
    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return _vtk_to_numpy_matrix(m)


def volume_ijk_to_world(volume_node) -> np.ndarray:
    """IJK-to-RAS (world) 4x4 of a volume node, parent transforms included."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return parent_to_world(volume_node) @ _vtk_to_numpy_matrix(m)


def volume_array(volume_node) -> np.ndarray:
    """A copy of the voxels, [k, j, i] (scalar) or [k, j, i, C] (vector/RGB volumes)."""
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise RoiError("the selected volume has no image data; load an image first")
    dims = image.GetDimensions()  # (i, j, k)
    scalars = image.GetPointData().GetScalars()
    comps = scalars.GetNumberOfComponents()
    arr = numpy_support.vtk_to_numpy(scalars)
    shape = (dims[2], dims[1], dims[0]) + ((comps,) if comps > 1 else ())
    return np.array(arr.reshape(shape), copy=True)


def roi_corners_world(roi_node) -> np.ndarray:
    """The 8 corners [8, 3] of an ROI node in world RAS (rotation and parent transforms applied)."""
    if roi_node is None:
        raise RoiError("no ROI selected; place an ROI (box) on the image first")
    size = [float(v) for v in roi_node.GetSize()]
    if min(size) < 0:
        raise RoiError(f"ROI '{roi_node.GetName()}' has a negative size {size}")
    object_to_node = _vtk_to_numpy_matrix(roi_node.GetObjectToNodeMatrix())
    to_world = parent_to_world(roi_node) @ object_to_node
    return rg.roi_corners([0.0, 0.0, 0.0], size, np.eye(3), to_world)


def roi_node_to_voxel_box(roi_node, volume_node) -> tuple[int, int, int, int, int, int]:
    """Voxel box ``(k1, j1, i1, k2, j2, i2)`` of the ROI on the volume, clipped; 2D images
    (one slice) always get ``k1, k2 = 0, 1``."""
    image = volume_node.GetImageData()
    if image is None:
        raise RoiError("the selected volume has no image data; load an image first")
    i, j, k = image.GetDimensions()
    return rg.points_to_voxel_box(roi_corners_world(roi_node), volume_ijk_to_world(volume_node),
                                  (k, j, i))


def set_roi_node_from_box(roi_node, roi: "rg.RoiBox") -> None:
    """Set an ROI node (without a parent transform) to an oriented RAS box."""
    roi_node.SetSize(*[float(s) for s in roi.size])
    roi_node.SetAndObserveObjectToNodeMatrix(_numpy_to_vtk_matrix(roi.object_to_world()))


def voxel_box_to_roi_node(scene, volume_node, box, name: str):
    """Create a named ``vtkMRMLMarkupsROINode`` in world RAS covering voxel box ``box`` of
    ``volume_node``, oriented along the volume's axes. Returns the node."""
    image = volume_node.GetImageData()
    if image is not None:
        i, j, k = image.GetDimensions()
        box = rg.validate_voxel_box(box, (k, j, i))
    roi = rg.voxel_box_to_roi(box, volume_ijk_to_world(volume_node))
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    if node is None:  # scenes without the markups node registered
        raise RoiError("this scene cannot create ROI nodes (Markups module missing)")
    set_roi_node_from_box(node, roi)
    return node
