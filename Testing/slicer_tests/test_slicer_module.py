"""MedMVLSlicer.py imported with stub slicer/qt/ctk (real MRML from slicer-core): the widget
wires up from the real .ui, buttons call the Logic, errors are displayed, nothing is
pip-installed and torch is never imported."""

from __future__ import annotations

import functools
import importlib
import subprocess
import sys
import types
import unittest
from pathlib import Path

import numpy as np
import pytest

slicer_core = pytest.importorskip("slicer", reason="slicer-core is installed by `make test`")
if not hasattr(slicer_core, "vtkMRMLScene"):
    pytest.skip("the installed `slicer` is not slicer-core", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import slicer_stubs as stubs  # noqa: E402

TESTING = Path(__file__).resolve().parents[1]


@pytest.fixture()
def env(monkeypatch):
    """Install the stubs, import the module fresh, restore sys.modules afterwards."""
    saved = {n: sys.modules.get(n) for n in stubs.STUB_NAMES}
    calls = []

    def no_subprocess(*a, **k):
        calls.append(a)
        raise AssertionError(f"unexpected subprocess at import/setup: {a}")

    rec = stubs.install()
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "check_call", no_subprocess)
    sys.modules.pop("MedMVLSlicer", None)
    mod = importlib.import_module("MedMVLSlicer")
    monkeypatch.undo()  # the Logic may start processes later, on request
    yield mod, rec
    for n, m in saved.items():
        if m is None:
            sys.modules.pop(n, None)
        else:
            sys.modules[n] = m


def _widget(mod):
    w = mod.MedMVLSlicerWidget()
    w.setup()
    return w


class Spy:
    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def __call__(self, *args, **kw):
        self.calls.append(args)
        if self.fail:
            raise self.fail


def test_import_pulls_no_torch_and_installs_nothing():
    code = ("import sys; sys.path.insert(0, %r); import slicer_stubs as s; s.install(); "
            "import subprocess\n"
            "def boom(*a, **k): raise SystemExit('subprocess at import: %%r' %% (a,))\n"
            "subprocess.Popen = subprocess.run = subprocess.check_call = boom\n"
            "import MedMVLSlicer; w = MedMVLSlicer.MedMVLSlicerWidget(); w.setup()\n"
            "bad = [m for m in ('torch', 'transformers', 'pip') if m in sys.modules]\n"
            "print('HEAVY', bad)" % str(TESTING))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def test_widget_wires_up_from_the_ui(env):
    mod, rec = env
    w = _widget(mod)
    tasks = [w.ui.taskComboBox.itemData(i) for i in range(len(w.ui.taskComboBox._items))]
    assert tasks == ["ask", "report", "describe", "find", "crop_ask"]
    assert [t for t, _ in w.ui.quantizationComboBox._items] == ["none", "8bit", "4bit"]
    assert rec.timers and rec.timers[0].active and rec.timers[0].interval == 100
    assert rec.timers[0].slots == [w.logic.controller.poll]
    assert rec.app_slots["aboutToQuit()"] == [w.logic.shutdown]
    assert w.ui.askButton.enabled is False  # no worker yet
    assert w.ui.urlLineEdit.enabled is False and w.ui.pythonPathLineEdit.enabled is True
    w.ui.localRadioButton.checked = False
    w.ui.remoteRadioButton.checked = True
    w.ui.localRadioButton.emit("toggled(bool)", False)
    assert w.ui.urlLineEdit.enabled is True and w.ui.checkpointPathLineEdit.enabled is False
    assert w.ui.startButton.text == "Connect"
    w.ui.taskComboBox.setCurrentIndex(2)  # describe: no question, needs a box
    assert w.ui.questionLineEdit.enabled is False and w.ui.askButton.text == "Describe region"


