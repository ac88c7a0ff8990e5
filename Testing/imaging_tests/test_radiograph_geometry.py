"""2D geometry of real DICOM radiographs and a single-slice CT (pydicom / pydicom-data test files):
photometric interpretation, VOI window, pixel spacing and rescale as the reader applies them, and the
worker's box mapping (model box <-> pixel box <-> LPS mm) through the 2D demo model's preprocessing.

Golden values come from the DICOM headers and the standard's formulas (PS3.3 C.11.2.1.2 linear window,
C.7.6.3.1.2 MONOCHROME1, C.7.6.2.1.1 position/orientation), computed here by hand, not by our code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

from medmvl_core.engine.tasks import map_box, voxel_box_to_model  # noqa: E402
from medmvl_core.imaging import preprocess, read_image  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SPEC_2D = yaml.safe_load((REPO / "training" / "configs" / "demo_xray.yaml").read_text())["model"]["preprocessing"]["image"]


def _testfile(name: str) -> str:
    try:
        path = get_testdata_file(name)
    except Exception:  # noqa: BLE001 - pydicom-data not installed / not downloadable here
        path = None
    if not path:
        pytest.skip(f"{name} is not available (pip install pydicom-data)")
    return path


@pytest.mark.parametrize("name", ["RG3_UNCR.dcm", "RG1_UNCR.dcm"])
def test_cr_pixels_follow_the_window_and_monochrome1(name):
    ds = pydicom.dcmread(_testfile(name))
    assert ds.Modality == "CR" and ds.PhotometricInterpretation == "MONOCHROME1"
    x = ds.pixel_array.astype(np.float64)
    c, w, ymax = float(ds.WindowCenter), float(ds.WindowWidth), 2.0 ** int(ds.BitsStored) - 1
    y = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * ymax     # the linear VOI window
    y = ymax - y                                                  # MONOCHROME1: high values are dark
    expected = np.round(y / ymax * 255)
    vol = read_image(_testfile(name))
    assert vol.array.shape == (1, *x.shape) and vol.array.dtype == np.uint8
    assert np.abs(vol.array[0].astype(np.float64) - expected).max() <= 1


def test_cr_with_zero_pixel_spacing_opens_with_1mm_pixels():
    """RG1_UNCR.dcm carries PixelSpacing 0\\0 (and no ImagerPixelSpacing): it used to be refused as a
    volume with a non-positive spacing; it now opens with 1 mm pixels (the header gives no size)."""
    ds = pydicom.dcmread(_testfile("RG1_UNCR.dcm"), stop_before_pixels=True)
    assert [float(v) for v in ds.PixelSpacing] == [0.0, 0.0]
    assert read_image(_testfile("RG1_UNCR.dcm")).spacing == (1.0, 1.0, 1.0)


def test_imager_pixel_spacing_is_used_when_pixel_spacing_is_absent(tmp_path):
    ds = pydicom.dcmread(_testfile("RG3_UNCR.dcm"))
    ds.ImagerPixelSpacing = [0.2, 0.15]                           # row spacing, column spacing
    ds.Modality = "DX"
    path = tmp_path / "dx.dcm"
    ds.save_as(path)
    vol = read_image(str(path))
    assert vol.spacing == (0.15, 0.2, 1.0)                        # (i, j) = (column, row)


def test_non_square_radiograph_box_maps_to_pixels_and_mm():
    """A 2D box {<x1><y1><x2><y2>} (0-100 of the image) -> pixel box (rows, columns) -> LPS mm."""
    vol = read_image(_testfile("RG1_UNCR.dcm"))                   # 1955 rows x 1841 columns
    h, w = vol.array.shape[1:3]
    x, geom = preprocess(vol, SPEC_2D)
    assert x.shape == (3, 128, 128)                               # squashed to the model's square input
    got = map_box([25, 50, 75, 100], geom, vol, "image")
    j1, i1, j2, i2 = 0.5 * h, 0.25 * w, 1.0 * h, 0.75 * w         # continuous pixel edges
    assert got["voxel"] == [np.floor(j1), np.floor(i1), np.ceil(j2), np.ceil(i2)]
    # pixel centres sit at integer indices, so an edge at index e lies at (e - 0.5) * spacing (1 mm here)
    assert got["physical_lps"][:2] == pytest.approx([i1 - 0.5, j1 - 0.5])
    assert got["physical_lps"][3:5] == pytest.approx([i2 - 0.5, j2 - 0.5])
    # and back: a pixel box -> the model's 0-100 box
    assert voxel_box_to_model([j1, i1, j2, i2], geom, "image") == pytest.approx([25, 50, 75, 100])


def test_single_slice_ct_rescale_spacing_and_position():
    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    vol = read_image(_testfile("CT_small.dcm"))
    raw = ds.pixel_array.astype(np.float64)
    assert vol.array.shape == (1, 128, 128)
    np.testing.assert_allclose(vol.array[0], raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    sx, sy = float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])
    origin = np.array([float(v) for v in ds.ImagePositionPatient])
    row, col = (np.array([float(v) for v in ds.ImageOrientationPatient[:3]]),
                np.array([float(v) for v in ds.ImageOrientationPatient[3:]]))
    _, geom = preprocess(vol, SPEC_2D)
    got = map_box([25, 50, 75, 100], geom, vol, "image")
    assert got["voxel"] == [64, 32, 128, 96]
    lo = origin + row * (32 - 0.5) * sx + col * (64 - 0.5) * sy    # the box's first corner, edges at -0.5
    hi = origin + row * (96 - 0.5) * sx + col * (128 - 0.5) * sy
    assert got["physical_lps"][:2] == pytest.approx(lo[:2], abs=1e-4)
    assert got["physical_lps"][3:5] == pytest.approx(hi[:2], abs=1e-4)
