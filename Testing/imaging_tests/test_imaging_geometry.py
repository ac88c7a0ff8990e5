"""Orientation, geometry record round trips, ROI crops, bad input and the ``medmvl preprocess`` CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from medmvl_core.errors import ConfigError, InvalidImageError, RoiError
from medmvl_core.imaging import GeometryRecord, Volume, default_spec, preprocess
from medmvl_core.imaging.orientation import reorient

NATIVE = {"kind": "volume", "hu_window": None, "crop_foreground": False, "size": [4, 5, 6],
          "cast_uint8": False, "channels": 1, "orientation": "native", "normalize": {"type": "none"}}


def _rot(axis, angle):
    c, s = np.cos(angle), np.sin(angle)
    m = np.eye(3)
    i, j = [a for a in range(3) if a != axis]
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


DIRECTIONS = {
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, -1.0, 1.0]),
    "permuted": np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float),  # a sagittal-like acquisition
    "oblique": _rot(2, 0.3) @ _rot(0, -0.2) @ np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]], float),
}


def _world(vol: Volume, kji: np.ndarray) -> np.ndarray:
    return (vol.direction @ (np.asarray(vol.spacing) * kji[..., ::-1]).T).T + np.asarray(vol.origin)


@pytest.mark.parametrize("name", list(DIRECTIONS))
@pytest.mark.parametrize("code", ["LPS", "RAS"])
def test_reorientation_keeps_every_voxel_at_its_physical_place(name, code):
    rng = np.random.default_rng(0)
    vol = Volume(rng.normal(size=(5, 6, 7)), (0.5, 0.7, 2.0), (10.0, -20.0, 5.0), DIRECTIONS[name], "CT")
    out, plan = reorient(vol, code)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in out.array.shape], indexing="ij"), -1).reshape(-1, 3)
    src = (plan.to_source_edges(idx + 0.5) - 0.5).round().astype(int)
    np.testing.assert_array_equal(out.array[tuple(idx.T)], vol.array[tuple(src.T)])
    np.testing.assert_allclose(_world(out, idx.astype(float)), _world(vol, src.astype(float)), atol=1e-9)
    # the new axes point as close as possible to the code's directions
    target = {"LPS": np.eye(3), "RAS": np.diag([-1.0, -1.0, 1.0])}[code]
    assert np.all(np.diag(target.T @ out.direction) > 0.7)


def test_lps_is_identity_for_npy_and_native_keeps_axes():
    vol = Volume(np.zeros((3, 4, 5)))
    out, plan = reorient(vol, "LPS")
    assert plan.is_identity and out is vol
    flipped = Volume(np.arange(60).reshape(3, 4, 5), direction=np.diag([-1.0, 1.0, 1.0]))
    out, plan = reorient(flipped, "native")
    assert plan.is_identity and out.array is flipped.array
    out, plan = reorient(flipped, "LPS")
    np.testing.assert_array_equal(out.array, flipped.array[:, :, ::-1])
    with pytest.raises(ConfigError, match="orientation code"):
        reorient(flipped, "LPX")


def test_ras_nifti_is_reoriented_like_an_lps_dicom(tmp_path):
    """The same patient stored RAS-flipped in NIfTI gives the same model tensor as the LPS array."""
    rng = np.random.default_rng(1)
    lps = rng.integers(-1000, 1000, size=(6, 8, 10)).astype(np.int16)
    img = sitk.GetImageFromArray(lps[:, ::-1, ::-1].copy())
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(img, str(tmp_path / "v.nii.gz"))
    spec = default_spec("siglip_slices", 8)
    a, _ = preprocess(lps, spec)
    b, geom = preprocess(tmp_path / "v.nii.gz", spec)
    np.testing.assert_array_equal(a, b)
    assert geom.reorientation.flip == (False, True, True)


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_geometry_round_trips(name):
    rng = np.random.default_rng(2)
    hu = np.full((20, 24, 28), -1000, np.int16)
    hu[3:17, 5:20, 2:25] = rng.integers(-900, 1000, size=(14, 15, 23))
    vol = Volume(hu, (0.8, 0.9, 2.5), (-100.0, 50.0, 20.0), DIRECTIONS[name], "CT")
    tensor, geom = preprocess(vol, default_spec("siglip_slices", 16))
    assert tensor.shape == (3, 32, 16, 16)
    # model <-> voxel <-> physical points
    pts = rng.uniform(0, 1, size=(50, 3))
    vox = geom.model_to_voxel(pts)
    np.testing.assert_allclose(geom.voxel_to_model(vox), pts, atol=1e-12)
    phys = geom.voxel_to_physical(vox, "RAS")
    np.testing.assert_allclose(geom.physical_to_voxel(phys, "RAS"), vox, atol=1e-9)
    np.testing.assert_allclose(geom.physical_to_model(geom.model_to_physical(pts)), pts, atol=1e-9)
    # the model box [0, 1]^3 is the foreground box of the source
    box = geom.model_box_to_voxel([0, 0, 0, 1, 1, 1])
    fg = np.argwhere(hu > -1000)
    assert box == tuple(fg.min(0)) + tuple(fg.max(0) + 1)
    # voxel boxes survive voxel -> model -> voxel exactly
    for _ in range(10):
        lo = rng.integers([3, 5, 2], [10, 12, 12])
        hi = lo + rng.integers(1, 5, size=3)
        vb = tuple(int(v) for v in np.concatenate([lo, hi]))
        assert geom.model_box_to_voxel(geom.voxel_box_to_model(vb)) == vb
    # record survives JSON
    again = GeometryRecord.from_dict(json.loads(geom.to_json()))
    np.testing.assert_allclose(again.model_to_voxel(pts), vox)


def test_physical_of_voxel_matches_simpleitk():
    d = DIRECTIONS["oblique"]
    vol = Volume(np.ones((4, 5, 6), np.int16) * 100, (0.5, 0.6, 1.7), (3.0, -4.0, 5.0), d, "CT")
    _, geom = preprocess(vol, default_spec("siglip_slices", 8))
    img = sitk.GetImageFromArray(vol.array)
    img.SetSpacing(vol.spacing)
    img.SetOrigin(vol.origin)
    img.SetDirection(d.ravel().tolist())
    for kji in [(0, 0, 0), (3, 4, 5), (1, 2, 3)]:
        ref = img.TransformContinuousIndexToPhysicalPoint([float(v) for v in kji[::-1]])
        np.testing.assert_allclose(geom.voxel_to_physical(np.array(kji, float)), ref, atol=1e-9)
        np.testing.assert_allclose(geom.voxel_to_physical(np.array(kji, float), "RAS"),
                                   [-ref[0], -ref[1], ref[2]], atol=1e-9)


def test_2d_geometry_and_boxes():
    rgb = np.random.default_rng(3).integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    _, geom = preprocess(rgb, default_spec("siglip", 32))
    assert geom.box2d_to_pixels((0, 0, 100, 100)) == (0, 0, 60, 40)
    assert geom.box2d_to_pixels((25, 50, 75, 100)) == (15, 20, 45, 40)
    assert geom.pixels_to_box2d((15, 20, 45, 40)) == (25, 50, 75, 100)
    # CLIP: shortest edge 30 -> 30x45, centre crop 30x30 from left 7 -> source x [9.33, 49.33)
    _, g2 = preprocess(rgb, default_spec("clip", 30))
    assert np.allclose(g2.region_start[1:], (0.0, 7 * 60 / 45)) and np.allclose(g2.region_extent[1:], (40, 40))
    x1, y1, x2, y2 = g2.box2d_to_pixels((0, 0, 100, 100))
    assert (y1, y2) == (0, 40) and (x1, x2) == (9, 50)


def test_roi_crop_equals_cropping_the_array_and_maps_back():
    rng = np.random.default_rng(4)
    hu = rng.integers(-500, 1000, size=(20, 30, 40)).astype(np.int16)
    spec = default_spec("siglip_slices", 16)
    roi = (2, 5, 10, 12, 25, 30)
    a, geom = preprocess(hu, spec, roi=roi)
    b, _ = preprocess(hu[2:12, 5:25, 10:30], spec)
    np.testing.assert_array_equal(a, b)
    assert geom.model_box_to_voxel([0, 0, 0, 1, 1, 1]) == roi
    m, gm = preprocess(hu, spec, roi=roi, margin=3)
    assert gm.model_box_to_voxel([0, 0, 0, 1, 1, 1]) == (0, 2, 7, 15, 28, 33)
    # the ROI in a reoriented volume refers to the source array
    flipped = Volume(hu[:, :, ::-1].copy(), direction=np.diag([-1.0, 1.0, 1.0]), modality="CT")
    c, gc = preprocess(flipped, spec, roi=(2, 5, 10, 12, 25, 30))
    np.testing.assert_array_equal(c, preprocess(hu[2:12, 5:25, 10:30], spec)[0])
    assert gc.model_box_to_voxel([0, 0, 0, 1, 1, 1]) == (2, 5, 10, 12, 25, 30)


@pytest.mark.parametrize("roi,match", [
    ((0, 0, 0, 5, 5), "six integers"), ((5, 5, 5, 5, 8, 8), "empty or inverted"),
    ((30, 0, 0, 40, 5, 5), "outside the volume"), ((-9, -9, -9, 0, 0, 0), "empty or inverted|outside"),
    (("a", 0, 0, 1, 1, 1), "six integers"),
])
def test_bad_rois(roi, match):
    with pytest.raises(RoiError, match=match):
        preprocess(np.zeros((10, 10, 10), np.int16) + 100, default_spec("siglip_slices", 8), roi=roi)


@pytest.mark.parametrize("arr,match", [
    (np.zeros((0, 4, 4)), "empty"),
    (np.full((3, 4, 4), np.nan), "NaN"),
    (np.array([[[np.inf, 0], [0, 0]]] * 2), "NaN/inf"),
    (np.zeros((2, 3, 4, 5)), "4D"),
    (np.full((4, 4, 4), -1000, np.int16), "no foreground"),
])
def test_bad_volumes(arr, match):
    with pytest.raises(InvalidImageError, match=match):
        preprocess(arr, default_spec("siglip_slices", 8))


def test_absurdly_large_volume_is_refused_without_allocating():
    big = np.lib.stride_tricks.as_strided(np.zeros(1, np.int16), shape=(20000, 512, 512), strides=(0, 0, 0))
    with pytest.raises(InvalidImageError, match="implausibly large"):
        preprocess(Volume(big, modality="CT"), default_spec("siglip_slices", 8))


def test_kind_mismatch_errors():
    with pytest.raises(InvalidImageError, match="2D images"):
        preprocess(np.zeros((5, 8, 8), np.int16), default_spec("siglip", 8))
    with pytest.raises(InvalidImageError, match="colour 2D"):
        preprocess(np.zeros((8, 8, 3), np.uint8), default_spec("siglip_slices", 8))
    with pytest.raises(ConfigError, match="invalid preprocessing spec"):
        preprocess(np.zeros((5, 8, 8)), {"kind": "volume", "size": [1, 2]})


def test_cli_preprocess_writes_exact_tensor_and_geometry(tmp_path, reference_dir):
    out = tmp_path / "x.npy"
    src = reference_dir / "inputs" / "ct_volume.npy"
    res = subprocess.run([sys.executable, "-m", "medmvl_core.cli", "preprocess", str(src), "--checkpoint",
                          str(reference_dir / "ct_chest_tiny"), "--out", str(out), "--roi", "0,0,0,40,40,40"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout)
    expected, geom = preprocess(np.load(src)[:40, :40, :40], default_spec("siglip_slices", 32))
    np.testing.assert_array_equal(np.load(out), expected)
    assert rec["geometry"]["roi"] == [[0, 40], [0, 40], [0, 40]] and rec["tensor"]["shape"] == [3, 32, 32, 32]
    assert "torch" not in res.stderr
    bad = subprocess.run([sys.executable, "-m", "medmvl_core.cli", "preprocess", str(src), "--preset",
                          "ct-chest-siglip-256", "--out", str(out), "--roi", "100,0,0,120,5,5"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "outside the volume" in bad.stderr
    unknown = subprocess.run([sys.executable, "-m", "medmvl_core.cli", "preprocess", str(src), "--preset",
                              "nope", "--out", str(out)], capture_output=True, text=True)
    assert unknown.returncode == 1 and "ct-chest-siglip-384" in unknown.stderr


def test_spec_errors_and_presets():
    from medmvl_core.imaging import PRESETS, get_preset, validate_spec

    with pytest.raises(ConfigError, match="unknown encoder type"):
        default_spec("resnet", 224)
    with pytest.raises(ConfigError, match="orientation"):
        validate_spec(dict(default_spec("siglip_slices", 8), orientation="XYZ"))
    with pytest.raises(ConfigError, match="hu_window"):
        validate_spec(dict(default_spec("siglip_slices", 8), hu_window=[5, 1]))
    for name in PRESETS:
        assert validate_spec(get_preset(name)) == get_preset(name)
    assert json.loads(json.dumps(get_preset("ct-chest-siglip-384")))["size"] == [32, 384, 384]