def test_buttons_call_the_logic(env, tmp_path):
    mod, rec = env
    w = _widget(mod)
    for name in ("startLocalWorker", "connectRemoteWorker", "runTask", "cancel", "stopWorker",
                 "downloadModel"):
        setattr(w.logic, name, Spy())
    w.ui.pythonPathLineEdit.currentPath = "/opt/env/bin/python"
    w.ui.checkpointPathLineEdit.currentPath = str(tmp_path)
    w.ui.deviceComboBox.setCurrentIndex(1)
    w.ui.quantizationComboBox.setCurrentIndex(2)
    w.ui.startButton.click()
    assert w.logic.startLocalWorker.calls == [("/opt/env/bin/python", str(tmp_path), "cuda", "4bit")]

    w.ui.localRadioButton.checked, w.ui.remoteRadioButton.checked = False, True
    w.ui.localRadioButton.emit("toggled(bool)", False)
    w.ui.urlLineEdit.text, w.ui.tokenLineEdit.text = "http://gpu-box:8765", "s3cret-token"
    w.ui.testConnectionButton.click()
    assert w.logic.connectRemoteWorker.calls == [("http://gpu-box:8765", "s3cret-token")]
    w.ui.startButton.click()
    assert len(w.logic.connectRemoteWorker.calls) == 2
    assert "s3cret-token" not in repr(rec.settings)  # the token never reaches the settings
    assert rec.settings["MedMVLSlicer/python"] == "/opt/env/bin/python"

    scene = stubs.sys.modules["slicer"].mrmlScene
    vol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    w.ui.inputSelector.setCurrentNode(vol)
    w.ui.roiSelector.setCurrentNode(roi)
    w.ui.askButton.enabled = True
    w.ui.taskComboBox.setCurrentIndex(w.ui.taskComboBox.findData("crop_ask"))
    w.ui.questionLineEdit.text = "Is this a nodule?"
    w.ui.askButton.click()
    w.ui.taskComboBox.setCurrentIndex(w.ui.taskComboBox.findData("report"))
    w.ui.askButton.click()
    assert w.logic.runTask.calls == [(vol, "crop_ask", "Is this a nodule?", roi), (vol, "report", None, None)]
    w.ui.cancelButton.enabled = True
    w.ui.cancelButton.click()
    assert w.logic.cancel.calls == [()]
    w.ui.stopButton.enabled = True
    w.ui.stopButton.click()
    assert w.logic.stopWorker.calls == [()]
    rec.dialog_dir = str(tmp_path)
    w.ui.localRadioButton.checked, w.ui.remoteRadioButton.checked = True, False
    w.updateModeWidgets()
    w.ui.downloadButton.click()
    assert w.logic.downloadModel.calls == [
        ("/opt/env/bin/python", "shiym2000/MedM-VL-CT-Chest-3B-en", str(tmp_path / "MedM-VL-CT-Chest-3B-en"))]
    assert rec.errors == []


def test_errors_are_displayed_not_raised(env, tmp_path):
    mod, rec = env
    w = _widget(mod)
    w.ui.pythonPathLineEdit.currentPath = ""
    w.ui.checkpointPathLineEdit.currentPath = str(tmp_path)
    w.ui.startButton.click()  # real Logic: no interpreter chosen
    assert len(rec.errors) == 1 and "Python interpreter" in rec.errors[0]
    w.ui.pythonPathLineEdit.currentPath = sys.executable
    w.ui.checkpointPathLineEdit.currentPath = str(tmp_path / "missing")
    w.ui.startButton.click()
    assert "does not exist" in rec.errors[1]
    w.ui.askButton.enabled = True
    w.ui.askButton.click()  # no image selected
    assert "Select an image" in rec.errors[2]


