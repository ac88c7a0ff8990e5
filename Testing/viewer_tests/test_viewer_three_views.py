"""The viewer's three views offscreen, with a scripted worker client: shared crosshair, drawing
in a non-axial view, every found box visible in each view it crosses, the window preset chosen
from the image, found boxes in the transcript, label maps as regions, saving / exporting, and
the Qt platform-plugin message."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtWidgets = pytest.importorskip("qtpy.QtWidgets")
from qtpy import QtCore, QtGui  # noqa: E402
from qtpy.QtTest import QTest  # noqa: E402
import SimpleITK as sitk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slicer_stubs import FakeWorkerClient  # noqa: E402

from medmvl_core.client import controller as ctl  # noqa: E402
from medmvl_core.viewer import qt_check  # noqa: E402
from medmvl_core.viewer.display import choose_preset  # noqa: E402
from medmvl_core.viewer.window import ViewerWindow  # noqa: E402

SPACING = (0.9, 0.9, 3.0)
FOUND = [4, 10, 12, 9, 20, 26]  # k1, j1, i1, k2, j2, i2


def _ellipsoid(shape, radii, center=None):
    k, j, i = np.ogrid[:shape[0], :shape[1], :shape[2]]
    c = center or [s / 2 for s in shape]
    return ((k - c[0]) / radii[0]) ** 2 + ((j - c[1]) / radii[1]) ** 2 + ((i - c[2]) / radii[2]) ** 2 <= 1


def head_ct(shape=(16, 40, 40)):
    a = np.full(shape, -1000, np.int16)
    a[_ellipsoid(shape, (8, 19, 17))] = 1000  # skull
    a[_ellipsoid(shape, (7, 16, 14))] = 35  # brain
    return a


def chest_ct(shape=(16, 40, 40)):
    a = np.full(shape, -1000, np.int16)
    a[_ellipsoid(shape, (9, 18, 19))] = 40
    a[_ellipsoid(shape, (7, 12, 6), [8, 20, 11])] = -850
    a[_ellipsoid(shape, (7, 12, 6), [8, 20, 29])] = -850
    return a


def _write(array, path, spacing=SPACING):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin((-20.0, -30.0, 10.0))
    sitk.WriteImage(img, str(path))
    return img


def _green(widget):
    img = widget.grab().toImage().convertToFormat(QtGui.QImage.Format_RGB888)
    arr = np.frombuffer(img.constBits(), np.uint8, img.sizeInBytes()).reshape(img.height(), -1)
    arr = arr[:, :img.width() * 3].reshape(img.height(), img.width(), 3).astype(int)
    return int(((arr[..., 1] > 180) & (arr[..., 1] - np.maximum(arr[..., 0], arr[..., 2]) > 80)).sum())


@pytest.fixture()
def win(tmp_path):
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    w = ViewerWindow(ctl.PanelController(client_factory=functools.partial(
        FakeWorkerClient, tokens=["Here."], boxes=[{"voxel": FOUND, "model": [0.0] * 6}])))
    w.resize(1300, 820)
    w.show()
    _write(head_ct(), tmp_path / "head.nii.gz")
    w.load_path(tmp_path / "head.nii.gz")
    app.processEvents()
    yield w
    w.close()
    app.processEvents()


def _connect_and_find(win, what="the nodule"):
    win.controller.connect_remote("http://fake:1", "tok")
    win.controller.wait(10)
    win.set_task("find")
    win.questionEdit.setText(what)
    assert win.ask()
    win.controller.wait(10)
    QtWidgets.QApplication.instance().processEvents()


def test_presets_follow_the_image():
    assert choose_preset(head_ct(), "CT") == "Brain"
    assert choose_preset(chest_ct(), "CT") == "Lung"
    abdomen = np.full((16, 40, 40), -1000, np.int16)
    abdomen[_ellipsoid(abdomen.shape, (9, 18, 19))] = 40
    abdomen[_ellipsoid(abdomen.shape, (6, 6, 6))] = -100
    assert choose_preset(abdomen, "CT") == "Soft tissue"
    assert choose_preset(head_ct(), "MR") == "Auto" and choose_preset(head_ct()[:1], "CT") == "Auto"


def test_head_ct_opens_in_the_brain_window_with_three_views(win, tmp_path):
    assert win.wlCombo.currentText() == "Brain" and (win.view.window, win.view.level) == (80.0, 40.0)
    assert all(v.isVisible() for v in win.views())
    assert [v.num_slices for v in win.views()] == [16, 40, 40]
    _write(chest_ct(), tmp_path / "chest.nii.gz")
    win.load_path(tmp_path / "chest.nii.gz")
    assert win.wlCombo.currentText() == "Lung"


def test_click_moves_the_shared_crosshair(win):
    cor = win.coronalView
    p = cor.to_widget(7.5, 3.5).toPoint()  # column i 7, row k 3 of the coronal plane
    QTest.mouseClick(cor, QtCore.Qt.LeftButton, QtCore.Qt.NoModifier, p)
    assert win.viewState.pos == [3, 20, 7]  # j (the coronal slice) kept
    assert win.view.k == 3 and win.sliceSlider.value() == 3 and win.sagittalView.k == 7


def test_drawing_in_the_coronal_view_makes_a_3d_box(win):
    cor = win.coronalView
    win.viewState.depth = 2
    cor.set_slice(18)  # j = 18
    p0, p1 = cor.to_widget(3.4, 2.3).toPoint(), cor.to_widget(9.6, 5.7).toPoint()
    QTest.mousePress(cor, QtCore.Qt.LeftButton, QtCore.Qt.NoModifier, p0)
    QTest.mouseMove(cor, p1)
    QTest.mouseRelease(cor, QtCore.Qt.LeftButton, QtCore.Qt.NoModifier, p1)
    # rows k 2.3..5.7 -> 2..6, columns i 3.4..9.6 -> 3..10, across the plane j 18 +- 2 -> 16..21
    assert win.view.user_box() == (2, 16, 3, 6, 21, 10)
    assert "slices 2–5, rows 16–20, columns 3–9" in win.statusLabel.text()
    win.viewState.pos = [3, 18, 5]  # the box is drawn in every view it crosses
    win.viewState.changed()
    assert win.view.user_box() is win.sagittalView.user_box()


def test_found_box_is_in_every_view_it_crosses_and_reads_like_a_person_would(win):
    _connect_and_find(win)
    # the crosshair moved to the box centre: all three views show it
    assert win.viewState.pos == [6, 14, 18]
    assert [_green(v) > 30 for v in win.views()] == [True, True, True]
    win.view.set_slice(12)  # outside k 4..8: the axial view no longer crosses it
    QtWidgets.QApplication.instance().processEvents()
    assert _green(win.view) == 0 and _green(win.coronalView) > 30
    chat = win.chat.toPlainText()
    assert chat.startswith("Model: fake-model — intended use not stated")
    # 5 slices x 3 mm, 10 rows x 0.9 mm, 14 columns x 0.9 mm
    assert ("MedM-VL: Here.\n  the nodule: slices 4–8, rows 10–19, columns 12–25 (12.6 × 9.0 × 15.0 mm), "
            "shown in the views") in chat


def test_label_map_label_becomes_the_region(win, tmp_path):
    labels = np.zeros((16, 40, 40), np.uint8)
    labels[5:9, 12:20, 14:22] = 4
    img = _write(labels, tmp_path / "labels.nii.gz")
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(img)
    x, y, z, sx, sy, sz = stats.GetBoundingBox(4)
    win.load_labelmap(tmp_path / "labels.nii.gz")
    assert win.labelCombo.count() == 1 and win.labelCombo.currentData() == 4
    QTest.mouseClick(win.labelButton, QtCore.Qt.LeftButton)
    assert win.view.user_box() == (z, y, x, z + sz, y + sy, x + sx)
    assert "label 4: slices 5–8" in win.statusLabel.text()
    win.controller.connect_remote("http://fake:1", "tok")
    win.controller.wait(10)
    win.set_task("describe")
    assert win.ask()
    win.controller.wait(10)
    region = win.controller.conversations[win.volume.key].turns[-1].region
    assert region.source == "segment" and region.label == "label 4"
    # a label map made on another grid is refused with a message, not a crash
    _write(labels, tmp_path / "other.nii.gz", spacing=(1.0, 1.0, 1.0))
    win.load_labelmap(tmp_path / "other.nii.gz")
    QTest.mouseClick(win.labelButton, QtCore.Qt.LeftButton)
    assert "does not match the image" in win.statusLabel.text()


def test_save_reopen_and_export(win, tmp_path):
    _connect_and_find(win)
    chat = win.chat.toPlainText()
    win.export_conversation(tmp_path / "c.json", "json")
    win.export_conversation(tmp_path / "c.md", "md")
    md = (tmp_path / "c.md").read_text(encoding="utf-8")
    assert md.startswith("## MedM-VL answers — AI-generated, not reviewed") and "Box: the nodule: slices 4–8" in md
    # SR from a NIfTI image: explained, nothing written
    assert not win._guarded(win.export_conversation, tmp_path / "c.dcm", "dcm")
    assert "not read from DICOM" in win.statusLabel.text() and not (tmp_path / "c.dcm").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".json", ".md", ".dcm")) == ["c.json", "c.md"]
    win.clear_chat()
    win.view.clear_found_boxes()
    assert win.chat.toPlainText() == "Model: fake-model — intended use not stated by the model card; " \
        "research use only, not validated for clinical use"
    win.open_conversation(tmp_path / "c.json")
    assert win.chat.toPlainText() == chat
    assert [o.box for o in win.view.overlays if o.kind == "found"] == [tuple(FOUND)]


def test_qt_platform_message_names_debian_packages():
    out = ("\tlibxcb-icccm.so.4 => not found\n\tlibc.so.6 => /lib/libc.so.6 (0x1)\n"
           "\tlibxcb-cursor.so.0 => not found\n\tlibxcb-icccm.so.4 => not found\n\tlibfoo.so.9 => not found\n")
    missing = qt_check.missing_libraries(out)
    assert missing == ["libxcb-icccm.so.4", "libxcb-cursor.so.0", "libfoo.so.9"]
    assert qt_check.install_hint(missing) == ("sudo apt-get install libxcb-icccm4 libxcb-cursor0; "
                                              "also install the packages providing libfoo.so.9")
    assert "DISPLAY is not set" in qt_check.platform_problem({"PATH": os.environ.get("PATH", "")})
    assert qt_check.platform_problem({"QT_QPA_PLATFORM": "offscreen"}) is None
    assert qt_check.platform_problem({"WAYLAND_DISPLAY": "wayland-0"}) is None
