"""The standalone viewer offscreen against a real worker (``medmvl serve`` started from the
viewer's own Start button) on a tiny model: load a volume file, draw a box with the mouse, ask
and see the answer stream in, describe the region, run Find and see the box drawn, cancel a
long answer, screenshots written and checked non-blank, a killed worker reported as dead.

The model is the fixture's ``ct_chest_tiny`` (MedM-VL format), copied to a temporary folder and
edited so that greedy decoding always emits one token whose text is a 3D box: the final norm is
zeroed (all logits 0, so token 0 wins) and token 0's vocabulary entry is the box text. Everything
else — the worker, the loader, the processor, the engine, box parsing and voxel mapping — is real.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtWidgets = pytest.importorskip("qtpy.QtWidgets")
from qtpy import QtCore, QtGui  # noqa: E402
from qtpy.QtTest import QTest  # noqa: E402

from medmvl_core.client import controller as ctl  # noqa: E402
from medmvl_core.viewer.display import drag_to_voxel_box  # noqa: E402
from medmvl_core.viewer.window import ViewerWindow  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BOX_TEXT = "[0.25, 0.125, 0.5, 0.75, 0.625, 1.0] "
SCREENSHOTS = REPO / "Resources" / "Screenshots"


def _box_model(reference_dir: Path, dst: Path) -> Path:
    from safetensors.numpy import load_file, save_file

    shutil.copytree(reference_dir / "base", dst / "base")
    ckpt = dst / "ct_chest_tiny"
    shutil.copytree(reference_dir / "ct_chest_tiny", ckpt, ignore=shutil.ignore_patterns("golden*"))
    w = load_file(str(ckpt / "model.safetensors"))
    w["llm.model.norm.weight"] = np.zeros_like(w["llm.model.norm.weight"])
    save_file(w, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    token = BOX_TEXT.replace(" ", "\u0120")  # byte-level BPE spells a space as U+0120
    for vf in (ckpt / "vocab.json", dst / "base/llm/vocab.json"):
        vocab = json.loads(vf.read_text())
        vocab = {t: i for t, i in vocab.items() if i != 0}
        vocab[token] = 0
        vf.write_text(json.dumps(vocab))
    # Room for a 1000-token answer (the fixture's LLM stops at 512 positions; RoPE has no table).
    cfg = dst / "base/llm/config.json"
    c = json.loads(cfg.read_text())
    c["max_position_embeddings"] = c["sliding_window"] = 2048
    cfg.write_text(json.dumps(c))
    tj = dst / "base/llm/tokenizer.json"
    d = json.loads(tj.read_text())
    d["model"]["vocab"] = {t: i for t, i in d["model"]["vocab"].items() if i != 0}
    d["model"]["vocab"][token] = 0
    tj.write_text(json.dumps(d))
    return ckpt


def _wait(app, cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        app.processEvents()
        if cond():
            return True
        time.sleep(0.02)
    app.processEvents()
    return cond()


def _assert_non_blank(path: Path):
    img = QtGui.QImage(str(path))
    assert not img.isNull() and img.width() > 300 and img.height() > 300
    ptr = img.convertToFormat(QtGui.QImage.Format_RGB888)
    arr = np.frombuffer(ptr.constBits(), np.uint8, ptr.sizeInBytes()).reshape(ptr.height(), -1)
    assert arr.std() > 20, "screenshot looks blank"
    return arr


@pytest.fixture(scope="module")
def viewer(reference_dir, tmp_path_factory):
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    tmp = tmp_path_factory.mktemp("viewer")
    ckpt = _box_model(reference_dir, tmp / "model")
    # A NIfTI file through medmvl_core.imaging, as a user would open it.
    import SimpleITK as sitk

    vol = np.load(reference_dir / "inputs" / "ct_volume.npy")
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.8, 0.8, 2.0))
    sitk.WriteImage(img, str(tmp / "ct.nii.gz"))
    win = ViewerWindow()
    win.resize(1200, 760)
    win.show()
    win.load_path(tmp / "ct.nii.gz")
    yield app, win, ckpt, tmp
    win.close()
    win.controller.shutdown()


def test_load_and_draw_a_box(viewer):
    app, win, _ckpt, _tmp = viewer
    view = win.view
    assert win.volume.array.shape == (40, 48, 48)
    assert view.num_slices == 40 and win.sliceSlider.maximum() == 39
    view.set_slice(20)
    start, end = (10.2, 12.3), (30.5, 25.1)
    p0, p1 = view.to_widget(*start).toPoint(), view.to_widget(*end).toPoint()
    QTest.mousePress(view, QtCore.Qt.LeftButton, QtCore.Qt.NoModifier, p0)
    QTest.mouseMove(view, p1)
    QTest.mouseRelease(view, QtCore.Qt.LeftButton, QtCore.Qt.NoModifier, p1)
    box = view.user_box()
    expected = drag_to_voxel_box(view.to_index(QtCore.QPointF(p0)), view.to_index(QtCore.QPointF(p1)),
                                 20, view.depth, view.array.shape)
    assert box == expected
    k1, j1, i1, k2, j2, i2 = box
    assert (k1, k2) == (18, 23) and abs(i1 - 10) <= 1 and abs(i2 - 31) <= 1 and abs(j1 - 12) <= 1
    assert "box" in win.statusLabel.text()
    # Window presets change what is shown.
    win.wlCombo.setCurrentText("Bone")
    assert (view.window, view.level) == (1800.0, 400.0)
    win.wlCombo.setCurrentText("Lung")


def test_start_local_worker_and_ask_streams(viewer):
    app, win, ckpt, _tmp = viewer
    win.checkpointEdit.setText(str(ckpt))
    win.pythonEdit.setText(sys.executable)
    win.deviceCombo.setCurrentText("cpu")
    QTest.mouseClick(win.startButton, QtCore.Qt.LeftButton)
    assert _wait(app, lambda: win.controller.state in (ctl.READY, ctl.DEAD, ctl.ERROR), 120), win.stateLabel.text()
    assert win.controller.state == ctl.READY, win.stateLabel.text()
    assert "ct_chest_tiny" in win.stateLabel.text() and "MiB" in win.memoryLabel.text()

    pieces = []
    orig = win.on_token
    win.on_token = lambda key, piece: (pieces.append(piece), orig(key, piece))
    win.controller.generation.max_new_tokens = 3
    win.set_task("ask")
    win.questionEdit.setText("Is there a nodule?")
    QTest.mouseClick(win.askButton, QtCore.Qt.LeftButton)
    assert _wait(app, win.controller.idle, 60)
    win.on_token = orig
    assert pieces == [BOX_TEXT] * 3  # streamed piece by piece
    chat = win.chat.toPlainText()
    assert chat.startswith("Model: ct_chest_tiny (sha256 ") and "\n\nYou: Is there a nodule?" in chat
    # the three identical boxes of the answer read as one box in words, not as numbers
    assert "MedM-VL: found 1 box\n  Is there a nodule?: slices " in chat and BOX_TEXT.strip() not in chat


def test_describe_region_and_find_draw(viewer):
    app, win, _ckpt, tmp = viewer
    box = win.view.user_box()
    win.controller.generation.max_new_tokens = 1
    win.set_task("describe")
    assert not win.questionEdit.isEnabled()
    QTest.mouseClick(win.askButton, QtCore.Qt.LeftButton)
    assert _wait(app, win.controller.idle, 60)
    assert f"You: Describe region  [box {list(box)}]" in win.chat.toPlainText()

    win.set_task("find")
    win.questionEdit.setText("the nodule")
    QTest.mouseClick(win.askButton, QtCore.Qt.LeftButton)
    assert _wait(app, win.controller.idle, 60)
    found = [o for o in win.view.overlays if o.kind == "found"]
    assert len(found) == 1 and found[0].label == "the nodule"
    # The worker mapped the model box [z1, y1, x1, z2, y2, x2] onto this 40x48x48 volume.
    k1, j1, i1, k2, j2, i2 = found[0].box
    assert 0 <= k1 < k2 <= 40 and 0 <= j1 < j2 <= 48 and 0 <= i1 < i2 <= 48
    assert k1 <= win.view.k < k2
    app.processEvents()
    shot = tmp / "viewer_find.png"
    win.grab().save(str(shot))
    _assert_non_blank(shot)
    # The box is looked for in the slice view itself (its size checked, so a failure says why).
    assert win.view.width() > 200 and win.view.height() > 200, (win.view.width(), win.view.height())
    view_shot = tmp / "viewer_find_view.png"
    win.view.grab().save(str(view_shot))
    img = QtGui.QImage(str(view_shot)).convertToFormat(QtGui.QImage.Format_RGB888)
    arr = np.frombuffer(img.constBits(), np.uint8, img.sizeInBytes()).reshape(img.height(), -1)
    arr = arr[:, :img.width() * 3].reshape(img.height(), img.width(), 3).astype(int)
    green = (arr[..., 1] > 180) & (arr[..., 1] - np.maximum(arr[..., 0], arr[..., 2]) > 80)
    assert green.sum() > 50, f"the found box is not drawn ({green.sum()} green pixels, box {found[0].box}, slice {win.view.k})"
    if os.environ.get("MEDMVL_WRITE_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, SCREENSHOTS / "viewer.png")


def test_cancel_a_long_answer(viewer):
    app, win, _ckpt, _tmp = viewer
    win.controller.generation.max_new_tokens = 1000
    win.set_task("ask")
    key = win.volume.key
    # The tiny model writes 1000 tokens in about a second; on a loaded machine the GUI thread can
    # miss the whole stream. Cancel needs an answer in flight, so ask again (a fresh chat each
    # time) until the panel has seen it streaming.
    for _attempt in range(5):
        win.clear_chat()
        win.questionEdit.setText("Describe everything in detail.")
        QTest.mouseClick(win.askButton, QtCore.Qt.LeftButton)
        streaming = _wait(app, lambda: win.controller.partial(key).count("[") >= 2
                          or win.controller.idle(), 60)
        assert streaming, "no token arrived within 60 s"
        if not win.controller.idle():
            break
        done = win.controller.history(key)[-1]
        assert done.role == "assistant" and done.text.count("[") == 1000, done.text[:200]
    else:
        pytest.fail("every answer finished before the panel saw it stream")
    assert win.cancelButton.isEnabled()
    t0 = time.monotonic()
    QTest.mouseClick(win.cancelButton, QtCore.Qt.LeftButton)
    assert _wait(app, win.controller.idle, 30)
    assert time.monotonic() - t0 < 10
    assert win.controller.state == ctl.READY and win.controller.detail == "cancelled"
    last = win.controller.history(key)[-1]
    assert last.role in ("assistant", "error")
    if last.role == "assistant":
        assert 0 < last.text.count("[") < 1000
    assert win.askButton.isEnabled()


def test_dead_worker_is_reported(viewer):
    app, win, _ckpt, _tmp = viewer
    win.controller.launcher.kill()
    assert _wait(app, lambda: win.controller.state == ctl.DEAD, 10)
    assert win.startButton.text() == "Restart" and win.startButton.isEnabled()
    assert "exited" in win.stateLabel.text()
    QTest.mouseClick(win.startButton, QtCore.Qt.LeftButton)  # restart from the panel
    assert _wait(app, lambda: win.controller.state in (ctl.READY, ctl.DEAD, ctl.ERROR), 120)
    assert win.controller.state == ctl.READY, win.stateLabel.text()
    win.controller.generation.max_new_tokens = 1
    win.set_task("report")
    QTest.mouseClick(win.askButton, QtCore.Qt.LeftButton)
    assert _wait(app, win.controller.idle, 60)
    assert win.controller.history(win.volume.key)[-2].text == "Generate report"
    assert win.controller.history(win.volume.key)[-1].text == BOX_TEXT
