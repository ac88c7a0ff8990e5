"""A segment / label as the region: voxel boxes against SimpleITK's LabelShapeStatistics, label
maps on other grids, DICOM SEG through highdicom, and the errors a user can run into."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medmvl_core.client import segments
from medmvl_core.client.roi_geometry import ijk_to_ras_from_lps, points_to_voxel_box, roi_corners
from medmvl_core.errors import ImageReadError, RoiError
from medmvl_core.imaging import read_image
from medmvl_core.viewer.labelmaps import label_region, read_label_map

SPACING, ORIGIN = (0.8, 0.9, 2.5), (-30.0, 12.0, 40.0)
C, S = np.cos(0.35), np.sin(0.35)
DIRECTION = (C, -S, 0.0, S, C, 0.0, 0.0, 0.0, 1.0)  # rotated about the z axis


def _labels():
    a = np.zeros((12, 20, 24), np.uint8)  # [k, j, i]
    a[3:7, 5:11, 2:9] = 1
    a[8, 15, 20] = 2  # one voxel
    a[2:10, 1:3, 14:23] = 3
    a[5, 12, 10] = 3  # a stray voxel widens label 3's box
    return a


@pytest.fixture(scope="module")
def labelmap_file(tmp_path_factory):
    img = sitk.GetImageFromArray(_labels())
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    path = tmp_path_factory.mktemp("seg") / "labels.nii.gz"
    sitk.WriteImage(img, str(path))
    return path, img


def _image_geometry(img):
    m = ijk_to_ras_from_lps(img.GetSpacing(), img.GetOrigin(), np.reshape(img.GetDirection(), (3, 3)))
    return tuple(reversed(img.GetSize())), m


def test_label_boxes_match_simpleitk_label_shape_statistics(labelmap_file):
    path, img = labelmap_file
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(img)
    shape, ijk_to_ras = _image_geometry(img)
    lm = read_label_map(path)
    assert lm.labels() == [1, 2, 3]
    for label in stats.GetLabels():
        x, y, z, sx, sy, sz = stats.GetBoundingBox(label)  # index space, (i, j, k) + sizes
        region = label_region(lm, label, shape, ijk_to_ras)
        assert region.box == (z, y, x, z + sz, y + sy, x + sx), label
        assert region.voxels == stats.GetNumberOfPixels(label) and not region.clipped


def test_segment_and_drawn_roi_around_the_same_voxels_agree(labelmap_file):
    _, img = labelmap_file
    shape, m = _image_geometry(img)
    # An ROI drawn exactly around voxels i 2..8, j 5..10, k 3..6 (oriented with the volume).
    lo, hi = np.array([2, 5, 3]) - 0.5, np.array([8, 10, 6]) + 0.5
    center_ijk = (lo + hi) / 2
    axes = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)
    roi_box = points_to_voxel_box(
        roi_corners(m[:3, :3] @ center_ijk + m[:3, 3], (hi - lo) * np.array(SPACING), axes), m, shape)
    assert segments.segment_region(_labels() == 1, m, shape, m).box == roi_box == (3, 5, 2, 7, 11, 9)


def test_segment_on_a_coarser_grid_maps_through_world_space():
    fine = ijk_to_ras_from_lps((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    # Coarse voxels are 2x2x2 fine voxels; coarse voxel centre c sits at fine 2c + 0.5.
    coarse = ijk_to_ras_from_lps((2.0, 2.0, 2.0), (0.5, 0.5, 0.5), np.eye(3))
    mask = np.zeros((5, 5, 5), bool)
    mask[1:3, 2:4, 0:2] = True
    region = segments.segment_region(mask, coarse, (10, 10, 10), fine, "liver")
    assert region.box == (2, 4, 0, 6, 8, 4) and not region.clipped
    # Shifted half outside the image: clipped, and said so.
    shifted = coarse.copy()
    shifted[:3, 3] += np.diag([-1.0, -1.0, 1.0]) @ np.array([0.0, 0.0, 6.0])  # +6 mm along k (LPS z)
    part = segments.segment_region(mask, shifted, (10, 10, 10), fine, "liver")
    assert part.clipped and part.box == (8, 4, 0, 10, 8, 4)


def test_empty_outside_and_mismatched_label_maps_say_what_to_do(labelmap_file, tmp_path):
    path, img = labelmap_file
    shape, m = _image_geometry(img)
    lm = read_label_map(path)
    with pytest.raises(RoiError, match="'label 9' is empty"):
        label_region(lm, 9, shape, m)
    far = m.copy()
    far[:3, 3] += 1000.0
    with pytest.raises(RoiError, match="lies outside the image"):
        segments.segment_region(_labels() == 1, far, shape, m, "label 1")
    with pytest.raises(RoiError, match="does not match the image's .* made on another image"):
        label_region(lm, 1, (12, 20, 25), m)
    with pytest.raises(RoiError, match="does not match"):
        label_region(lm, 1, shape, far)
    ct = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32))
    sitk.WriteImage(ct, str(tmp_path / "ct.nrrd"))
    with pytest.raises(ImageReadError, match="not a label map"):
        read_label_map(tmp_path / "ct.nrrd")


def test_dicom_seg_label_becomes_the_region(tmp_path):
    hd = pytest.importorskip("highdicom")
    import pydicom

    from medmvl_core.imaging.testing import write_ct_slice

    folder = tmp_path / "ct"
    folder.mkdir()
    iop = (C, S, 0.0, -S, C, 0.0)
    normal = np.cross(iop[:3], iop[3:])
    for k in range(6):
        write_ct_slice(folder / f"im{k}.dcm", np.zeros((10, 12)), position=np.array([5.0, -7.0, 20.0]) + 2.0 * k * normal,
                       iop=iop, spacing=(0.7, 0.8, 2.0), series_uid="1.2.826.0.1.3680043.8.498.5",
                       instance=k + 1, frame_uid="1.2.826.0.1.3680043.8.498.6")
    sources = sorted((pydicom.dcmread(p) for p in folder.iterdir()), key=lambda d: d.InstanceNumber)
    for d in sources:  # type-2 patient/study attributes highdicom copies
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                   "StudyID", "AccessionNumber", "ReferringPhysicianName"):
            setattr(d, kw, getattr(d, kw, ""))
    mask = np.zeros((6, 10, 12), bool)
    mask[1:4, 2:5, 3:6] = True
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="kidney", segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept("64033007", "SCT", "Kidney"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(sources, mask, hd.seg.SegmentationTypeValues.BINARY, [desc], hd.UID(), 2, hd.UID(), 1,
                              "test", "model", "1", "0")
    seg.save_as(tmp_path / "seg.dcm")
    vol = read_image(str(folder))
    m = ijk_to_ras_from_lps(vol.spacing, vol.origin, vol.direction)
    lm = read_label_map(tmp_path / "seg.dcm")
    assert lm.kind == "dicom-seg" and lm.name(1) == "kidney" and lm.labels() == [1]
    region = label_region(lm, 1, vol.array.shape, m, "1.2.826.0.1.3680043.8.498.6")
    assert region.box == (1, 2, 3, 4, 5, 6) and region.voxels == 27
    with pytest.raises(RoiError, match="another frame of reference"):
        label_region(lm, 1, vol.array.shape, m, "1.2.3")