def _rgb_volume(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    import vtk

    img = vtk.vtkImageData()
    img.SetDimensions(12, 10, 6)
    img.AllocateScalars(vtk.VTK_SHORT, 1)
    node.SetAndObserveImageData(img)
    arr = sys.modules["slicer"].util.arrayFromVolume(node)
    arr[...] = -1000
    node.SetSpacing(0.7, 0.7, 2.0)
    node.SetOrigin(10, 20, 30)
    return node


def test_find_streams_into_chat_and_creates_a_named_roi(env, tmp_path):
    mod, rec = env
    w = _widget(mod)
    scene = sys.modules["slicer"].mrmlScene
    vol = _rgb_volume(scene)
    w.ui.inputSelector.setCurrentNode(vol)
    box = [1, 2, 3, 4, 8, 9]
    w.logic.controller._client_factory = functools.partial(
        stubs.FakeWorkerClient, tokens=["Nodule ", "at ", "[0.1, 0.2]"], boxes=[{"voxel": box}])
    w.logic.connectRemoteWorker("http://fake:1", "tok")
    w.logic.controller.wait(10)
    assert w.ui.workerStatusLabel.text.startswith("ready")
    assert w.ui.askButton.enabled is True
    w.ui.taskComboBox.setCurrentIndex(w.ui.taskComboBox.findData("find"))
    w.ui.questionLineEdit.text = "the nodule"
    w.ui.askButton.click()
    assert rec.errors == []
    w.logic.controller.wait(10)
    chat = w.ui.chatTextEdit.toPlainText()
    assert "You: Find: the nodule" in chat and "MedM-VL: Nodule at [0.1, 0.2]" in chat
    # the box in words: voxel ranges and mm (spacing 0.7 x 0.7 x 2.0)
    assert "the nodule: slices 1–3, rows 2–7, columns 3–8 (4.2 × 4.2 × 6.0 mm), shown in the views" in chat
    roi = w.ui.roiSelector.currentNode()
    assert roi is not None and roi.GetName().startswith("MedM-VL the nodule")
    assert tuple(w.logic.roiVoxelBox(roi, vol)) == tuple(box)
    client = stubs.FakeWorkerClient.instances[-1]
    assert client.uploads[0]["shape"] == (6, 10, 12) and client.uploads[0]["modality"] == "CT"
    np.testing.assert_allclose(client.uploads[0]["origin"], (-10, -20, 30))

    # Copy / Save as text node / Save file / Clear
    w.ui.copyButton.click()
    assert rec.clipboard == chat
    w.ui.saveTextNodeButton.click()
    text_node = scene.GetFirstNodeByName("MedM-VL conversation ct")
    assert text_node is not None and text_node.GetText() == chat
    assert chat.startswith("Model: fake-model — intended use not stated")
    # The answer's record is in the scene, referenced from the volume, with its ROI.
    record = vol.GetNodeReference("MedMVLConversation")
    assert record is not None and '"answer": "Nodule at [0.1, 0.2]"' in record.GetText()
    assert record.GetNthNodeReference("MedMVLBox", 0).GetID() == roi.GetID()
    # an SR needs a DICOM source: this volume was not loaded from DICOM
    pytest.importorskip("highdicom")
    with pytest.raises(ValueError, match="not read from DICOM"):
        w.logic.saveTranscriptToFile(vol, str(tmp_path / "sr.dcm"))
    assert not (tmp_path / "sr.dcm").exists()
    rec.dialog_file = str(tmp_path / "chat.txt")
    w.ui.saveFileButton.click()
    saved = (tmp_path / "chat.txt").read_text(encoding="utf-8")
    assert saved.startswith("MedM-VL answers — AI-generated, not reviewed")
    assert "Model: fake-model" in saved and "Answer (fake-model" in saved
    w.ui.clearButton.click()
    assert w.ui.chatTextEdit.toPlainText() == ""
    assert vol.GetNodeReference("MedMVLConversation") is None
    w.logic.shutdown()


def test_selecting_a_volume_restores_its_stored_conversation(env):
    mod, rec = env
    from MedMVLSlicerLib import scene_records

    from medmvl_core.client import records
    from medmvl_core.client.model_identity import ModelIdentity

    scene = sys.modules["slicer"].mrmlScene
    vol = _rgb_volume(scene)
    ident = ModelIdentity(name="MedM-VL demo (phantoms)", intended_use="trained on synthetic phantoms only")
    conv = records.Conversation(turns=[records.Turn(task="ask", question="Is there a cyst?",
                                                    answer="No.", model=ident)])
    scene_records.store(scene, vol, conv)  # as a loaded .mrb leaves it
    w = _widget(mod)
    w.ui.inputSelector.setCurrentNode(vol)
    w.onInputChanged()
    chat = w.ui.chatTextEdit.toPlainText()
    assert chat.startswith("Model: MedM-VL demo (phantoms) — trained on synthetic phantoms only")
    assert "You: Is there a cyst?\n\nMedM-VL: No." in chat
    # A record from a newer module: a message in the panel, not a stack trace.
    vol2 = _rgb_volume(scene)
    node, _ = scene_records.store(scene, vol2, records.Conversation())
    node.SetText('{"format": "medmvl.conversation", "version": 42}')
    w.ui.inputSelector.setCurrentNode(vol2)
    w.onInputChanged()
    assert "newer MedM-VL" in w.ui.statusLabel.text and w.ui.chatTextEdit.toPlainText() == ""


def test_describe_region_sends_the_roi_voxel_box(env):
    mod, rec = env
    logic = mod.MedMVLSlicerLogic()
    scene = sys.modules["slicer"].mrmlScene
    vol = _rgb_volume(scene)
    roi = logic.createRoiFromBox(vol, (2, 1, 1, 5, 6, 7), "r")
    logic.controller._client_factory = stubs.FakeWorkerClient
    logic.connectRemoteWorker("http://fake:1", "tok")
    logic.controller.wait(10)
    with pytest.raises(ValueError, match="needs a region"):
        logic.runTask(vol, "describe")
    logic.runTask(vol, "describe", roiNode=roi)
    logic.controller.wait(10)
    assert stubs.FakeWorkerClient.instances[-1].asked[-1]["box"] == [2, 1, 1, 5, 6, 7]
    assert [e.role for e in logic.controller.history(vol.GetID())] == ["user", "assistant"]


def test_worker_starts_from_slicers_startup_environment(env, monkeypatch):
    mod, rec = env
    monkeypatch.setenv("PYTHONHOME", "/slicer/python")  # what Slicer sets for its own Python
    logic = mod.MedMVLSlicerLogic()
    launcher = logic.controller._launcher_factory(python="/usr/bin/python3", checkpoint="/ckpt")
    worker_env = launcher.worker_env()
    assert "PYTHONHOME" not in worker_env  # the stub startup environment has none
    assert worker_env["HOME"] == "/tmp"


def test_the_in_slicer_self_test_runs(env, monkeypatch):
    mod, rec = env
    for var in ("MEDMVL_TEST_CHECKPOINT", "MEDMVL_TEST_URL"):
        monkeypatch.delenv(var, raising=False)
    test = mod.MedMVLSlicerTest()
    test.setUp()
    test.test_RoiRoundTrip()  # geometry round trip on a real MRML scene
    assert sys.modules["slicer"].mrmlScene.GetFirstNodeByName("MedMVLTestROI") is not None
    test.runTest()  # and the whole test as Slicer runs it (inference skipped: no worker set)
    assert any(m.startswith("Inference test SKIPPED: no worker configured") for m in rec.displayed)
    with pytest.raises(unittest.SkipTest, match="MEDMVL_TEST_CHECKPOINT"):  # unittest/ctest: a skip
        test.test_Inference()


def test_state_and_memory_shown(env):
    mod, rec = env
    w = _widget(mod)
    w.on_health({"memory": {"cuda_allocated_bytes": 2**30}})
    assert w.ui.memoryLabel.text == "cuda allocated: 1024 MiB"
    w.on_state("busy", "Ask…")
    assert w.ui.cancelButton.enabled and not w.ui.askButton.enabled and w.ui.progressBar.visible
    w.on_state("dead", "the worker process exited")
    assert w.ui.startButton.text == "Restart" and w.ui.startButton.enabled
    assert w.ui.workerStatusLabel.text == "dead: the worker process exited"
    w.on_progress("downloading", 0.4)
    assert w.ui.progressBar.value == 40 and w.ui.statusLabel.text == "downloading"


def test_ui_file_is_valid_qt_designer_xml_with_every_widget_the_module_uses():
    import os
    import re

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtWidgets = pytest.importorskip("qtpy.QtWidgets")
    from PySide6 import QtCore, QtUiTools

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    f = QtCore.QFile(str(stubs.MODULE_DIR / "Resources" / "UI" / "MedMVLSlicer.ui"))
    assert f.open(QtCore.QFile.ReadOnly)
    root = QtUiTools.QUiLoader().load(f)  # ctk/qMRML classes load as placeholders
    f.close()
    assert root is not None and app is not None
    names = {w.objectName() for w in root.findChildren(QtWidgets.QWidget)}
    used = set(re.findall(r"self\.ui\.(\w+)", (stubs.MODULE_DIR / "MedMVLSlicer.py").read_text()))
    assert len(used) > 20 and used <= names, sorted(used - names)
    token = root.findChild(QtWidgets.QLineEdit, "tokenLineEdit")
    assert token.echoMode() == QtWidgets.QLineEdit.Password
    root.deleteLater()


def _volume_of_class(scene, cls, name, comps=1):
    import vtk

    node = scene.AddNewNodeByClass(cls, name)
    img = vtk.vtkImageData()
    img.SetDimensions(8, 6, 1)
    img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, comps)
    node.SetAndObserveImageData(img)
    return node


