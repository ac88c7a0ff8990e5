"""The Slicer Logic's geometry against real MRML classes (the `slicer-core` package).

Golden values come from MRML itself: ``IsPointInROIWorld`` decides which voxel centers a ROI
holds, ``TransformPointToWorld`` maps through parent transforms, ``arrayFromVolume`` gives the
voxels, ``GetRASBounds`` the world bounds of a ROI.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is installed by `make test` (dev extra)")
if not hasattr(slicer, "vtkMRMLScene"):  # a stub or another package named slicer
    pytest.skip("the installed `slicer` is not slicer-core", allow_module_level=True)

import vtk  # noqa: E402  (slicer-core's VTK)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedMVLSlicer"))
from MedMVLSlicerLib import mrml_geometry as mg  # noqa: E402

from medmvl_core.client import roi_geometry as rg  # noqa: E402
from medmvl_core.errors import RoiError  # noqa: E402


def _rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _vtk_matrix(a):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r][c]))
    return m


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def _volume(scene, shape=(6, 9, 11), spacing=(0.8, 1.3, 2.5), origin=(12.0, -30.0, 7.0),
            directions=np.eye(3), components=1):
    """A volume node with array [k, j, i] filled with its flat index."""
    cls = slicer.vtkMRMLVectorVolumeNode if components > 1 else slicer.vtkMRMLScalarVolumeNode
    node = cls()
    scene.AddNode(node)
    img = vtk.vtkImageData()
    img.SetDimensions(shape[2], shape[1], shape[0])
    img.AllocateScalars(vtk.VTK_INT, components)
    node.SetAndObserveImageData(img)
    arr = slicer.util.arrayFromVolume(node)
    arr[...] = np.arange(arr.size).reshape(arr.shape)
    slicer.util.arrayFromVolumeModified(node)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    node.SetIJKToRASDirections(*[float(v) for v in np.asarray(directions).T.reshape(-1)])
    return node


def _transform(scene, rotation, translation, parent=None):
    t = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(t)
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = rotation, translation
    t.SetMatrixTransformToParent(_vtk_matrix(m))
    if parent is not None:
        t.SetAndObserveTransformNodeID(parent.GetID())
    return t


def _voxels_inside(roi, volume):
    """Set of (k, j, i) whose world-space centers MRML says are inside the ROI."""
    dims = volume.GetImageData().GetDimensions()
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    inside = set()
    for k in range(dims[2]):
        for j in range(dims[1]):
            for i in range(dims[0]):
                ras = m.MultiplyPoint((i, j, k, 1.0))[:3]
                world = [0.0, 0.0, 0.0]
                volume.TransformPointToWorld(ras, world)
                if roi.IsPointInROIWorld(world):
                    inside.add((k, j, i))
    return inside


def _box_set(box):
    k1, j1, i1, k2, j2, i2 = box
    return {(k, j, i) for k in range(k1, k2) for j in range(j1, j2) for i in range(i1, i2)}


OBLIQUE = _rotation([1, 2, 0.5], 25.0)
FLIPPED = np.diag([1.0, -1.0, 1.0]) @ _rotation([0, 0, 1], 90.0)   # left-handed IJK


@pytest.mark.parametrize("directions", [np.eye(3), OBLIQUE, FLIPPED, -np.eye(3)],
                         ids=["axial", "oblique", "flipped", "lps-like"])
def test_ijk_to_world_matches_mrml_with_parent_transforms(scene, directions):
    vol = _volume(scene, directions=directions)
    outer = _transform(scene, _rotation([0, 1, 0], 10), [3, 4, 5])
    inner = _transform(scene, _rotation([1, 0, 0], -20), [-7, 1, 2], parent=outer)
    vol.SetAndObserveTransformNodeID(inner.GetID())
    m = mg.volume_ijk_to_world(vol)
    ijk_m = vtk.vtkMatrix4x4()
    vol.GetIJKToRASMatrix(ijk_m)
    for ijk in [(0, 0, 0), (10, 8, 5), (3.5, 2.25, 1.0)]:
        world = [0.0, 0.0, 0.0]
        vol.TransformPointToWorld(ijk_m.MultiplyPoint((*ijk, 1.0))[:3], world)
        np.testing.assert_allclose(m @ np.array([*ijk, 1.0]), [*world, 1.0], atol=1e-9)


def test_volume_array_matches_arrayFromVolume(scene):
    vol = _volume(scene)
    np.testing.assert_array_equal(mg.volume_array(vol), slicer.util.arrayFromVolume(vol))
    rgb = _volume(scene, shape=(1, 5, 7), components=3)
    out = mg.volume_array(rgb)
    assert out.shape == (1, 5, 7, 3)
    np.testing.assert_array_equal(out, slicer.util.arrayFromVolume(rgb))


@pytest.mark.parametrize("directions", [np.eye(3), OBLIQUE, FLIPPED], ids=["axial", "oblique", "flipped"])
def test_box_to_roi_node_holds_exactly_the_box_voxels(scene, directions):
    """A ROI made from a voxel box contains (per MRML) exactly those voxel centers, and the
    ROI maps back to the same box: ROI -> voxel box -> ROI round trip."""
    vol = _volume(scene, directions=directions)
    parent = _transform(scene, _rotation([1, 1, 1], 40), [5, -6, 7])
    vol.SetAndObserveTransformNodeID(parent.GetID())
    box = (1, 2, 3, 5, 7, 9)
    roi = mg.voxel_box_to_roi_node(scene, vol, box, "Found: nodule")
    assert roi.GetName() == "Found: nodule"
    assert _voxels_inside(roi, vol) == _box_set(box)
    assert mg.roi_node_to_voxel_box(roi, vol) == box
    # ... and the second ROI (from the round-tripped box) is the same ROI.
    roi2 = mg.voxel_box_to_roi_node(scene, vol, mg.roi_node_to_voxel_box(roi, vol), "again")
    np.testing.assert_allclose(roi2.GetCenterWorld(), roi.GetCenterWorld(), atol=1e-9)
    size, size2 = [0.0] * 3, [0.0] * 3
    roi.GetSizeWorld(size)
    roi2.GetSizeWorld(size2)
    np.testing.assert_allclose(size2, size, atol=1e-9)
    # Size in mm along the volume axes (i, j, k), per MRML.
    np.testing.assert_allclose(size, [6 * 0.8, 5 * 1.3, 4 * 2.5], atol=1e-9)


def test_rotated_roi_under_transform_encloses_every_inside_voxel(scene):
    vol = _volume(scene, shape=(10, 14, 16), spacing=(1.0, 1.0, 1.5), origin=(0, 0, 0))
    roi = slicer.vtkMRMLMarkupsROINode()
    scene.AddNode(roi)
    roi.SetSize(6.0, 4.0, 5.0)
    obj = np.eye(4)
    obj[:3, :3], obj[:3, 3] = _rotation([0.3, 0.2, 1.0], 35), [6.0, 7.0, 6.0]
    roi.SetAndObserveObjectToNodeMatrix(_vtk_matrix(obj))
    parent = _transform(scene, _rotation([0, 0, 1], 15), [1.5, -0.5, 2.0])
    roi.SetAndObserveTransformNodeID(parent.GetID())

    box = mg.roi_node_to_voxel_box(roi, vol)
    inside = _voxels_inside(roi, vol)
    assert inside and inside <= _box_set(box)
    # Tight: for an axis-aligned volume the box is the voxels whose centers lie within the
    # ROI's world bounds (MRML's GetRASBounds: all 8 corners, transforms applied).
    b = [0.0] * 6
    roi.GetRASBounds(b)
    sp = (1.0, 1.0, 1.5)
    lo = [int(np.ceil(b[2 * a] / sp[a])) for a in range(3)]
    hi = [int(np.floor(b[2 * a + 1] / sp[a])) + 1 for a in range(3)]
    assert box == (lo[2], lo[1], lo[0], hi[2], hi[1], hi[0])
    # An axis-aligned ROI of the same size would miss voxels of the rotated one.
    assert len(_box_set(box)) > len(inside)


def test_roi_clipped_to_volume_and_outside_is_an_error(scene):
    vol = _volume(scene, shape=(4, 5, 6), spacing=(1, 1, 1), origin=(0, 0, 0))
    roi = slicer.vtkMRMLMarkupsROINode()
    scene.AddNode(roi)
    roi.SetCenter(4.0, 3.0, 2.0)
    roi.SetSize(6.0, 3.0, 100.0)
    assert mg.roi_node_to_voxel_box(roi, vol) == (0, 2, 1, 4, 5, 6)
    roi.SetCenter(400.0, 3.0, 2.0)
    with pytest.raises(RoiError, match="does not overlap"):
        mg.roi_node_to_voxel_box(roi, vol)


def test_2d_image_box_is_one_slice(scene):
    img = _volume(scene, shape=(1, 20, 30), spacing=(0.5, 0.5, 1.0), origin=(0, 0, 0), components=3)
    roi = slicer.vtkMRMLMarkupsROINode()
    scene.AddNode(roi)
    roi.SetCenter(5.1, 4.1, 7.0)  # off the image plane along k: still the one slice
    roi.SetSize(4.0, 3.0, 0.1)
    box = mg.roi_node_to_voxel_box(roi, img)
    assert (box[0], box[3]) == (0, 1)
    # Reference: the same ROI moved onto the image plane, voxel membership per MRML.
    roi.SetCenter(5.1, 4.1, 0.0)
    roi.SetSize(4.0, 3.0, 0.5)
    assert _voxels_inside(roi, img) == _box_set(box)
    assert box == (0, 6, 7, 1, 12, 15)


def test_non_linear_parent_transform_is_rejected(scene):
    vol = _volume(scene)
    grid = slicer.vtkMRMLGridTransformNode()
    scene.AddNode(grid)
    vol.SetAndObserveTransformNodeID(grid.GetID())
    if grid.IsTransformToWorldLinear():
        pytest.skip("this slicer-core treats an empty grid transform as linear")
    with pytest.raises(RoiError, match="non-linear"):
        mg.volume_ijk_to_world(vol)


def test_empty_volume_is_a_clear_error(scene):
    node = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(node)
    with pytest.raises(RoiError, match="no image data"):
        mg.volume_array(node)


def test_lps_geometry_for_the_worker_matches_mrml(scene):
    """What the worker receives (LPS spacing/origin/direction) maps IJK to the same points."""
    vol = _volume(scene, directions=OBLIQUE)
    spacing, origin, direction = rg.lps_from_ijk_to_ras(mg.volume_ijk_to_world(vol))
    np.testing.assert_allclose(spacing, (0.8, 1.3, 2.5))
    m = vtk.vtkMatrix4x4()
    vol.GetIJKToRASMatrix(m)
    ijk = np.array([4.0, 3.0, 2.0])
    lps = np.asarray(origin) + np.asarray(direction) @ (ijk * spacing)
    ras = m.MultiplyPoint((*ijk, 1.0))[:3]
    np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-9)
