"""The viewer opens every advertised format through medmvl_core.imaging (offscreen, in process)
and hands the controller voxels + RAS geometry consistent with the file (SimpleITK writes them)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtWidgets = pytest.importorskip("qtpy.QtWidgets")
from qtpy import QtGui  # noqa: E402
sitk = pytest.importorskip("SimpleITK")

from medmvl_core.viewer.window import ViewerWindow  # noqa: E402


@pytest.fixture(scope="module")
def win():
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    w = ViewerWindow()
    yield w
    w.close()
    app.processEvents()


def _ct():
    arr = (np.arange(6 * 20 * 24).reshape(6, 20, 24) % 900 - 1000).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-50.0, 20.0, 100.0))
    return arr, img


def _ras_of_index(img, idx):
    x, y, z = img.TransformIndexToPhysicalPoint(idx)
    return np.array([-x, -y, z])


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_volume_files(win, tmp_path, suffix):
    arr, img = _ct()
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(img, str(path))
    win.load_path(path)
    v = win.volume
    np.testing.assert_array_equal(v.array, arr)
    for idx in [(0, 0, 0), (23, 19, 5)]:
        np.testing.assert_allclose((v.ijk_to_ras @ np.array([*idx, 1.0]))[:3], _ras_of_index(img, idx), atol=1e-4)
    assert win.view.num_slices == 6 and win.sliceSlider.maximum() == 5


def test_dicom_folder(win, tmp_path):
    arr, img = _ct()
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(arr.shape[0]):
        s = img[:, :, k]
        for tag, value in [("0008|0060", "CT"), ("0020|000d", "1.2.3"), ("0020|000e", "1.2.3.4"),
                           ("0020|0013", str(k + 1)), ("0028|0030", "0.8\\0.7"),
                           ("0018|0050", "2.5"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0020|0032", "\\".join(str(c) for c in img.TransformIndexToPhysicalPoint((0, 0, k))))]:
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(s)
    win.load_path(folder)
    v = win.volume
    assert v.array.shape == (6, 20, 24)
    np.testing.assert_array_equal(v.array, arr)
    np.testing.assert_allclose((v.ijk_to_ras @ np.array([23.0, 19.0, 5.0, 1.0]))[:3],
                               _ras_of_index(img, (23, 19, 5)), atol=1e-3)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_2d_images(win, tmp_path, suffix):
    from PIL import Image

    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[5:25, 10:30] = (200, 120, 40)
    Image.fromarray(rgb).save(tmp_path / f"img{suffix}")
    win.load_path(tmp_path / f"img{suffix}")
    a = win.volume.array
    assert a.shape == (1, 30, 40, 3)
    # the pixels as Pillow decodes the file (PNG: exactly what was written)
    np.testing.assert_array_equal(a[0], np.asarray(Image.open(tmp_path / f"img{suffix}").convert("RGB")))
    if suffix == ".png":
        np.testing.assert_array_equal(a[0], rgb)
    assert win.view.num_slices == 1
    # one view only, given the whole width (no empty column where the coronal/sagittal views were)
    assert not win.coronalView.isVisibleTo(win) and not win.sagittalView.isVisibleTo(win)
    assert win._viewGrid.columnStretch(1) == 0
    win.view.resize(400, 300)
    shot = win.view.grab().toImage().convertToFormat(QtGui.QImage.Format_RGB32)
    assert not shot.isNull()
    px = np.array(shot.constBits()).reshape(shot.height(), shot.bytesPerLine())[:, :shot.width() * 4]
    assert len(np.unique(px.reshape(-1, 4), axis=0)) > 2  # the image is drawn: not a blank widget
