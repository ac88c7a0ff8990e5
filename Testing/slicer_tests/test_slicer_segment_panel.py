"""The panel's segment region (stub slicer/qt/ctk, real MRML segmentation nodes from slicer-core):
pick a segmentation and a segment, and "Describe region" / "Ask about region" send the segment's
bounding box, which must equal SimpleITK's LabelShapeStatistics box of the same label; the task
button waits for a segment; a segment that cannot be a region is a message, and nothing is sent."""

from __future__ import annotations

import functools
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

slicer_core = pytest.importorskip("slicer", reason="slicer-core is installed by `make test`")
if not hasattr(slicer_core, "vtkMRMLScene"):
    pytest.skip("the installed `slicer` is not slicer-core", allow_module_level=True)

import SimpleITK as sitk  # noqa: E402
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import slicer_stubs as stubs  # noqa: E402
from test_segments import _image_geometry, _labels, labelmap_file  # noqa: E402,F401  (the label fixture)
from test_slicer_module import _widget, env  # noqa: E402,F401  (the stub environment fixture)

SEGMENTS = {1: "liver", 2: "nodule", 3: "spleen"}  # label value -> segment name
UI_FILE = stubs.MODULE_DIR / "Resources" / "UI" / "MedMVLSlicer.ui"


def _segmentation(scene, labels: np.ndarray, ijk_to_ras: np.ndarray, name: str = "segs"):
    """A segmentation node as Slicer keeps one: the segments share one binary labelmap (their
    label values), on the grid ``ijk_to_ras``; "empty" has no voxels painted."""
    sl = sys.modules["slicer"]
    image = sl.vtkOrientedImageData()
    image.SetDimensions(labels.shape[2], labels.shape[1], labels.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(labels.reshape(-1), deep=True))
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(ijk_to_ras[r, c]))
    image.SetImageToWorldMatrix(m)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    for value, segment_name in SEGMENTS.items():
        segment = sl.vtkSegment()
        segment.SetName(segment_name)
        segment.SetLabelValue(value)
        segment.AddRepresentation("Binary labelmap", image)
        node.GetSegmentation().AddSegment(segment, f"id_{segment_name}")
    node.GetSegmentation().AddEmptySegment("id_empty", "empty")
    return node


@pytest.fixture()
def panel(env, labelmap_file, tmp_path):  # noqa: F811
    """The widget with a ready (fake) worker, a CT on the label map's grid (read as Slicer reads
    it) and a segmentation made from the label map's own geometry."""
    mod, rec = env
    path, img = labelmap_file
    ct = sitk.GetImageFromArray(np.full(_labels().shape, -1000, np.int16))
    ct.CopyInformation(img)
    sitk.WriteImage(ct, str(tmp_path / "ct.nrrd"))
    sl = sys.modules["slicer"]
    volume = sl.util.loadVolume(str(tmp_path / "ct.nrrd"))
    _, ijk_to_ras = _image_geometry(img)
    segs = _segmentation(sl.mrmlScene, _labels(), ijk_to_ras)
    w = _widget(mod)
    w.ui.inputSelector.setCurrentNode(volume)
    w.logic.controller._client_factory = functools.partial(stubs.FakeWorkerClient, tokens=["A ", "mass."])
    w.logic.connectRemoteWorker("http://fake:1", "tok")
    w.logic.controller.wait(10)
    yield w, rec, volume, segs, img
    w.logic.shutdown()


def _use_segment(w, segmentation, segment_id, task="describe"):
    w.ui.taskComboBox.setCurrentIndex(w.ui.taskComboBox.findData(task))
    w.ui.roiRadioButton.checked, w.ui.segmentRadioButton.checked = False, True
    w.ui.segmentRadioButton.emit("toggled(bool)", True)
    w.ui.segmentSelector.setCurrentNode(segmentation)
    w.ui.segmentSelector.setCurrentSegmentID(segment_id)


