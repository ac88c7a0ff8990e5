"""A 2D model's returned box drawn in Slicer: the worker maps ``{<x1><y1><x2><y2>}`` to a pixel box
``(j1, i1, j2, i2)``; the panel turns it into an ROI on the single-slice volume, in world RAS.

Golden values come from MRML (``slicer-core``): ``IsPointInROIWorld`` decides which pixel centres the
ROI holds, and the ROI's RAS bounds are checked against the pixel edges computed by hand from the
volume's spacing, origin and directions."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is installed by `make test` (dev extra)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed `slicer` is not slicer-core", allow_module_level=True)

import vtk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedMVLSlicer"))
from MedMVLSlicerLib import mrml_geometry as mg  # noqa: E402

from medmvl_core.client import controller as ctl  # noqa: E402
from medmvl_core.client import roi_geometry as rg  # noqa: E402
from medmvl_core.errors import RoiError  # noqa: E402


def _radiograph(scene, rows=40, cols=30, spacing=(0.15, 0.2), origin=(-12.0, 30.0, 5.0), directions=np.eye(3),
                components=1):
    """A single-slice volume [1, rows, cols] as Slicer loads a radiograph (vector for RGB)."""
    cls = slicer.vtkMRMLVectorVolumeNode if components > 1 else slicer.vtkMRMLScalarVolumeNode
    node = cls()
    scene.AddNode(node)
    img = vtk.vtkImageData()
    img.SetDimensions(cols, rows, 1)
    img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, components)
    node.SetAndObserveImageData(img)
    node.SetSpacing(spacing[0], spacing[1], 1.0)
    node.SetOrigin(*origin)
    node.SetIJKToRASDirections(*[float(v) for v in np.asarray(directions).T.reshape(-1)])
    return node


def _pixels_inside(roi, volume):
    dims = volume.GetImageData().GetDimensions()
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return {(j, i) for j in range(dims[1]) for i in range(dims[0])
            if roi.IsPointInROIWorld(m.MultiplyPoint((i, j, 0, 1.0))[:3])}


# Slicer shows a radiograph read from DICOM/PNG in LPS-flipped axes (directions -1, -1, 1)
LPS = np.diag([-1.0, -1.0, 1.0])


@pytest.mark.parametrize("directions", [np.eye(3), LPS], ids=["ras", "lps"])
@pytest.mark.parametrize("components", [1, 3], ids=["grey", "rgb"])
def test_2d_answer_box_becomes_an_roi_on_the_one_slice(directions, components):
    scene = slicer.vtkMRMLScene()
    vol = _radiograph(scene, directions=directions, components=components)
    answer_boxes = [{"model": [20, 25, 60, 75], "voxel": [10, 6, 30, 18]},   # 2D: (j1, i1, j2, i2)
                    {"model": [20, 25, 60, 75], "voxel": [10.0, 6.0, 30.0, 18.0]}]
    boxes = ctl.unique_voxel_boxes(answer_boxes)
    assert boxes == [(0, 10, 6, 1, 30, 18)]                                  # one box, on slice 0
    roi = mg.voxel_box_to_roi_node(scene, vol, boxes[0], "MedM-VL nodule")
    assert _pixels_inside(roi, vol) == {(j, i) for j in range(10, 30) for i in range(6, 18)}
    # RAS bounds: pixel edges at index - 0.5, along the volume's axes
    sx, sy = 0.15, 0.2
    origin = np.array([-12.0, 30.0, 5.0])
    corners = [origin + directions @ np.array([(i - 0.5) * sx, (j - 0.5) * sy, 0.0])
               for i in (6, 18) for j in (10, 30)]
    lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)
    np.testing.assert_allclose(bounds[0::2][:2], lo[:2], atol=1e-6)
    np.testing.assert_allclose(bounds[1::2][:2], hi[:2], atol=1e-6)
    assert bounds[4] <= 5.0 <= bounds[5]                                     # it spans the image plane
    # and the ROI read back is the same pixel box (what "describe this region" sends)
    assert mg.roi_node_to_voxel_box(roi, vol) == boxes[0]


def test_bad_2d_boxes_are_clear_errors():
    assert rg.as_volume_box([1, 2, 3, 4]) == (0, 1, 2, 1, 3, 4)
    assert rg.as_volume_box([0, 1, 2, 3, 4, 5]) == (0, 1, 2, 3, 4, 5)
    with pytest.raises(RoiError, match="4 for a 2D image"):
        rg.as_volume_box([1, 2, 3])
    scene = slicer.vtkMRMLScene()
    vol = _radiograph(scene)
    with pytest.raises(RoiError, match="empty"):
        mg.voxel_box_to_roi_node(scene, vol, rg.as_volume_box([50, 6, 60, 18]), "outside the image")
