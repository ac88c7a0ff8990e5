"""The viewer's main window: axial / coronal / sagittal views with a shared crosshair and the
MedM-VL panel, bound to the shared :class:`~medmvl_core.client.controller.PanelController`
(results drained by a QTimer). Conversations save as JSON, export as Markdown or DICOM SR
(:mod:`medmvl_core.viewer.files`); a label map's label can be the region."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
from qtpy import QtCore, QtWidgets

from medmvl_core.client import controller as ctl
from medmvl_core.client import records
from medmvl_core.client.roi_geometry import ijk_to_ras_from_lps
from medmvl_core.viewer.display import WL_PRESETS, auto_window, choose_preset
from medmvl_core.viewer.slice_view import SliceView, ViewState
from medmvl_core.viewer.window_actions import FileActions

logger = logging.getLogger(__name__)


def _hbox(*items: QtWidgets.QWidget | tuple) -> QtWidgets.QHBoxLayout:
    """A row of widgets; an item ``(widget, stretch)`` gets that stretch factor."""
    row = QtWidgets.QHBoxLayout()
    for item in items:
        widget, stretch = item if isinstance(item, tuple) else (item, 0)
        row.addWidget(widget, stretch)
    return row


class ViewerWindow(QtWidgets.QMainWindow, FileActions, ctl.ControllerListener):
    """``medmvl viewer``: open an image, draw a box, ask the model."""

    def __init__(self, controller: ctl.PanelController | None = None):
        super().__init__()
        self.setWindowTitle("MedM-VL viewer")
        self.controller = controller or ctl.PanelController()
        self.controller.listener = self
        self.volume: ctl.VolumeData | None = None
        self.source_path: str | None = None  # the file or DICOM folder shown (for SR export)
        self.labelmap = None  # medmvl_core.viewer.labelmaps.LabelMap
        self._region: tuple[str, str] = ("drawn", "")  # how the user box was made
        self._build()
        self._timer = QtCore.QTimer(self)
        self._timer.setInterval(50)
        self._timer.timeout.connect(self.controller.poll)
        self._timer.start()
        self.on_state(self.controller.state, "")
        self.resize(1200, 760)

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        menu = self.menuBar().addMenu("&File")
        menu.addAction("Open image file…", self.open_file_dialog)
        menu.addAction("Open DICOM folder…", self.open_folder_dialog)
        menu.addAction("Open label map / DICOM SEG…", self.open_labelmap_dialog)
        menu.addSeparator()
        menu.addAction("Save conversation (JSON)…", lambda: self.export_dialog("json"))
        menu.addAction("Open conversation (JSON)…", self.open_conversation_dialog)
        menu.addAction("Export as Markdown…", lambda: self.export_dialog("md"))
        menu.addAction("Export as DICOM SR…", lambda: self.export_dialog("dcm"))
        menu.addSeparator()
        menu.addAction("Quit", self.close)

        self.viewState = ViewState()
        self.view = SliceView(axis=0, state=self.viewState)
        self.coronalView = SliceView(axis=1, state=self.viewState)
        self.sagittalView = SliceView(axis=2, state=self.viewState)
        for v in self.views():
            v.on_box_drawn = self._on_box_drawn
            v.on_position_changed = self._on_position
        self.sliceSlider = QtWidgets.QSlider(QtCore.Qt.Horizontal)
        self.sliceSlider.valueChanged.connect(self.view.set_slice)
        self.view.on_slice_changed = self.sliceSlider.setValue
        self.wlCombo = QtWidgets.QComboBox()
        self.wlCombo.addItems(list(WL_PRESETS))
        self.wlCombo.currentTextChanged.connect(self._apply_window)
        self.depthSpin = QtWidgets.QSpinBox()
        self.depthSpin.setRange(0, 256)
        self.depthSpin.setValue(self.view.depth)
        self.depthSpin.setToolTip("A drawn box spans this many slices above and below the current one")
        self.depthSpin.valueChanged.connect(lambda v: setattr(self.view, "depth", v))
        self.clearBoxButton = QtWidgets.QPushButton("Clear box")
        self.clearBoxButton.clicked.connect(lambda: self._on_box_drawn(None))
        bar = QtWidgets.QHBoxLayout()
        for label, w in (("Slice", self.sliceSlider), ("W/L", self.wlCombo), ("Box ± slices", self.depthSpin)):
            bar.addWidget(QtWidgets.QLabel(label))
            bar.addWidget(w, 1 if w is self.sliceSlider else 0)
        bar.addWidget(self.clearBoxButton)
        self.labelCombo = QtWidgets.QComboBox()
        self.labelCombo.setToolTip("A label of the loaded label map (File > Open label map)")
        self.labelButton = QtWidgets.QPushButton("Use label as region")
        self.labelButton.clicked.connect(lambda: self._guarded(self.use_label, self.labelCombo.currentData()))
        self.labelRow = QtWidgets.QWidget()
        lr = QtWidgets.QHBoxLayout(self.labelRow)
        lr.setContentsMargins(0, 0, 0, 0)
        lr.addWidget(QtWidgets.QLabel("Label"))
        lr.addWidget(self.labelCombo, 1)
        lr.addWidget(self.labelButton)
        self.labelRow.setVisible(False)
        grid = self._viewGrid = QtWidgets.QGridLayout()
        grid.setSpacing(3)
        grid.addWidget(self.view, 0, 0, 2, 1)
        grid.addWidget(self.coronalView, 0, 1)
        grid.addWidget(self.sagittalView, 1, 1)
        grid.setColumnStretch(0, 3)
        grid.setColumnStretch(1, 2)
        left = QtWidgets.QWidget()
        lv = QtWidgets.QVBoxLayout(left)
        lv.addLayout(grid, 1)
        lv.addLayout(bar)
        lv.addWidget(self.labelRow)

        splitter = QtWidgets.QSplitter()
        splitter.addWidget(left)
        self.panel = self._build_panel()
        splitter.addWidget(self.panel)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 2)
        self.setCentralWidget(splitter)

    def _build_panel(self) -> QtWidgets.QWidget:
        panel = QtWidgets.QWidget()
        v = QtWidgets.QVBoxLayout(panel)
        # Model
        model = QtWidgets.QGroupBox("Model")
        f = QtWidgets.QFormLayout(model)
        self.localRadio = QtWidgets.QRadioButton("Local worker")
        self.remoteRadio = QtWidgets.QRadioButton("Remote worker")
        self.localRadio.setChecked(True)
        self.localRadio.toggled.connect(self._update_mode)
        modes = QtWidgets.QHBoxLayout()
        modes.addWidget(self.localRadio)
        modes.addWidget(self.remoteRadio)
        f.addRow(modes)
        self.pythonEdit = QtWidgets.QLineEdit(sys.executable)
        f.addRow("Python:", self.pythonEdit)
        self.checkpointEdit = QtWidgets.QLineEdit()
        self.checkpointEdit.textChanged.connect(self._update_task)
        browse = QtWidgets.QPushButton("…")
        browse.clicked.connect(self._browse_checkpoint)
        f.addRow("Checkpoint:", _hbox((self.checkpointEdit, 1), browse))
        self.downloadCombo = QtWidgets.QComboBox()
        self.downloadCombo.addItems(list(ctl.RELEASED_MODELS))
        self.downloadButton = QtWidgets.QPushButton("Download a released model")
        self.downloadButton.clicked.connect(self._download)
        f.addRow("Download:", _hbox((self.downloadCombo, 1), self.downloadButton))
        self.deviceCombo = QtWidgets.QComboBox()
        self.deviceCombo.addItems(["auto", "cuda", "cpu"])
        self.quantCombo = QtWidgets.QComboBox()
        self.quantCombo.addItems(["none", "8bit", "4bit"])
        f.addRow("Device:", _hbox(self.deviceCombo, QtWidgets.QLabel("Quantization:"), self.quantCombo))
        self.urlEdit = QtWidgets.QLineEdit("http://127.0.0.1:8765")
        f.addRow("URL:", self.urlEdit)
        self.tokenEdit = QtWidgets.QLineEdit()
        self.tokenEdit.setEchoMode(QtWidgets.QLineEdit.Password)
        self.testButton = QtWidgets.QPushButton("Test connection")
        self.testButton.clicked.connect(self._connect_remote)
        f.addRow("Token:", _hbox((self.tokenEdit, 1), self.testButton))
        self.startButton = QtWidgets.QPushButton("Start")
        self.startButton.clicked.connect(self._start)
        self.stopButton = QtWidgets.QPushButton("Stop")
        self.stopButton.clicked.connect(self.controller.stop)
        f.addRow(_hbox(self.startButton, self.stopButton))
        self.stateLabel = QtWidgets.QLabel()
        self.stateLabel.setWordWrap(True)
        f.addRow("State:", self.stateLabel)
        self.memoryLabel = QtWidgets.QLabel("-")
        self.memoryLabel.setWordWrap(True)
        f.addRow("Memory:", self.memoryLabel)
        v.addWidget(model)
        # Ask
        ask = QtWidgets.QGroupBox("Ask")
        a = QtWidgets.QVBoxLayout(ask)
        self.taskCombo = QtWidgets.QComboBox()
        for task, spec in ctl.TASK_SPECS.items():
            self.taskCombo.addItem(spec.label, task)
        self.taskCombo.currentIndexChanged.connect(self._update_task)
        self.questionEdit = QtWidgets.QLineEdit()
        self.questionEdit.setPlaceholderText("Question (or what to find)")
        self.questionEdit.returnPressed.connect(self.ask)
        a.addLayout(_hbox(self.taskCombo, (self.questionEdit, 1)))
        self.askButton = QtWidgets.QPushButton("Ask")
        self.askButton.clicked.connect(self.ask)
        self.cancelButton = QtWidgets.QPushButton("Cancel")
        self.cancelButton.clicked.connect(self.controller.cancel)
        a.addLayout(_hbox(self.askButton, self.cancelButton))
        self.progress = QtWidgets.QProgressBar()
        self.statusLabel = QtWidgets.QLabel()
        self.statusLabel.setWordWrap(True)
        a.addWidget(self.progress)
        a.addWidget(self.statusLabel)
        self.chat = QtWidgets.QTextBrowser()
        a.addWidget(self.chat, 1)
        row = QtWidgets.QHBoxLayout()
        for text, slot in (("Copy", self.copy_chat), ("Save…", self.save_chat_dialog), ("Clear", self.clear_chat)):
            b = QtWidgets.QPushButton(text)
            b.clicked.connect(slot)
            row.addWidget(b)
        a.addLayout(row)
        v.addWidget(ask, 1)
        self._update_mode()
        self._update_task()
        return panel

    # ------------------------------------------------------------------ images
    def open_file_dialog(self) -> None:
        path, _ = QtWidgets.QFileDialog.getOpenFileName(
            self, "Open image", "", "Images (*.nii *.nii.gz *.nrrd *.nhdr *.mha *.mhd *.png *.jpg *.jpeg *.dcm *.npy);;All (*)")
        if path:
            self._guarded(self.load_path, path)

    def open_folder_dialog(self) -> None:
        path = QtWidgets.QFileDialog.getExistingDirectory(self, "Open DICOM folder")
        if path:
            self._guarded(self.load_path, path)

    def load_path(self, path: str | os.PathLike) -> None:
        """Read a file or DICOM folder with medmvl_core.imaging and show it."""
        from medmvl_core.imaging import read_image

        vol = read_image(str(path))
        dicom: dict = {}
        if vol.source.startswith("dicom"):  # keep the series' UIDs for an SR export (never uploaded)
            from medmvl_core.export.sr import dicom_refs, read_source_headers
            dicom = dicom_refs(read_source_headers(path))
        self.set_volume(str(Path(path).resolve()), vol.array, vol.spacing, vol.origin,
                        vol.direction, vol.modality)
        self.volume.dicom = dicom
        self.source_path = str(path) if dicom else None

    def set_volume(self, key: str, array: np.ndarray, spacing=(1.0, 1.0, 1.0),
                   origin=(0.0, 0.0, 0.0), direction=None, modality: str = "CT") -> None:
        """Show an array [k, j, i] / [1, H, W(, 3)] with LPS geometry; ``key`` keys its history."""
        direction = np.eye(3) if direction is None else np.asarray(direction, float)
        self.volume = ctl.VolumeData(key=key, array=np.asarray(array),
                                     ijk_to_ras=ijk_to_ras_from_lps(spacing, origin, direction),
                                     modality=modality or "CT")
        # Superior up in the coronal and sagittal views when k runs towards the head (LPS z).
        self.view.set_volume(self.volume.array, spacing, flip_rows=bool(direction[2, 2] >= 0))
        self.sliceSlider.setRange(0, max(0, self.view.num_slices - 1))
        self.sliceSlider.setValue(self.view.k)
        three_d = self.volume.array.ndim == 3 and self.volume.array.shape[0] > 1
        self.coronalView.setVisible(three_d)
        self.sagittalView.setVisible(three_d)
        self._viewGrid.setColumnStretch(1, 2 if three_d else 0)  # a 2D image takes the whole width
        is_rgb = self.volume.array.ndim == 4
        self.wlCombo.setEnabled(not is_rgb)
        preset = "Auto" if is_rgb else choose_preset(self.volume.array, modality or "")
        if self.wlCombo.currentText() == preset:
            self._apply_window(preset)
        else:
            self.wlCombo.setCurrentText(preset)  # applies it
        self.labelmap = None
        self.labelRow.setVisible(False)
        self._region = ("drawn", "")
        self.setWindowTitle(f"MedM-VL viewer — {Path(key).name}")
        self._update_task()
        self.render_chat()

    def views(self) -> list[SliceView]:
        """The axial, coronal and sagittal views."""
        return [self.view, self.coronalView, self.sagittalView]

    def _on_position(self, pos) -> None:
        self.sliceSlider.blockSignals(True)
        self.sliceSlider.setValue(int(pos[0]))
        self.sliceSlider.blockSignals(False)

    def _apply_window(self, name: str) -> None:
        preset = WL_PRESETS.get(name)
        if preset is None and self.volume is not None and self.volume.array.ndim == 3:
            preset = auto_window(self.volume.array)
        self.view.set_window(*(preset or (None, None)))

    def _on_box_drawn(self, box, source: str = "drawn", label: str = "") -> None:
        if box is None:
            self.view.set_user_box(None)
        self._region = (source, label)
        if box and self.volume is not None:
            text = records.describe_box(records.BoxRecord(voxel=list(box), source=source, label=label),
                                        self._spacing())
            self.statusLabel.setText(f"box set — {text}")
        else:
            self.statusLabel.setText("no box")
        self._update_task()

    def _spacing(self) -> tuple[float, float, float]:
        m = np.asarray(self.volume.ijk_to_ras, float) if self.volume is not None else np.eye(4)
        return tuple(float(v) for v in np.linalg.norm(m[:3, :3], axis=0))  # type: ignore[return-value]

    # ------------------------------------------------------------------ actions
    def _guarded(self, fn, *args) -> bool:
        """Run fn; show a typed error in the panel (and a dialog when visible) instead of raising."""
        try:
            fn(*args)
            return True
        except Exception as exc:  # every failure is shown, none crashes the window
            logger.info("action failed: %s", exc)
            self.statusLabel.setText(f"Error: {exc}")
            if self.isVisible() and os.environ.get("QT_QPA_PLATFORM") != "offscreen":
                QtWidgets.QMessageBox.warning(self, "MedM-VL", str(exc))
            return False

    def _browse_checkpoint(self) -> None:
        path = QtWidgets.QFileDialog.getExistingDirectory(self, "Checkpoint folder")
        if path:
            self.checkpointEdit.setText(path)

    def _start(self) -> None:
        if self.localRadio.isChecked():
            self._guarded(self.controller.start_local, self.pythonEdit.text(), self.checkpointEdit.text(),
                          self.deviceCombo.currentText(), self.quantCombo.currentText())
        else:
            self._connect_remote()

    def _connect_remote(self) -> None:
        self._guarded(self.controller.connect_remote, self.urlEdit.text(), self.tokenEdit.text())

    def _download(self) -> None:
        folder = QtWidgets.QFileDialog.getExistingDirectory(self, "Folder for the downloaded model")
        if folder:
            target = os.path.join(folder, self.downloadCombo.currentText().split("/")[-1])
            if self._guarded(self.controller.download, self.pythonEdit.text(),
                             self.downloadCombo.currentText(), target):
                self.checkpointEdit.setText(target)

    def current_task(self) -> str:
        return self.taskCombo.currentData() or "ask"

    def set_task(self, task: str) -> None:
        self.taskCombo.setCurrentIndex(self.taskCombo.findData(task))

    def ask(self) -> bool:
        """Run the selected task on the image (with the drawn box where the task needs one)."""
        if self.volume is None:
            self.statusLabel.setText("Error: open an image first")
            return False
        task = self.current_task()
        spec = ctl.TASK_SPECS[task]
        ok = self._guarded(self.controller.run_task, self.volume, task,
                           self.questionEdit.text() if spec.needs_question else None,
                           self.view.user_box() if spec.needs_box else None,
                           self._region[0], self._region[1])
        self.render_chat()
        return ok

    def copy_chat(self) -> None:
        QtWidgets.QApplication.clipboard().setText(self.chat.toPlainText())

    def save_chat_dialog(self) -> None:
        path, _ = QtWidgets.QFileDialog.getSaveFileName(
            self, "Save conversation", "", "Text (*.txt);;Markdown (*.md);;Conversation (*.json);;DICOM SR (*.dcm)")
        if path:
            kind = Path(path).suffix.lower().lstrip(".") or "txt"
            if kind in ("md", "json", "dcm"):
                self._guarded(self.export_conversation, path, kind)
            else:
                self.save_chat(path)

    def save_chat(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.chat.toPlainText() + "\n", encoding="utf-8")

    def clear_chat(self) -> None:
        if self.volume is not None:
            self.controller.clear_history(self.volume.key)
        self.render_chat()

    # ------------------------------------------------------------------ view state
    def _update_mode(self, *_a) -> None:
        local = self.localRadio.isChecked()
        for w in (self.pythonEdit, self.checkpointEdit, self.deviceCombo, self.quantCombo,
                  self.downloadButton, self.downloadCombo):
            w.setEnabled(local)
        for w in (self.urlEdit, self.tokenEdit, self.testButton):
            w.setEnabled(not local)
        self.startButton.setText("Start" if local else "Connect")

    def input_problem(self) -> str | None:
        """Why the model (the running worker's, else the checkpoint field's, read from its config.json)
        cannot take the open image, or None."""
        if self.volume is None:
            return None
        ckpt = self.checkpointEdit.text() if self.localRadio.isChecked() else None
        return self.controller.input_problem(self.volume, ckpt)

    def _update_task(self, *_a) -> None:
        spec = ctl.TASK_SPECS[self.current_task()]
        self.questionEdit.setEnabled(spec.needs_question)
        self.askButton.setText(spec.label)
        problem = self.input_problem()
        self.askButton.setToolTip(problem or ("Draw a box on the image first"
                                              if spec.needs_box and not self.view.user_box() else ""))
        if problem:
            self.askButton.setEnabled(False)
        elif self.controller.state == ctl.READY:
            self.askButton.setEnabled(True)
        if problem:
            self.statusLabel.setText(f"Cannot ask: {problem}")

    def render_chat(self) -> None:
        if self.volume is None:
            self.chat.setPlainText("")
            return
        text = self.transcript()
        partial = self.controller.partial(self.volume.key)
        if partial:
            text += ("\n\n" if text else "") + "MedM-VL: " + partial
        self.chat.setPlainText(text)
        self.chat.verticalScrollBar().setValue(self.chat.verticalScrollBar().maximum())

    def transcript(self) -> str:
        """The chat as shown: the answering model and its intended use, then each turn, found
        boxes as label, voxel ranges and size in mm."""
        key = self.volume.key
        fallback = self.controller.model_identity() if self.controller.health else None
        return records.chat_text(self.controller.history(key), self.controller.conversations.get(key),
                                 fallback)

    # ------------------------------------------------------------------ controller events
    def on_state(self, state: str, detail: str) -> None:
        busy = state in (ctl.BUSY, ctl.STARTING)
        self.stateLabel.setText(state + (f": {detail}" if detail else ""))
        self.askButton.setEnabled(state == ctl.READY and not self.input_problem())
        self.cancelButton.setEnabled(busy)
        self.startButton.setEnabled(not busy)
        self.stopButton.setEnabled(state != ctl.DISCONNECTED)
        self.progress.setVisible(busy)
        if state == ctl.DEAD:
            self.startButton.setText("Restart")
        elif state == ctl.DISCONNECTED:
            self._update_mode()

    def on_health(self, health: dict) -> None:
        self.memoryLabel.setText(ctl.format_memory(health.get("memory")))
        self.stateLabel.setToolTip(ctl.ModelIdentity.from_health(health).label())
        self.render_chat()  # the model line heads the chat before the first question

    def on_token(self, key: str, piece: str) -> None:
        if self.volume is not None and key == self.volume.key:
            self.render_chat()

    def on_answer(self, key: str, answer) -> None:
        if self.volume is not None and key == self.volume.key:
            label = self.controller.last_question.get(key, answer.task)[:30]
            boxes = ctl.unique_voxel_boxes(answer.boxes)
            if boxes:  # an answer without boxes keeps the last ones on screen
                self.view.clear_found_boxes()
            for box in boxes:  # every returned box, shown in each view it crosses
                self.view.add_found_box(box, label)
            self.render_chat()

    def on_error(self, key, message: str) -> None:
        self.statusLabel.setText(f"Error: {message}" if message != "cancelled" else "cancelled")
        self.render_chat()

    def on_progress(self, text: str, fraction) -> None:
        self.statusLabel.setText(text)
        if fraction is None:
            self.progress.setRange(0, 0)
        else:
            self.progress.setRange(0, 100)
            self.progress.setValue(int(100 * fraction))

    def closeEvent(self, event) -> None:
        self._timer.stop()
        self.controller.shutdown()
        super().closeEvent(event)
