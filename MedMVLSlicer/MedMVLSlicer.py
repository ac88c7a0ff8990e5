"""MedM-VL: ask a medical vision-language model about the image in 3D Slicer.

The model runs in a separate worker process (local or remote); this module only sends voxel
arrays and geometry through :mod:`medmvl_core.client` (standard library + numpy). It never
imports torch and never installs packages.
"""

import logging
import os
import sys

import qt
import slicer
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin


def _ensureClientImportable():
    """Make ``medmvl_core.client`` importable: packaged beside this file by the extension, or,
    for a developer install from a source checkout, from the repository root above it."""
    try:
        import medmvl_core.client  # noqa: F401
        return
    except ImportError:
        pass
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "medmvl_core", "client", "__init__.py")):
        sys.path.insert(0, root)
    import medmvl_core.client  # noqa: F401  (a clear ImportError if the package is missing)


_ensureClientImportable()

from medmvl_core.client import controller as ctl  # noqa: E402
from medmvl_core.client.controller import TASK_INFO, ControllerListener, PanelController, VolumeData  # noqa: E402
from MedMVLSlicerLib import launch, mrml_geometry  # noqa: E402

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")
QUANTIZATIONS = ("none", "8bit", "4bit")
SETTINGS_PREFIX = "MedMVLSlicer/"


#
# MedMVLSlicer
#


class MedMVLSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedM-VL")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = ["Markups"]
        self.parent.contributors = ["MedM-VL for 3D Slicer contributors"]
        self.parent.helpText = _(
            "Ask a medical vision-language model (MedM-VL) about the selected CT or 2D image: "
            "free questions, a report, a description of a region, or find a structure and get "
            "its box. The model runs in a separate worker process; see the project README.")
        self.parent.acknowledgementText = _(
            "Models: MedM-VL (Shi et al., arXiv 2504.04323). Module structure follows the 3D "
            "Slicer scripted module template.")


#
# MedMVLSlicerParameterNode
#


@parameterNodeWrapper
class MedMVLSlicerParameterNode:
    """The scene-saved choices. The worker token is deliberately not here (kept in memory)."""

    inputVolume: vtkMRMLScalarVolumeNode
    inputROI: vtkMRMLMarkupsROINode


#
# MedMVLSlicerWidget
#


class MedMVLSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin, ControllerListener):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = None
        self._token = ""  # remote worker token: memory only

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedMVLSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MedMVLSlicerLogic(listener=self)

        for device in DEVICES:
            self.ui.deviceComboBox.addItem(device)
        for q in QUANTIZATIONS:
            self.ui.quantizationComboBox.addItem(q)
        for repo in ctl.RELEASED_MODELS:
            self.ui.downloadModelComboBox.addItem(repo)
        for task, (label, _needsQuestion, _needsBox) in TASK_INFO.items():
            self.ui.taskComboBox.addItem(_(label), task)
        self.ui.roiPlaceWidget.buttonsVisible = False
        self.ui.roiPlaceWidget.placeButton().show()
        self.ui.roiPlaceWidget.setMRMLScene(slicer.mrmlScene)
        self._restoreSettings()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.localRadioButton.connect("toggled(bool)", self.updateModeWidgets)
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.stopButton.connect("clicked(bool)", self.onStopButton)
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnectionButton)
        self.ui.downloadButton.connect("clicked(bool)", self.onDownloadButton)
        self.ui.askButton.connect("clicked(bool)", self.onAskButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.copyButton.connect("clicked(bool)", self.onCopyButton)
        self.ui.saveTextNodeButton.connect("clicked(bool)", self.onSaveTextNodeButton)
        self.ui.saveFileButton.connect("clicked(bool)", self.onSaveFileButton)
        self.ui.clearButton.connect("clicked(bool)", self.onClearButton)
        self.ui.taskComboBox.connect("currentIndexChanged(int)", self.updateTaskWidgets)
        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputChanged)
        self.ui.checkpointPathLineEdit.connect("currentPathChanged(QString)", self.updateTaskWidgets)
        self.ui.roiSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onRoiChanged)

        # Results of the background work reach the GUI only through this timer.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", self.logic.controller.poll)
        self._pollTimer.start()
        slicer.app.connect("aboutToQuit()", self.logic.shutdown)

        self.initializeParameterNode()
        self.updateModeWidgets()
        self.updateTaskWidgets()
        self.on_state(self.logic.controller.state, "")

    def cleanup(self) -> None:
        self.removeObservers()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self.logic is not None:
            self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
        self.renderChat()

    # ---------------------------------------------------------------- settings
    def _restoreSettings(self) -> None:
        s = qt.QSettings()
        self.ui.pythonPathLineEdit.currentPath = s.value(SETTINGS_PREFIX + "python", "") or ""
        self.ui.checkpointPathLineEdit.currentPath = s.value(SETTINGS_PREFIX + "checkpoint", "") or ""
        self.ui.urlLineEdit.text = s.value(SETTINGS_PREFIX + "url", "http://127.0.0.1:8765")

    def _saveSettings(self) -> None:
        s = qt.QSettings()  # never the token
        s.setValue(SETTINGS_PREFIX + "python", self.ui.pythonPathLineEdit.currentPath)
        s.setValue(SETTINGS_PREFIX + "checkpoint", self.ui.checkpointPathLineEdit.currentPath)
        s.setValue(SETTINGS_PREFIX + "url", self.ui.urlLineEdit.text)

    # ---------------------------------------------------------------- widgets state
    def updateModeWidgets(self, _checked=None) -> None:
        local = bool(self.ui.localRadioButton.checked)
        for w in (self.ui.pythonPathLineEdit, self.ui.checkpointPathLineEdit, self.ui.deviceComboBox,
                  self.ui.quantizationComboBox, self.ui.downloadButton, self.ui.downloadModelComboBox):
            w.enabled = local
        for w in (self.ui.urlLineEdit, self.ui.tokenLineEdit, self.ui.testConnectionButton):
            w.enabled = not local
        self.ui.startButton.text = _("Start") if local else _("Connect")

    def currentTask(self) -> str:
        return self.ui.taskComboBox.itemData(self.ui.taskComboBox.currentIndex) or "ask"

    def inputProblem(self) -> str:
        """Why the model (the worker's, else the checkpoint's, from its config.json) cannot take the input
        volume — a 2D image for a CT model or the reverse — or "" (shape only: no voxels are read)."""
        node = self.ui.inputSelector.currentNode()
        image = node.GetImageData() if node is not None else None
        if image is None:
            return ""
        i, j, k = image.GetDimensions()
        comps = image.GetNumberOfScalarComponents()
        ckpt = self.ui.checkpointPathLineEdit.currentPath if self.ui.localRadioButton.checked else None
        return self.logic.controller.input_problem((k, j, i, comps) if comps > 1 else (k, j, i), ckpt) or ""

    def updateTaskWidgets(self, _index=None) -> None:
        label, needsQuestion, needsBox = TASK_INFO[self.currentTask()]
        self.ui.questionLineEdit.enabled = needsQuestion
        self.ui.askButton.text = _(label)
        problem = self.inputProblem()  # the task buttons say why they are disabled for this volume
        self.ui.askButton.toolTip = problem or (_("Select an ROI first.") if needsBox
                                                and not self.ui.roiSelector.currentNode() else "")
        if problem:
            self.ui.askButton.enabled = False
        elif self.logic.controller.state == ctl.READY:
            self.ui.askButton.enabled = True

    def onInputChanged(self, _node=None) -> None:
        self.updateTaskWidgets()
        self.renderChat()

    def onRoiChanged(self, node=None) -> None:
        self.ui.roiPlaceWidget.setCurrentNode(node)
        self.updateTaskWidgets()

    # ---------------------------------------------------------------- buttons
    def onStartButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start the worker."), waitCursor=True):
            self._saveSettings()
            if self.ui.localRadioButton.checked:
                self.logic.startLocalWorker(self.ui.pythonPathLineEdit.currentPath,
                                            self.ui.checkpointPathLineEdit.currentPath,
                                            self.ui.deviceComboBox.currentText,
                                            self.ui.quantizationComboBox.currentText)
            else:
                self._token = self.ui.tokenLineEdit.text
                self.logic.connectRemoteWorker(self.ui.urlLineEdit.text, self._token)

    def onTestConnectionButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot reach the worker."), waitCursor=True):
            self._token = self.ui.tokenLineEdit.text
            self.logic.connectRemoteWorker(self.ui.urlLineEdit.text, self._token)

    def onStopButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to stop the worker."), waitCursor=True):
            self.logic.stopWorker()

    def onDownloadButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to download the model."), waitCursor=False):
            folder = qt.QFileDialog.getExistingDirectory(None, _("Folder for the downloaded model"))
            if not folder:
                return
            repo = self.ui.downloadModelComboBox.currentText
            target = os.path.join(folder, repo.split("/")[-1])
            self.logic.downloadModel(self.ui.pythonPathLineEdit.currentPath, repo, target)
            self.ui.checkpointPathLineEdit.currentPath = target

    def onAskButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to ask the model."), waitCursor=False):
            task = self.currentTask()
            needsBox = TASK_INFO[task][2]
            self.logic.runTask(self.ui.inputSelector.currentNode(), task,
                               self.ui.questionLineEdit.text if TASK_INFO[task][1] else None,
                               self.ui.roiSelector.currentNode() if needsBox else None)
            self.renderChat()

    def onCancelButton(self) -> None:
        self.logic.cancel()

    def onCopyButton(self) -> None:
        qt.QApplication.clipboard().setText(self.logic.transcript(self.ui.inputSelector.currentNode()))

    def onSaveTextNodeButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to save the conversation."), waitCursor=True):
            self.logic.saveTranscriptToTextNode(self.ui.inputSelector.currentNode())

    def onSaveFileButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to save the conversation."), waitCursor=True):
            path = qt.QFileDialog.getSaveFileName(None, _("Save conversation"), "", "Text (*.txt)")
            if path:
                self.logic.saveTranscriptToFile(self.ui.inputSelector.currentNode(), path)

    def onClearButton(self) -> None:
        self.logic.clearHistory(self.ui.inputSelector.currentNode())
        self.renderChat()

    # ---------------------------------------------------------------- controller events
    def renderChat(self) -> None:
        if not hasattr(self, "ui"):
            return
        node = self.ui.inputSelector.currentNode()
        if node is None:
            self.ui.chatTextEdit.setPlainText("")
            return
        text = self.logic.transcript(node)
        partial = self.logic.controller.partial(node.GetID())
        if partial:
            text += ("\n\n" if text else "") + "MedM-VL: " + partial
        self.ui.chatTextEdit.setPlainText(text)

    def on_state(self, state: str, detail: str) -> None:
        busy = state in (ctl.BUSY, ctl.STARTING)
        self.ui.workerStatusLabel.text = state + (f": {detail}" if detail else "")
        self.ui.askButton.enabled = state == ctl.READY and not self.inputProblem()
        self.ui.cancelButton.enabled = busy
        self.ui.startButton.enabled = not busy
        self.ui.stopButton.enabled = state != ctl.DISCONNECTED
        self.ui.progressBar.visible = busy
        if state == ctl.DEAD:
            self.ui.startButton.text = _("Restart")
        elif state == ctl.DISCONNECTED:
            self.updateModeWidgets()

    def on_health(self, health: dict) -> None:
        self.ui.memoryLabel.text = ctl.format_memory(health.get("memory"))

    def on_token(self, key: str, piece: str) -> None:
        self.renderChat()

    def on_answer(self, key: str, answer) -> None:
        node = slicer.mrmlScene.GetNodeByID(key)
        if node is not None and answer.boxes:
            rois = self.logic.createRoisForAnswer(node, answer)
            if rois:
                self.ui.roiSelector.setCurrentNode(rois[0])
        self.renderChat()

    def on_error(self, key, message: str) -> None:
        self.ui.statusLabel.text = message
        self.renderChat()

    def on_progress(self, text: str, fraction) -> None:
        self.ui.statusLabel.text = text
        if fraction is None:
            self.ui.progressBar.maximum = 0  # busy indicator
        else:
            self.ui.progressBar.maximum = 100
            self.ui.progressBar.value = int(100 * fraction)


