"""MedM-VL: ask a medical vision-language model about the image in 3D Slicer.

The model runs in a separate worker process (local or remote); this module only sends voxel
arrays and geometry through the worker client (standard library + numpy; found by
``MedMVLSlicerLib/clientlib.py``), over Qt's networking. It never imports torch and never
installs packages.
"""

import logging
import os
import sys
import unittest
from typing import Union

import qt
import slicer
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# The client (standard library + numpy) comes from a source checkout or the extension's bundle,
# found without touching sys.path (MedMVLSlicerLib/clientlib.py); a clear ImportError otherwise.
from MedMVLSlicerLib import launch, mrml_geometry, scene_records, segment_region  # noqa: E402
from MedMVLSlicerLib.clientlib import RoiError, client_module  # noqa: E402
from MedMVLSlicerLib.clientlib import controller as ctl  # noqa: E402

records = client_module("records")
#: the tasks and their rules (label, needs a question / a box): the protocol's table
TASK_SPECS, ControllerListener, PanelController, VolumeData = (
    ctl.TASK_SPECS, ctl.ControllerListener, ctl.PanelController, ctl.VolumeData)

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")
QUANTIZATIONS = ("none", "8bit", "4bit")
SETTINGS_PREFIX = "MedMVLSlicer/"
#: The volume classes the panel sends (grey volumes and 2D images, RGB/vector images); label maps
#: (a subclass of scalar volumes) are not images to ask about. The .ui's selector lists the same.
INPUT_VOLUME_CLASSES = ("vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode")


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
            "its box. The model runs in a separate worker process; see docs/slicer.md in the project.")
        self.parent.acknowledgementText = _(
            "Models: MedM-VL (Shi et al., arXiv 2504.04323). Module structure follows the 3D "
            "Slicer scripted module template.")


#
# MedMVLSlicerParameterNode
#