def test_describe_sends_the_segment_box_of_simpleitk_label_statistics(panel, tmp_path):
    w, rec, volume, segs, img = panel
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(img)
    x, y, z, sx, sy, sz = stats.GetBoundingBox(1)  # the "liver" label: (i, j, k) index + size
    expected = [z, y, x, z + sz, y + sy, x + sx]
    _use_segment(w, segs, "id_liver")
    assert w.ui.segmentSelector.shownSegments()[0] == ("liver", "id_liver")
    assert w.ui.askButton.enabled is True and w.ui.askButton.toolTip == ""
    w.ui.askButton.click()
    w.logic.controller.wait(10)
    assert rec.errors == []
    client = stubs.FakeWorkerClient.instances[-1]
    assert client.asked[-1]["task"] == "describe" and client.asked[-1]["box"] == expected
    # the segment's name labels the region in the panel's transcript and in the saved record
    assert f"You: Describe region  [liver: box {expected}]" in w.ui.chatTextEdit.toPlainText()
    turn = w.logic.controller.conversations[volume.GetID()].turns[-1]
    assert (turn.region.source, turn.region.label, turn.region.voxel) == ("segment", "liver", expected)
    w.logic.saveTranscriptToFile(volume, str(tmp_path / "answers.md"))
    assert "Region: liver: slices 3–6, rows 5–10, columns 2–8" in (tmp_path / "answers.md").read_text("utf-8")
    # ... and when the scene's record is read back (a reopened scene) the name is still there
    w.logic.controller.histories.clear()
    w.logic.controller.conversations.clear()
    w.onInputChanged()
    assert f"You: Describe region  [liver: box {expected}]" in w.ui.chatTextEdit.toPlainText()

    # Ask about region takes the question and the chosen segment's box (a stray voxel widens label 3's)
    x, y, z, sx, sy, sz = stats.GetBoundingBox(3)
    _use_segment(w, segs, "id_spleen", task="crop_ask")
    w.ui.questionLineEdit.text = "Is it enlarged?"
    w.ui.askButton.click()
    w.logic.controller.wait(10)
    assert client.asked[-1]["question"] == "Is it enlarged?"
    assert client.asked[-1]["box"] == [z, y, x, z + sz, y + sy, x + sx]


def test_the_task_button_waits_for_a_segment_and_says_why(panel):
    w, rec, volume, segs, img = panel
    sl = sys.modules["slicer"]
    _use_segment(w, None, "")
    assert w.ui.roiSelector.enabled is False and w.ui.segmentSelector.enabled is True
    assert w.ui.askButton.enabled is False
    assert w.ui.askButton.toolTip == "Select a segmentation and a segment first."
    w.ui.segmentSelector.setCurrentNode(segs)  # "None" is offered: no segment is chosen yet
    assert w.ui.segmentSelector.currentSegmentID() == "" and w.ui.askButton.enabled is False
    assert w.ui.askButton.toolTip == "Select a segment of 'segs'."
    w.ui.segmentSelector.setCurrentSegmentID("id_nodule")
    assert w.ui.askButton.enabled is True and w.ui.askButton.toolTip == ""
    # A segmentation without segments: the real selector keeps the old segment ID; the panel checks it.
    blank = sl.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "blank")
    w.ui.segmentSelector.setCurrentNode(blank)
    assert w.ui.segmentSelector.currentSegmentID() == "id_nodule"
    assert w.ui.askButton.enabled is False and "'blank' has no segments" in w.ui.askButton.toolTip
    kidney = sl.vtkSegment()  # painted in the Segment Editor, say: the selector refills (VTK events)
    kidney.SetName("kidney")
    kidney.AddRepresentation("Binary labelmap", sl.vtkOrientedImageData())
    blank.GetSegmentation().AddSegment(kidney, "s1")
    assert w.ui.segmentSelector.shownSegments() == [("kidney", "s1")]
    # the stale ID is not in the list, so the selector picks (and announces) the first segment
    assert w.ui.segmentSelector.currentSegmentID() == "s1"
    assert w.ui.askButton.enabled is True and w.ui.askButton.toolTip == ""
    w.ui.segmentSelector.setCurrentSegmentID("")  # back to "None"
    assert w.ui.askButton.enabled is False and w.ui.askButton.toolTip == "Select a segment of 'blank'."
    # Tasks without a region, and the drawn-ROI source, do not need a segment.
    w.ui.taskComboBox.setCurrentIndex(w.ui.taskComboBox.findData("report"))
    assert w.ui.askButton.enabled is True
    w.ui.taskComboBox.setCurrentIndex(w.ui.taskComboBox.findData("describe"))
    assert w.ui.askButton.enabled is False
    w.ui.roiRadioButton.checked, w.ui.segmentRadioButton.checked = True, False
    w.ui.segmentRadioButton.emit("toggled(bool)", False)
    assert w.ui.askButton.enabled is True and w.ui.askButton.toolTip == "Select an ROI first."
    assert w.ui.roiSelector.enabled is True and w.ui.segmentSelector.enabled is False
    w.on_state("busy", "Describe region…")  # a busy worker disables it whatever the region
    assert w.ui.askButton.enabled is False