def test_input_selector_offers_grey_and_rgb_images_but_not_label_maps(env):
    """Slicer's connectGui sets the selector's node types from the parameter's annotation; a
    bare vtkMRMLScalarVolumeNode there would make RGB images unselectable (issue 33)."""
    mod, rec = env
    scene = sys.modules["slicer"].mrmlScene
    label = _volume_of_class(scene, "vtkMRMLLabelMapVolumeNode", "mask")
    grey = _volume_of_class(scene, "vtkMRMLScalarVolumeNode", "ct")
    rgb = _volume_of_class(scene, "vtkMRMLVectorVolumeNode", "photo", comps=3)
    w = _widget(mod)
    sel = w.ui.inputSelector
    assert set(sel.nodeTypes) == {"vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"}
    assert sel.listedNodes() == [grey, rgb]
    sel.setCurrentNode(rgb)
    assert sel.currentNode() is rgb and w._parameterNode.inputVolume is rgb
    assert w.logic.volumeData(rgb).array.shape == (1, 6, 8, 3)
    assert w.logic.volumeData(rgb).modality == "photo"
    sel.setCurrentNode(label)
    assert sel.currentNode() is None and w._parameterNode.inputVolume is None
    w._parameterNode.inputVolume = grey  # parameter -> GUI
    assert sel.currentNode() is grey


