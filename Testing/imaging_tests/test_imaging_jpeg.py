"""JPEG radiographs through the reader: the pixels Pillow decodes, on the PNG's pixel grid, and a
clear refusal for the JPEG kinds that cannot be read (CMYK, 12-bit and lossless JPEG)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medmvl_core.data.phantoms import make_xray_phantom, write_phantom
from medmvl_core.errors import ImageReadError, InvalidImageError
from medmvl_core.imaging import read_image


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpeg_radiograph_is_the_png_grid_up_to_jpeg_loss(tmp_path, mode):
    """A radiograph phantom written as PNG (the generator's format) and as an 8-bit JPEG (Pillow's
    default quality 75, grey or 3-channel): the JPEG reads as exactly Pillow's decode, on the PNG's
    pixel grid, with the same (absent) geometry: spacing 1, origin 0, identity axes."""
    ph = make_xray_phantom(0, "test", 3)
    png = tmp_path / write_phantom(ph, tmp_path)
    jpg = tmp_path / f"{ph.id}.jpg"
    Image.open(png).convert(mode).save(jpg)
    vp, vj = read_image(png), read_image(jpg)
    np.testing.assert_array_equal(vp.array[0], ph.array)
    with Image.open(jpg) as im:
        assert im.mode == mode
        decoded = np.asarray(im)
    np.testing.assert_array_equal(vj.array[0], decoded)
    assert vj.array.dtype == np.uint8
    grey = vj.array[0]
    if mode == "RGB":
        assert vj.array.shape == (1, *ph.array.shape, 3)
        grey = grey[..., 0]
        # a grey image saved in colour decodes with three equal channels (Pillow's YCbCr -> RGB)
        assert np.abs(vj.array[0].astype(int) - grey[..., None]).max() <= 1
    else:
        assert vj.array.shape == vp.array.shape == (1, *ph.array.shape)
    # measured: mean |JPEG - PNG| 3.3 grey levels, PSNR 35.5 dB on this phantom at quality 75
    assert np.abs(grey.astype(int) - ph.array).mean() < 5 and _psnr(grey, ph.array) > 30
    for v in (vp, vj):
        assert v.spacing == (1.0, 1.0, 1.0) and v.origin == (0.0, 0.0, 0.0)
        np.testing.assert_array_equal(v.direction, np.eye(3))
    assert (vp.source, vj.source) == ("png", "jpg")


@pytest.mark.parametrize("ext", [".jpeg", ".JPG"])
def test_jpeg_extensions(tmp_path, ext):
    arr = make_xray_phantom(0, "test", 1).array
    Image.fromarray(arr, mode="L").save(tmp_path / f"a{ext}", format="JPEG")
    assert read_image(tmp_path / f"a{ext}").array.shape == (1, *arr.shape)


def test_cmyk_jpeg_is_refused(tmp_path):
    Image.fromarray(make_xray_phantom(0, "test", 1).array, mode="L").convert("CMYK").save(tmp_path / "p.jpg")
    with pytest.raises(InvalidImageError, match=r"p\.jpg is a CMYK.*save it as greyscale or RGB"):
        read_image(tmp_path / "p.jpg")


def _dicom_jpeg_frame(name: str, out) -> None:
    """The JPEG stream inside one of pydicom's test files, written as a plain .jpg."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    from pydicom.encaps import generate_frames

    path = get_testdata_file(name)
    if not path:
        pytest.skip(f"pydicom's {name} is not available")
    ds = pydicom.dcmread(path)
    out.write_bytes(next(generate_frames(ds.PixelData, number_of_frames=1)))


@pytest.mark.parametrize("name,what", [("JPEG-lossy.dcm", "12-bit JPEG"),
                                       ("JPEG-LL.dcm", "16-bit lossless JPEG")])
def test_jpeg_kinds_pillow_cannot_decode_are_named(tmp_path, name, what):
    """12-bit (process 4) and lossless (process 14) JPEG streams from DICOM files, saved as .jpg:
    Pillow cannot identify them; the error names the kind and what to do instead."""
    _dicom_jpeg_frame(name, tmp_path / "x.jpg")
    with pytest.raises(ImageReadError, match=rf"x\.jpg is a {what} .*convert it to a 16-bit PNG or TIFF"):
        read_image(tmp_path / "x.jpg")


def test_broken_jpeg_keeps_the_generic_message(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    data = (tmp_path / "x.jpg")
    Image.fromarray(make_xray_phantom(0, "test", 1).array, mode="L").save(data)
    (tmp_path / "cut.jpg").write_bytes(data.read_bytes()[:20])  # SOI and part of the JFIF header
    for name in ("notes.jpg", "cut.jpg"):
        with pytest.raises(ImageReadError, match="cannot read .*truncated or not an image"):
            read_image(tmp_path / name)