def test_a_segment_that_cannot_be_a_region_is_a_message_and_nothing_is_sent(panel):
    w, rec, volume, segs, img = panel
    client = stubs.FakeWorkerClient.instances[-1]
    _use_segment(w, segs, "id_empty")
    assert w.ui.askButton.enabled is True  # emptiness is found on pressing (the mask is read then)
    w.ui.askButton.click()
    assert "segment 'empty' is empty: paint it (Segment Editor)" in w.ui.statusLabel.text
    # a segmentation made on another image, 1 m away from this one
    _, ijk_to_ras = _image_geometry(img)
    far = ijk_to_ras.copy()
    far[:3, 3] += 1000.0
    elsewhere = _segmentation(sys.modules["slicer"].mrmlScene, _labels(), far, "other study")
    _use_segment(w, elsewhere, "id_liver")
    w.ui.askButton.click()
    assert "segment 'liver' lies outside the image" in w.ui.statusLabel.text
    assert "choose the segmentation made on this image" in w.ui.statusLabel.text
    w.logic.controller.wait(10)
    assert rec.errors == [] and client.uploads == [] and client.asked == []
    assert w.logic.controller.history(volume.GetID()) == []


def test_ui_widget_classes_are_slicers_and_mrml_widgets_get_the_scene():
    """Every widget class in the .ui is a Qt class or a declared custom widget whose class and
    header are Slicer's / CTK's, and every MRML widget is connected to ``mrmlSceneChanged``
    (the stub gives every widget the scene, so only this checks the .ui's connections)."""
    root = ET.parse(UI_FILE).getroot()
    custom = {c.findtext("class"): c for c in root.iter("customwidget")}
    known = {"ctkCollapsibleButton", "ctkPathLineEdit", "qMRMLNodeComboBox", "qMRMLWidget", "qSlicerWidget",
             "qSlicerMarkupsPlaceWidget", "qMRMLSegmentSelectorWidget"}  # from Slicer's / CTK's sources
    assert set(custom) <= known, sorted(set(custom) - known)
    for name, c in custom.items():
        assert c.findtext("header") == f"{name}.h"
        base = c.findtext("extends")
        assert base == "QWidget" or base in custom, (name, base)
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    assert widgets["segmentSelector"] == "qMRMLSegmentSelectorWidget"
    qt_classes = {"QRadioButton", "QLabel", "QComboBox", "QPushButton", "QLineEdit", "QProgressBar",
                  "QTextBrowser"}
    assert set(widgets.values()) <= set(custom) | qt_classes
    scene_receivers = {c.findtext("receiver") for c in root.iter("connection")
                       if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                       and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml = {n for n, cls in widgets.items() if cls.startswith(("qMRML", "qSlicer")) and n != root.findtext("class")}
    assert mrml == scene_receivers, sorted(mrml ^ scene_receivers)