def test_first_selection_skips_label_maps(env):
    mod, rec = env
    scene = sys.modules["slicer"].mrmlScene
    _volume_of_class(scene, "vtkMRMLLabelMapVolumeNode", "mask")
    rgb = _volume_of_class(scene, "vtkMRMLVectorVolumeNode", "photo", comps=3)
    w = _widget(mod)
    assert w._parameterNode.inputVolume is rgb and w.ui.inputSelector.currentNode() is rgb


def test_the_ui_and_the_annotation_name_the_same_volume_classes(env):
    mod, rec = env
    ui = stubs.load_ui_widgets(str(stubs.MODULE_DIR / "Resources" / "UI" / "MedMVLSlicer.ui"))
    annotated = stubs.node_types_of(mod.MedMVLSlicerParameterNode.annotations["inputVolume"])
    assert set(ui.inputSelector.nodeTypes) == set(annotated) == set(mod.INPUT_VOLUME_CLASSES)
    assert ui.inputSelector.showChildNodeTypes is False  # else label maps would be listed


def test_stub_connect_gui_hides_rgb_with_a_scalar_only_annotation(env):
    """The stubs do what Slicer does: the old annotation leaves RGB images unselectable."""
    mod, rec = env
    sl = sys.modules["slicer"]

    # The module's annotation before issue 33 (built with type(): this file's annotations are strings).
    Old = sl.parameterNodeWrapper.parameterNodeWrapper(
        type("Old", (), {"__annotations__": {"inputVolume": sl.vtkMRMLScalarVolumeNode}}))
    rgb = _volume_of_class(sl.mrmlScene, "vtkMRMLVectorVolumeNode", "photo", comps=3)
    ui = stubs.load_ui_widgets(str(stubs.MODULE_DIR / "Resources" / "UI" / "MedMVLSlicer.ui"))
    ui = stubs.FakeUI(inputSelector=ui.inputSelector)
    ui.inputSelector.setMRMLScene(sl.mrmlScene)
    Old(types.SimpleNamespace(params={})).connectGui(ui)
    assert ui.inputSelector.nodeTypes == ("vtkMRMLScalarVolumeNode",)
    ui.inputSelector.setCurrentNode(rgb)
    assert ui.inputSelector.currentNode() is None and ui.inputSelector.listedNodes() == []


def test_module_reload_leaves_only_the_new_logic_on_about_to_quit(env):
    """Slicer's reload calls cleanup() on the old widget, then sets up a new one: aboutToQuit
    must then stop the new logic's worker only (the old logic is not kept alive by the app)."""
    mod, rec = env
    old = _widget(mod)
    assert rec.app_slots["aboutToQuit()"] == [old.logic.shutdown]
    old.cleanup()
    new = _widget(mod)
    assert rec.app_slots["aboutToQuit()"] == [new.logic.shutdown]
    assert old.logic.shutdown not in rec.app_slots["aboutToQuit()"]


def test_transport_choice(env, monkeypatch, caplog):
    mod, rec = env
    launch = sys.modules["MedMVLSlicerLib.launch"]
    qt_transport = launch.qt_transport
    assert type(mod.MedMVLSlicerLogic().controller.runner).__name__ == "QtRunner"  # the default
    monkeypatch.setenv("MEDMVL_SLICER_TRANSPORT", "threads")
    assert type(mod.MedMVLSlicerLogic().controller.runner).__name__ == "ThreadRunner"
    monkeypatch.setenv("MEDMVL_SLICER_TRANSPORT", "carrier-pigeon")
    assert launch.transport_name() == "qt" and "use 'qt' or 'threads'" in caplog.text
    monkeypatch.delenv("MEDMVL_SLICER_TRANSPORT")

    def no_network(qt=None):
        raise qt_transport.errors.WorkerError("no QtNetwork", code="no_qt")

    monkeypatch.setattr(qt_transport, "qt_namespace", no_network)
    opts = launch.controller_options({"PATH": "/usr/bin"})
    assert "runner" not in opts and "Qt networking is unavailable" in caplog.text
    assert opts["launcher_factory"](checkpoint="ck").base_env == {"PATH": "/usr/bin"}