#
# MedMVLSlicerLogic
#


class MedMVLSlicerLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, usable from scripts without the widget.

    Background answers arrive through ``self.controller.poll()`` (the widget's timer calls it;
    scripts call ``self.controller.wait()``).
    """

    def __init__(self, listener=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        # The worker starts from Slicer's startup environment, not from Slicer's own.
        self.controller = PanelController(
            listener, launcher_factory=launch.launcher_factory(self.workerEnvironment()))

    def getParameterNode(self):
        return MedMVLSlicerParameterNode(super().getParameterNode())

    # ---------------------------------------------------------------- worker
    @staticmethod
    def workerEnvironment() -> dict:
        """Slicer's startup environment (before Slicer set its own PYTHONHOME, PYTHONPATH,
        library paths), so the worker's Python runs as if started from a shell."""
        try:
            env = slicer.util.startupEnvironment()
            env = dict(env) if env else None
        except Exception:  # older Slicer: fall back to the current environment
            env = None
        return env if env is not None else dict(os.environ)

    def startLocalWorker(self, python: str, checkpoint: str, device: str = "auto",
                         quantize: str = "none") -> None:
        if not python:
            raise ValueError(_("Choose the Python interpreter of an environment with this "
                               "project installed (it runs the model)."))
        self.controller.start_local(python, checkpoint, device, quantize)

    def connectRemoteWorker(self, url: str, token: str) -> None:
        if not url:
            raise ValueError(_("Enter the worker URL, for example http://127.0.0.1:8765"))
        self.controller.connect_remote(url, token)

    def stopWorker(self) -> None:
        self.controller.stop()

    def downloadModel(self, python: str, repoId: str, localDir: str) -> None:
        if not python:
            raise ValueError(_("Choose the Python interpreter that will run the worker first."))
        self.controller.download(python, repoId, localDir, env=self.workerEnvironment())

    def cancel(self) -> None:
        self.controller.cancel()

    def shutdown(self) -> None:
        self.controller.shutdown()

    # ---------------------------------------------------------------- geometry
    @staticmethod
    def volumeData(volumeNode) -> VolumeData:
        """Voxels + world geometry of a scalar or vector volume node (nothing else leaves)."""
        if volumeNode is None:
            raise ValueError(_("Select an image first."))
        array = mrml_geometry.volume_array(volumeNode)
        if array.ndim == 4:
            modality = "photo"
        elif array.shape[0] == 1:
            modality = "XR"
        else:
            modality = "CT" if float(array.min()) < -500 else "MR"
        return VolumeData(key=volumeNode.GetID(), array=array,
                          ijk_to_ras=mrml_geometry.volume_ijk_to_world(volumeNode), modality=modality)

    @staticmethod
    def roiVoxelBox(roiNode, volumeNode):
        """(k1, j1, i1, k2, j2, i2) of the ROI on the volume (rotated/transformed, clipped)."""
        return mrml_geometry.roi_node_to_voxel_box(roiNode, volumeNode)

    @staticmethod
    def createRoiFromBox(volumeNode, box, name: str):
        """A new ROI node (world RAS) covering voxel box ``box`` of the volume."""
        return mrml_geometry.voxel_box_to_roi_node(slicer.mrmlScene, volumeNode, box, name)

    def createRoisForAnswer(self, volumeNode, answer) -> list:
        rois = []
        label = self.controller.last_question.get(volumeNode.GetID(), answer.task).strip()[:40]
        for n, box in enumerate(ctl.unique_voxel_boxes(answer.boxes)):
            name = slicer.mrmlScene.GenerateUniqueName(f"MedM-VL {label}" + (f" {n + 1}" if n else ""))
            rois.append(self.createRoiFromBox(volumeNode, box, name))
        return rois

    # ---------------------------------------------------------------- tasks
    def runTask(self, volumeNode, task: str, question=None, roiNode=None) -> None:
        """Start a task in the background (see ``controller.poll``/``wait`` for the answer)."""
        box = self.roiVoxelBox(roiNode, volumeNode) if roiNode is not None else None
        if TASK_INFO.get(task, ("", False, False))[2] and roiNode is None:
            raise ValueError(_("This task needs a region: select or place an ROI first."))
        self.controller.run_task(self.volumeData(volumeNode), task, question, box)

    # ---------------------------------------------------------------- history
    def transcript(self, volumeNode) -> str:
        return self.controller.transcript(volumeNode.GetID()) if volumeNode is not None else ""

    def clearHistory(self, volumeNode) -> None:
        if volumeNode is not None:
            self.controller.clear_history(volumeNode.GetID())

    def saveTranscriptToTextNode(self, volumeNode):
        if volumeNode is None:
            raise ValueError(_("Select an image first."))
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTextNode",
                                                  f"MedM-VL conversation {volumeNode.GetName()}")
        node.SetText(self.transcript(volumeNode))
        return node

    def saveTranscriptToFile(self, volumeNode, path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.transcript(volumeNode) + "\n")