@parameterNodeWrapper
class MedMVLSlicerParameterNode:
    """The scene-saved choices. The worker token is deliberately not here (kept in memory).

    ``connectGui`` sets the input selector's node types from ``inputVolume``'s annotation (and the
    selector lists exactly those classes), so the annotation names every class in
    :data:`INPUT_VOLUME_CLASSES`; a bare ``vtkMRMLScalarVolumeNode`` would hide RGB images.
    """

    inputVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode, None]
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
        self._quitSlot = None  # what aboutToQuit calls: disconnected in cleanup (module reload)
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
        for task, spec in TASK_SPECS.items():
            self.ui.taskComboBox.addItem(_(spec.label), task)
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
        self.ui.segmentRadioButton.connect("toggled(bool)", self.updateRegionWidgets)
        # the selector re-announces the node after refilling its segment list: both signals matter
        self.ui.segmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateTaskWidgets)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.updateTaskWidgets)

        # Results of the background work reach the GUI only through this timer.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", self.logic.controller.poll)
        self._pollTimer.start()
        self._quitSlot = self.logic.shutdown
        slicer.app.connect("aboutToQuit()", self._quitSlot)

        self.initializeParameterNode()
        self.updateModeWidgets()
        self.updateRegionWidgets()
        self.on_state(self.logic.controller.state, "")

    def cleanup(self) -> None:
        """Called on module reload and application exit: stop the worker and let go of the app."""
        self.removeObservers()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self._quitSlot is not None:  # else a reloaded module leaves the old logic connected
            slicer.app.disconnect("aboutToQuit()", self._quitSlot)
            self._quitSlot = None
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
        # Node IDs are reused by the next scene: chats live on in its text nodes, not in memory.
        self.logic.controller.histories.clear()
        self.logic.controller.conversations.clear()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = self.logic.firstInputVolume()
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

    def regionFromSegment(self) -> bool:
        """True when the region tasks use the chosen segment's box instead of the drawn ROI."""
        return bool(self.ui.segmentRadioButton.checked)

    def segmentProblem(self) -> str:
        """Why the current task cannot run on the chosen segment yet, or "" (also "" when the task
        needs no region or the region is the drawn ROI). Only the selection is checked here; an
        empty segment or one outside the image is found when the button is pressed."""
        if not (TASK_SPECS[self.currentTask()].needs_box and self.regionFromSegment()):
            return ""
        node = self.ui.segmentSelector.currentNode()
        if node is None:
            return _("Select a segmentation and a segment first.")
        segmentation = node.GetSegmentation()
        if segmentation.GetNumberOfSegments() == 0:
            return _("'{name}' has no segments: add one in the Segment Editor.").format(name=node.GetName())
        # the selector keeps its last segment ID while its list is empty: an ID not in the node is none
        segment_id = self.ui.segmentSelector.currentSegmentID()
        if not segment_id or segmentation.GetSegment(segment_id) is None:
            return _("Select a segment of '{name}'.").format(name=node.GetName())
        return ""

    def canAsk(self, state: str) -> bool:
        """The task button's state: a ready worker, a volume the model takes and, for a segment
        region, a chosen segment (a missing drawn ROI is said on pressing, as before)."""
        return state == ctl.READY and not self.inputProblem() and not self.segmentProblem()

    def updateRegionWidgets(self, _checked=None) -> None:
        segment = self.regionFromSegment()
        self.ui.roiSelector.enabled = self.ui.roiPlaceWidget.enabled = not segment
        self.ui.segmentSelector.enabled = segment
        self.updateTaskWidgets()

    def updateTaskWidgets(self, _index=None) -> None:
        spec = TASK_SPECS[self.currentTask()]
        self.ui.questionLineEdit.enabled = spec.needs_question
        self.ui.askButton.text = _(spec.label)
        # the task button says why it is disabled: the volume, then the segment
        problem = self.inputProblem() or self.segmentProblem()
        self.ui.askButton.toolTip = problem or (
            _("Select an ROI first.") if spec.needs_box and not self.regionFromSegment()
            and not self.ui.roiSelector.currentNode() else "")
        if problem:
            self.ui.askButton.enabled = False
        elif self.logic.controller.state == ctl.READY:
            self.ui.askButton.enabled = True

    def onInputChanged(self, _node=None) -> None:
        try:  # a conversation saved with the scene comes back into the panel
            self.logic.restoreConversation(self.ui.inputSelector.currentNode())
        except ValueError as exc:  # damaged / newer record: say so, keep the panel usable
            self.ui.statusLabel.text = str(exc)
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
            spec = TASK_SPECS[self.currentTask()]
            question = self.ui.questionLineEdit.text if spec.needs_question else None
            if spec.needs_box and self.regionFromSegment():
                self.askAboutSegment(spec.name, question)
            else:
                self.logic.runTask(self.ui.inputSelector.currentNode(), spec.name, question,
                                   self.ui.roiSelector.currentNode() if spec.needs_box else None)
            self.renderChat()

    def askAboutSegment(self, task: str, question) -> None:
        """Run ``task`` on the chosen segment's box. A segment that cannot be a region (empty,
        outside the image, made on another image) is said in the status line; nothing is sent."""
        selector = self.ui.segmentSelector
        try:
            self.logic.runTaskOnSegment(self.ui.inputSelector.currentNode(), task, question,
                                        selector.currentNode(), selector.currentSegmentID())
        except RoiError as exc:
            self.ui.statusLabel.text = _("This segment cannot be the region: {reason}").format(reason=exc)

    def onCancelButton(self) -> None:
        self.logic.cancel()

    def onCopyButton(self) -> None:
        qt.QApplication.clipboard().setText(self.logic.transcript(self.ui.inputSelector.currentNode()))

    def onSaveTextNodeButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to save the conversation."), waitCursor=True):
            self.logic.saveTranscriptToTextNode(self.ui.inputSelector.currentNode())

    def onSaveFileButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to save the conversation."), waitCursor=True):
            path = qt.QFileDialog.getSaveFileName(None, _("Save conversation"), "",
                                                  "Text (*.txt);;Markdown (*.md);;DICOM SR (*.dcm)")
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
        self.ui.askButton.enabled = self.canAsk(state)
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
        # which model answers and what it is for (also the first line of every conversation)
        self.ui.workerStatusLabel.toolTip = self.logic.controller.model_identity().label()

    def on_token(self, key: str, piece: str) -> None:
        self.renderChat()

    def on_answer(self, key: str, answer) -> None:
        node = slicer.mrmlScene.GetNodeByID(key)
        if node is not None:
            rois = self.logic.storeConversation(node)  # the record + ROI nodes go into the scene
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
        self._regionRois: dict = {}  # volume node ID -> ROI node the last question was about
        # Qt networking, no Python threads (MedMVLSlicerLib/launch.py); the worker starts from
        # Slicer's startup environment, not from Slicer's own.
        self.controller = PanelController(
            listener, **launch.controller_options(self.workerEnvironment()))

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
    def firstInputVolume():
        """The first volume in the scene the input selector lists (scalar or RGB, never a label
        map), or None."""
        scene = slicer.mrmlScene
        for i in range(scene.GetNumberOfNodes()):
            node = scene.GetNthNode(i)
            if node.GetClassName() in INPUT_VOLUME_CLASSES:
                return node
        return None

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
        uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()  # loaded from DICOM
        return VolumeData(key=volumeNode.GetID(), array=array,
                          ijk_to_ras=mrml_geometry.volume_ijk_to_world(volumeNode), modality=modality,
                          dicom={"sop_instance_uids": uids} if uids else {})

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
        spec = TASK_SPECS.get(task)
        if spec is not None and spec.needs_box and roiNode is None:
            raise ValueError(_("This task needs a region: select or place an ROI first."))
        self.controller.run_task(self.volumeData(volumeNode), task, question, box)
        self._regionRois[volumeNode.GetID()] = roiNode

    def runTaskOnSegment(self, volumeNode, task: str, question, segmentationNode, segmentId: str) -> None:
        """Ask about a segment: its bounding box on the volume is the region (the mask is not
        sent; see docs/saving-results.md)."""
        region = segment_region.segment_region(segmentationNode, segmentId, volumeNode)
        if region.clipped:
            logger.warning("the segment extends beyond the volume; its region is clipped")
        name = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
        self.controller.run_task(self.volumeData(volumeNode), task, question, region.box,
                                 region_source="segment", region_label=name)
        self._regionRois[volumeNode.GetID()] = None  # no ROI node: the record keeps the box and name

    # ---------------------------------------------------------------- history
    def transcript(self, volumeNode) -> str:
        """The conversation, headed by the model's identity and intended use."""
        if volumeNode is None:
            return ""
        key = volumeNode.GetID()
        if not self.controller.history(key):
            return ""
        fallback = self.controller.model_identity() if self.controller.health else None
        return records.chat_text(self.controller.history(key), self.controller.conversations.get(key),
                                 fallback)

    def storeConversation(self, volumeNode) -> list:
        """Write the volume's records into the scene; returns the new ROI nodes of found boxes."""
        conv = self.controller.conversations.get(volumeNode.GetID())
        if conv is None:
            return []
        _, rois = scene_records.store(slicer.mrmlScene, volumeNode, conv,
                                      self._regionRois.pop(volumeNode.GetID(), None))
        return rois

    def restoreConversation(self, volumeNode) -> None:
        """Show the conversation stored in the scene for the volume (if the panel has none)."""
        if volumeNode is None or self.controller.history(volumeNode.GetID()):
            return
        conv = scene_records.load(volumeNode)
        if conv is not None:
            self.controller.restore(volumeNode.GetID(), conv)

    def clearHistory(self, volumeNode) -> None:
        if volumeNode is not None:
            self.controller.clear_history(volumeNode.GetID())
            scene_records.forget(slicer.mrmlScene, volumeNode)

    def saveTranscriptToTextNode(self, volumeNode):
        if volumeNode is None:
            raise ValueError(_("Select an image first."))
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTextNode",
                                                  f"MedM-VL conversation {volumeNode.GetName()}")
        node.SetText(self.transcript(volumeNode))
        return node

    @staticmethod
    def exportStructuredReport(volumeNode, conv, path: str) -> None:
        """DICOM Comprehensive 3D SR referencing the volume's DICOM series (highdicom needed)."""
        try:  # needs highdicom and the full package (a source checkout), not the bundled client
            from medmvl_core.export import sr
        except ImportError as exc:
            raise ValueError(_(
                "DICOM SR export needs highdicom and the MedM-VL source checkout in Slicer's Python "
                f"({exc}). Install highdicom with slicer.util.pip_install('highdicom') and add the module "
                "from a checkout, or save as JSON and run 'medmvl export answers.json --dicom SERIES_DIR -o sr.dcm' in the "
                "worker's environment.")) from exc
        if conv is None or not conv.turns:
            raise ValueError(_("Ask the model something first: there is no conversation to export."))
        uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
        files = [slicer.dicomDatabase.fileForInstance(u) for u in uids] if uids else []
        import pydicom
        sr.write_sr(conv, [pydicom.dcmread(f, stop_before_pixels=True) for f in files if f], path)

    def saveTranscriptToFile(self, volumeNode, path: str) -> None:
        conv = self.controller.conversations.get(volumeNode.GetID()) if volumeNode is not None else None
        if path.lower().endswith(".dcm"):
            return self.exportStructuredReport(volumeNode, conv, path)
        text = conv.to_markdown() if conv is not None and path.endswith(".md") else (
            conv.to_text() if conv is not None else self.transcript(volumeNode) + "\n")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)


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
        try:
            self.test_Inference()
        except unittest.SkipTest as exc:  # Reload and Test calls methods directly: say it skipped
            logger.warning("MedM-VL inference test SKIPPED: %s", exc)
            self.delayDisplay(f"Inference test SKIPPED: {exc}")

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
            self.skipTest("no worker configured: set MEDMVL_TEST_CHECKPOINT (+ MEDMVL_TEST_PYTHON) "
                          "or MEDMVL_TEST_URL (+ MEDMVL_TEST_TOKEN); see docs/slicer-install.md")
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
