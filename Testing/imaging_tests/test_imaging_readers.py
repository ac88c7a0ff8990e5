"""Readers on real files shipped with pydicom / pydicom-data and on files generated in tmp_path."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from medmvl_core.errors import ImageReadError, InvalidImageError
from medmvl_core.imaging import list_series, read_image

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from medmvl_core.imaging.testing import write_ct_series  # noqa: E402


def _hu(shape=(6, 10, 12), seed=0):
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.int16)


# ------------------------------------------------------------------ DICOM series
def test_dicom_series_hu_sorting_and_geometry(tmp_path):
    hu = _hu()
    write_ct_series(tmp_path / "s", hu)
    vol = read_image(tmp_path / "s")
    np.testing.assert_array_equal(vol.array, hu)
    assert vol.modality == "CT" and vol.source == "dicom-series"
    np.testing.assert_allclose(vol.spacing, (0.7, 0.8, 2.5))
    np.testing.assert_allclose(vol.origin, (-10.0, 20.0, 30.0))
    np.testing.assert_allclose(vol.direction, np.eye(3))
    # SimpleITK (GDCM) agrees on voxels and geometry
    r = sitk.ImageSeriesReader()
    r.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    img = r.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), vol.array)
    np.testing.assert_allclose(img.GetSpacing(), vol.spacing)
    np.testing.assert_allclose(img.GetOrigin(), vol.origin)


def test_dicom_series_float_rescale_and_oblique(tmp_path):
    hu = _hu((4, 6, 8)).astype(np.float64) * 0.5
    c, s = np.cos(0.3), np.sin(0.3)
    iop = (c, s, 0, -s, c, 0)
    write_ct_series(tmp_path / "s", hu, slope=0.5, intercept=-1000.0, iop=iop)
    vol = read_image(tmp_path / "s")
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array, hu, atol=1e-3)
    np.testing.assert_allclose(vol.direction[:, 0], iop[:3], atol=1e-6)


def test_several_series_pick_largest_or_uid_and_ties_raise(tmp_path):
    big, small = _hu((6, 8, 8), 1), _hu((3, 8, 8), 2)
    uid_big = write_ct_series(tmp_path / "f", big)
    uid_small = write_ct_series(tmp_path / "g", small)
    for p in (tmp_path / "g").iterdir():
        shutil.move(str(p), tmp_path / "f" / ("b_" + p.name))
    series = list_series(tmp_path / "f")
    assert [(s["uid"], s["files"]) for s in series] == [(uid_big, 6), (uid_small, 3)]
    np.testing.assert_array_equal(read_image(tmp_path / "f").array, big)
    np.testing.assert_array_equal(read_image(tmp_path / "f", series_uid=uid_small).array, small)
    with pytest.raises(InvalidImageError, match="not in"):
        read_image(tmp_path / "f", series_uid="1.2.3.4")
    write_ct_series(tmp_path / "h", _hu((6, 8, 8), 3))
    for p in (tmp_path / "h").iterdir():
        shutil.move(str(p), tmp_path / "f" / ("c_" + p.name))
    with pytest.raises(InvalidImageError, match="same size"):
        read_image(tmp_path / "f")


def test_mixed_sizes_in_one_series_raise(tmp_path):
    write_ct_series(tmp_path / "s", _hu((4, 10, 8)), rows_override=6)
    with pytest.raises(InvalidImageError, match="mixes slice sizes"):
        read_image(tmp_path / "s")


def test_duplicate_positions_raise(tmp_path):
    uid = write_ct_series(tmp_path / "s", _hu((3, 8, 8)))
    write_ct_series(tmp_path / "t", _hu((3, 8, 8), 5), uid=uid)
    for p in (tmp_path / "t").iterdir():
        shutil.move(str(p), tmp_path / "s" / ("x_" + p.name))
    with pytest.raises(InvalidImageError, match="share a position"):
        read_image(tmp_path / "s")


def test_empty_folder_and_non_dicom_folder(tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(ImageReadError, match="empty"):
        read_image(tmp_path / "e")
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "notes.txt").write_text("hello")
    with pytest.raises(ImageReadError, match="no DICOM"):
        read_image(tmp_path / "n")


def test_truncated_series_file_raises(tmp_path):
    write_ct_series(tmp_path / "s", _hu((3, 16, 16)), shuffle_names=False)
    f = tmp_path / "s" / "im001.dcm"
    f.write_bytes(f.read_bytes()[:-300])
    with pytest.raises(ImageReadError, match="may be truncated or corrupt"):
        read_image(tmp_path / "s")


# ------------------------------------------------------------------ real DICOM files
def test_pydicom_ct_slice():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    vol = read_image(path)
    assert vol.array.shape == (1, 128, 128) and vol.modality == "CT"
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(vol.array[0], hu)
    np.testing.assert_allclose(vol.origin, [float(v) for v in ds.ImagePositionPatient])


def test_enhanced_multiframe_ct():
    path = get_testdata_file("eCT_Supplemental.dcm")
    if path is None:
        pytest.skip("eCT_Supplemental.dcm not available (pydicom-data not installed)")
    ds = pydicom.dcmread(path)
    vol = read_image(path)
    assert vol.array.shape == (2, int(ds.Rows), int(ds.Columns))
    assert vol.source == "dicom-multiframe" and vol.modality == "CT"
    frames = ds.PerFrameFunctionalGroupsSequence
    iop = np.array([float(v) for v in ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                    .ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient] for f in frames])
    order = np.argsort(pos @ normal)  # k runs along the slice normal
    shared = ds.SharedFunctionalGroupsSequence[0]
    pvt = [(f if "PixelValueTransformationSequence" in f else shared).PixelValueTransformationSequence[0]
           for f in frames]
    for k, src in enumerate(order):  # frames sorted by position, each rescaled with its own slope/intercept
        hu = ds.pixel_array[src] * float(pvt[src].RescaleSlope) + float(pvt[src].RescaleIntercept)
        np.testing.assert_allclose(vol.array[k], hu)
    np.testing.assert_allclose(vol.origin, pos[order[0]])


def test_multiframe_without_geometry_is_refused():
    path = get_testdata_file("emri_small.dcm")  # a stripped enhanced MR: no functional groups
    if path is None:
        pytest.skip("pydicom-data not installed")
    with pytest.raises(InvalidImageError, match="multi-frame"):
        read_image(path)


def test_cr_monochrome1_voi_window_and_inversion():
    path = get_testdata_file("RG3_UNCR.dcm")
    if path is None:
        pytest.skip("pydicom-data not installed")
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    vol = read_image(path)
    assert vol.array.dtype == np.uint8 and vol.array.shape == (1, ds.Rows, ds.Columns) and vol.modality == "XR"
    voi = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds).astype(np.float64), ds, index=0)
    # inverted: the brightest VOI value becomes the darkest pixel, and the order reverses
    flat = voi.ravel()
    hi_px, lo_px = np.argmax(flat), np.argmin(flat)
    assert vol.array[0].ravel()[hi_px] < vol.array[0].ravel()[lo_px]
    corr = np.corrcoef(flat, vol.array[0].ravel().astype(float))[0, 1]
    assert corr < -0.99


def test_sr_and_seg_are_not_images(tmp_path):
    for name, what in [("test-SR.dcm", "structured report"), ("liver_1frame.dcm", "segmentation")]:
        path = get_testdata_file(name)
        assert path is not None, f"{name} ships with pydicom's test data"
        with pytest.raises(InvalidImageError, match=what):
            read_image(path)
        d = tmp_path / name
        d.mkdir()
        shutil.copy(path, d / "x.dcm")
        with pytest.raises(InvalidImageError, match=what):
            read_image(d)


def test_truncated_dicom_file():
    path = get_testdata_file("MR_truncated.dcm")
    with pytest.raises(ImageReadError, match="cannot decode the pixels.*may be truncated"):
        read_image(path)


# ------------------------------------------------------------------ ITK formats and npy
@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_itk_formats_roundtrip(tmp_path, ext):
    arr = _hu((5, 7, 9))
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.6, 1.5))
    img.SetOrigin((1.0, 2.0, 3.0))
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS-stored NIfTI seen in LPS
    sitk.WriteImage(img, str(tmp_path / f"v{ext}"))
    vol = read_image(tmp_path / f"v{ext}")
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.spacing, (0.5, 0.6, 1.5), rtol=1e-6)
    np.testing.assert_allclose(vol.origin, (1.0, 2.0, 3.0), atol=1e-5)
    np.testing.assert_allclose(vol.direction, np.diag([-1, -1, 1]), atol=1e-6)


def test_nibabel_test_data_nifti():
    nib = pytest.importorskip("nibabel")
    from pathlib import Path

    path = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    small = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    if small.exists():
        vol = read_image(small)
        ref = np.asarray(nib.load(small).dataobj)
        assert vol.array.shape == ref.shape[::-1]
        np.testing.assert_allclose(vol.array, ref.transpose(2, 1, 0))
    if path.exists():
        with pytest.raises(InvalidImageError, match="4D"):
            read_image(path)


def test_4d_nifti_and_vector_images_raise(tmp_path):
    img = sitk.Image([4, 5, 6, 3], sitk.sitkInt16)
    sitk.WriteImage(img, str(tmp_path / "t.nii.gz"))
    with pytest.raises(InvalidImageError, match="4D"):
        read_image(tmp_path / "t.nii.gz")
    vec = sitk.Image([4, 5, 6], sitk.sitkVectorFloat32, 2)
    sitk.WriteImage(vec, str(tmp_path / "v.mha"))
    with pytest.raises(InvalidImageError, match="components"):
        read_image(tmp_path / "v.mha")


def test_truncated_nifti_and_garbage(tmp_path):
    arr = _hu((8, 16, 16))
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "v.nii"))
    data = (tmp_path / "v.nii").read_bytes()
    (tmp_path / "t.nii").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(tmp_path / "t.nii")
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "v.nii.gz"))
    data = (tmp_path / "v.nii.gz").read_bytes()
    (tmp_path / "t.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(tmp_path / "t.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "v.mha"))
    data = (tmp_path / "v.mha").read_bytes()
    (tmp_path / "t.mha").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(tmp_path / "t.mha")
    (tmp_path / "g.nrrd").write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="cannot read g.nrrd"):
        read_image(tmp_path / "g.nrrd")
    (tmp_path / "x.xyz").write_bytes(b"??")
    with pytest.raises(ImageReadError, match="unknown image format"):
        read_image(tmp_path / "x.xyz")
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(tmp_path / "missing.nii")


def test_npy_volume_and_v1_shape(tmp_path):
    hu = _hu((4, 5, 6))
    np.save(tmp_path / "a.npy", hu)
    vol = read_image(tmp_path / "a.npy")
    np.testing.assert_array_equal(vol.array, hu)
    assert vol.spacing == (1.0, 1.0, 1.0) and vol.origin == (0.0, 0.0, 0.0) and vol.modality == "CT"
    np.save(tmp_path / "b.npy", hu[None].astype(np.float32))
    assert read_image(tmp_path / "b.npy").array.shape == (4, 5, 6)
    np.save(tmp_path / "c.npy", np.zeros((2, 3, 4, 5)))
    with pytest.raises(InvalidImageError, match="4D"):
        read_image(tmp_path / "c.npy")
    np.save(tmp_path / "d.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ImageReadError, match="not a readable .npy array.*numpy.save"):
        read_image(tmp_path / "d.npy")


# ------------------------------------------------------------------ 2D files
@pytest.mark.parametrize("ext,mode", [(".png", "L"), (".png", "RGB"), (".png", "I;16"), (".jpg", "RGB"),
                                      (".jpg", "L"), (".bmp", "RGB"), (".tif", "I;16"), (".tif", "RGB"),
                                      (".png", "RGBA"), (".png", "P")])
def test_2d_formats(tmp_path, ext, mode):
    from PIL import Image

    rng = np.random.default_rng(0)
    if mode == "I;16":
        arr = rng.integers(0, 65535, size=(20, 30)).astype(np.uint16)
        im = Image.fromarray(arr)
    else:
        im = Image.fromarray(rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)).convert(mode)
    im.save(tmp_path / f"i{ext}")
    vol = read_image(tmp_path / f"i{ext}")
    ref = Image.open(tmp_path / f"i{ext}")
    if mode == "I;16":
        assert vol.array.dtype == np.uint16 and vol.array.shape == (1, 20, 30)
        np.testing.assert_array_equal(vol.array[0], arr)
    elif mode == "L":
        np.testing.assert_array_equal(vol.array[0], np.asarray(ref))
    else:
        assert vol.array.shape == (1, 20, 30, 3)
        np.testing.assert_array_equal(vol.array[0], np.asarray(ref.convert("RGB")))


def test_truncated_png(tmp_path):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(tmp_path / "t.png")


def test_fixture_ct_as_dicom_series_gives_the_golden_tensor(tmp_path, reference_dir):
    """The reference HU volume written as a DICOM series (LPS axial) reaches the same model tensor."""
    from medmvl_core.imaging import preprocess, spec_from_checkpoint

    hu = np.load(reference_dir / "inputs" / "ct_volume.npy")
    write_ct_series(tmp_path / "s", hu, spacing=(0.8, 0.8, 2.0))
    tensor, geom = preprocess(tmp_path / "s", spec_from_checkpoint(reference_dir / "ct_chest_tiny", "image3d"))
    gold = np.load(reference_dir / "ct_chest_tiny" / "golden" / "infer0_image3d.npy")
    assert np.abs(tensor - gold).max() <= 1e-5
    assert geom.reorientation.is_identity


def test_radiograph_through_2d_spec():
    from medmvl_core.imaging import default_spec, preprocess

    path = get_testdata_file("RG3_UNCR.dcm")
    if path is None:
        pytest.skip("pydicom-data not installed")
    tensor, geom = preprocess(path, default_spec("siglip", 32))
    assert tensor.shape == (3, 32, 32) and np.all(np.abs(tensor) <= 1.0)
    np.testing.assert_array_equal(tensor[0], tensor[1])  # grey copied to RGB
    assert geom.kind == "image"


def test_nested_export_folder(tmp_path):
    hu = _hu((3, 6, 6), 9)
    write_ct_series(tmp_path / "export" / "PATIENT" / "STUDY" / "SERIES", hu)
    (tmp_path / "export" / "README.txt").write_text("exported")
    np.testing.assert_array_equal(read_image(tmp_path / "export").array, hu)


def test_series_falls_back_to_gdcm_when_pydicom_cannot_decode(tmp_path, monkeypatch):
    from medmvl_core.imaging import dicom

    hu = _hu((4, 8, 8), 11)
    write_ct_series(tmp_path / "s", hu)

    def no_decoder(ds):
        raise RuntimeError("no pixel data handler for this transfer syntax")

    monkeypatch.setattr(dicom, "_fast_pixels", no_decoder)
    np.testing.assert_array_equal(read_image(tmp_path / "s").array, hu)