#
# MedMVLSlicerTest
#


class MedMVLSlicerTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: geometry always; inference only when a worker is configured with
    MEDMVL_TEST_CHECKPOINT (+ MEDMVL_TEST_PYTHON) or MEDMVL_TEST_URL (+ MEDMVL_TEST_TOKEN)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_RoiRoundTrip()
        self.setUp()
        self.test_Inference()

    def _volume(self):
        import numpy as np

        arr = (np.arange(8 * 16 * 12, dtype=np.int16).reshape(8, 16, 12) % 300) - 1000
        node = slicer.util.addVolumeFromArray(arr, name="MedMVLTestVolume")
        node.SetSpacing(0.8, 0.7, 2.5)
        node.SetOrigin(10, -20, 30)
        return node

    def test_RoiRoundTrip(self):
        self.delayDisplay("ROI <-> voxel box")
        volume = self._volume()
        box = (2, 3, 4, 6, 11, 9)
        roi = MedMVLSlicerLogic.createRoiFromBox(volume, box, "MedMVLTestROI")
        self.assertEqual(tuple(MedMVLSlicerLogic.roiVoxelBox(roi, volume)), box)
        data = MedMVLSlicerLogic.volumeData(volume)
        self.assertEqual(data.array.shape, (8, 16, 12))
        self.delayDisplay("Geometry test passed")

    def test_Inference(self):
        checkpoint, url = os.environ.get("MEDMVL_TEST_CHECKPOINT"), os.environ.get("MEDMVL_TEST_URL")
        if not checkpoint and not url:
            self.delayDisplay("No worker configured (MEDMVL_TEST_CHECKPOINT / MEDMVL_TEST_URL): "
                              "inference test skipped")
            return
        logic = MedMVLSlicerLogic()
        try:
            if url:
                logic.connectRemoteWorker(url, os.environ.get("MEDMVL_TEST_TOKEN", ""))
            else:
                logic.startLocalWorker(os.environ.get("MEDMVL_TEST_PYTHON", sys.executable), checkpoint,
                                       os.environ.get("MEDMVL_TEST_DEVICE", "auto"))
            logic.controller.wait(600)
            self.assertEqual(logic.controller.state, ctl.READY, logic.controller.detail)
            volume = self._volume()
            logic.runTask(volume, "ask", "What is shown?")
            logic.controller.wait(600)
            entries = logic.controller.history(volume.GetID())
            self.assertEqual([e.role for e in entries], ["user", "assistant"], logic.transcript(volume))
            self.delayDisplay("Inference test passed")
        finally:
            logic.shutdown()
