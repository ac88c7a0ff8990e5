"""medmvl_core.client.roi_geometry (pure numpy). LPS geometry is checked against SimpleITK,
which defines the LPS convention our readers use; MRML checks are in test_roi_geometry_mrml.py."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medmvl_core.client import roi_geometry as rg
from medmvl_core.errors import RoiError


def _sitk_image(direction):
    img = sitk.Image(7, 6, 5, sitk.sitkInt16)  # size (i, j, k)
    img.SetSpacing((0.7, 0.9, 2.0))
    img.SetOrigin((-100.0, 50.0, 20.0))
    img.SetDirection(tuple(np.asarray(direction, float).reshape(-1)))
    return img


OBLIQUE = np.array([[0.8660254, -0.5, 0.0], [0.5, 0.8660254, 0.0], [0.0, 0.0, 1.0]])


@pytest.mark.parametrize("direction", [np.eye(3), OBLIQUE, np.diag([1.0, -1.0, -1.0])])
def test_ijk_to_ras_from_lps_matches_simpleitk(direction):
    img = _sitk_image(direction)
    m = rg.ijk_to_ras_from_lps(img.GetSpacing(), img.GetOrigin(), np.reshape(img.GetDirection(), (3, 3)))
    for idx in [(0, 0, 0), (6, 5, 4), (2.5, 1.0, 3.25)]:
        lps = img.TransformContinuousIndexToPhysicalPoint(idx)
        ras = m @ np.array([*idx, 1.0])
        np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-9)
    spacing, origin, d = rg.lps_from_ijk_to_ras(m)
    np.testing.assert_allclose(spacing, img.GetSpacing())
    np.testing.assert_allclose(origin, img.GetOrigin())
    np.testing.assert_allclose(d, np.reshape(img.GetDirection(), (3, 3)), atol=1e-12)


def test_ras_ijk_points_round_trip():
    m = rg.ijk_to_ras_from_lps((0.5, 0.6, 3.0), (1, 2, 3), OBLIQUE)
    pts = np.array([[0.0, 0.0, 0.0], [3.5, 2.0, 1.0]])
    np.testing.assert_allclose(rg.ras_to_ijk_points(rg.ijk_to_ras_points(pts, m), m), pts, atol=1e-12)


def test_box_roi_round_trip_on_flipped_volume_gives_a_rotation():
    m = rg.ijk_to_ras_from_lps((1.0, 2.0, 3.0), (0, 0, 0), np.diag([1.0, 1.0, -1.0]))
    roi = rg.voxel_box_to_roi((2, 1, 0, 4, 3, 5), m)
    assert np.linalg.det(roi.orientation) == pytest.approx(1.0)
    np.testing.assert_allclose(roi.size, [5 * 1.0, 2 * 2.0, 2 * 3.0])
    assert rg.roi_to_voxel_box(roi, m, (6, 6, 6)) == (2, 1, 0, 4, 3, 5)


def test_thin_roi_keeps_the_voxel_holding_its_middle():
    m = np.eye(4)
    roi = rg.RoiBox(center=np.array([3.0, 2.0, 4.2]), size=np.array([2.0, 2.0, 0.1]),
                    orientation=np.eye(3))
    assert rg.roi_to_voxel_box(roi, m, (10, 10, 10)) == (4, 1, 2, 5, 4, 5)


def test_clipping_and_errors():
    m = np.eye(4)
    assert rg.points_to_voxel_box(np.array([[-5.0, -5, -5], [2.0, 3, 4]]), m, (3, 3, 3)) == (0, 0, 0, 3, 3, 3)
    with pytest.raises(RoiError, match="does not overlap"):
        rg.points_to_voxel_box(np.array([[50.0, 50, 50], [60.0, 60, 60]]), m, (3, 3, 3))
    with pytest.raises(RoiError, match="4x4"):
        rg.points_to_voxel_box(np.zeros((2, 3)), np.eye(3), (3, 3, 3))
    with pytest.raises(RoiError, match="singular"):
        rg.voxel_box_to_roi((0, 0, 0, 1, 1, 1), np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(RoiError, match="empty"):
        rg.voxel_box_to_roi((2, 0, 0, 2, 1, 1), m)
    with pytest.raises(RoiError, match="6 numbers"):
        rg.validate_voxel_box((1, 2, 3), (4, 4, 4))
    with pytest.raises(RoiError, match="degenerate"):
        rg.validate_voxel_box((5, 0, 0, 9, 2, 2), (4, 4, 4))
    assert rg.validate_voxel_box((-1, 0.4, 1, 9, 2.6, 3), (4, 4, 4)) == (0, 0, 1, 4, 3, 3)


def test_corners_and_lps_flip():
    c = rg.roi_corners([1, 2, 3], [2, 4, 6])
    np.testing.assert_allclose(c.min(axis=0), [0, 0, 0])
    np.testing.assert_allclose(c.max(axis=0), [2, 4, 6])
    assert len({tuple(p) for p in c}) == 8
    np.testing.assert_allclose(rg.flip_lps_ras_points([[1, 2, 3]]), [[-1, -2, 3]])
