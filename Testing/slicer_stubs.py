"""Stub ``slicer`` / ``qt`` / ``ctk`` modules to import and drive MedMVLSlicer.py outside Slicer
(a test helper: no tests here).

Widgets are built from the module's real ``.ui`` file (every ``<widget name=...>`` becomes a
:class:`FakeWidget`; a ``qMRMLSegmentSelectorWidget`` becomes the copy of it in
``slicer_stub_segments.py``), so code that uses a widget the .ui lacks fails. MRML classes and the
scene are the real ones from the ``slicer-core`` package (headless), so the Logic's geometry
runs for real; ``vtk`` is slicer-core's VTK.

Where Slicer's behaviour decides what a user can do, the stubs copy it (read from Slicer's
source, ``Base/Python/slicer/parameterNodeWrapper/`` and ``qMRMLNodeComboBox.cxx``):
``connectGui`` overwrites a node selector's ``nodeTypes`` with the parameter's annotation, and a
selector lists (and accepts) only nodes of exactly those classes unless ``showChildNodeTypes``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
import typing
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "MedMVLSlicer"


def _max_args(fn, n):
    """PythonQt passes a slot only as many signal arguments as the slot accepts."""
    import inspect

    params = inspect.signature(fn).parameters.values()
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return n
    return min(n, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params))


class FakeWidget:
    """A Qt widget stand-in: attributes, signals (connect/emit), combo items, MRML node."""

    def __init__(self, name: str = "", cls: str = "QWidget", props: dict | None = None):
        self.objectName, self.cls = name, cls
        self.enabled, self.visible, self.checked = True, True, False
        self.text, self.toolTip, self.currentPath = "", "", ""
        self.value, self.maximum, self.buttonsVisible = 0, 100, True
        self.currentIndex = 0
        self._items: list[tuple[str, object]] = []
        self._slots: dict[str, list] = {}
        self._node = None
        self._plain = ""
        self.scene = None
        self.nodeTypes: tuple = ()
        self.showChildNodeTypes, self.noneEnabled = True, False
        for k, v in (props or {}).items():
            setattr(self, k, v)

    # signals
    def connect(self, signal, slot):
        self._slots.setdefault(signal, []).append(slot)

    def emit(self, signal, *args):
        for slot in list(self._slots.get(signal, [])):
            slot(*args[:_max_args(slot, len(args))])

    def click(self):
        if self.enabled:
            self.emit("clicked(bool)", False)

    # combo boxes
    def addItem(self, text, data=None):
        self._items.append((text, data))

    def itemData(self, i):
        return self._items[i][1] if 0 <= i < len(self._items) else None

    def findData(self, data):
        return next((i for i, (_, d) in enumerate(self._items) if d == data), -1)

    def findText(self, text):
        return next((i for i, (t, _) in enumerate(self._items) if t == text), -1)

    def setCurrentIndex(self, i):
        self.currentIndex = i
        self.emit("currentIndexChanged(int)", i)

    @property
    def currentText(self):
        if self._items:
            return self._items[self.currentIndex][0]
        return self.text

    # node selectors / place widget
    def currentNode(self):
        return self._node

    def lists(self, node) -> bool:
        """Whether a qMRMLNodeComboBox shows ``node``: its class is one of ``nodeTypes`` (or a
        subclass of one when ``showChildNodeTypes``), as qMRMLNodeComboBox's scene model filters."""
        if self.cls != "qMRMLNodeComboBox":
            return True
        if self.showChildNodeTypes:
            return any(node.IsA(t) for t in self.nodeTypes)
        return node.GetClassName() in self.nodeTypes

    def listedNodes(self) -> list:
        """The nodes of the scene this selector offers, in scene order."""
        if self.scene is None:
            return []
        nodes = [self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes())]
        return [n for n in nodes if self.lists(n)]

    def setCurrentNode(self, node):
        # qMRMLNodeComboBox::setCurrentNode: a node the selector does not list selects nothing.
        if node is not None and not self.lists(node):
            node = None
        if node is self._node:
            return
        self._node = node
        self.emit("currentNodeChanged(vtkMRMLNode*)", node)

    @property
    def currentNodeID(self):
        return self._node.GetID() if self._node is not None else ""

    def setMRMLScene(self, scene):
        self.scene = scene

    def placeButton(self):
        return FakeWidget("placeButton", "QToolButton")

    def show(self):
        self.visible = True

    # text views
    def setPlainText(self, text):
        self._plain = text

    def toPlainText(self):
        return self._plain


class FakeUI(types.SimpleNamespace):
    def __getattr__(self, name):  # a widget missing from the .ui is a test failure
        raise AttributeError(f"the .ui file has no widget named {name!r}")


def node_types_of(annotation) -> tuple[str, ...]:
    """Class names of a node annotation: ``Node`` or ``Union[NodeA, NodeB, None]`` (Slicer's
    ``parameterNodeWrapper.util.getNodeTypes``); ``()`` for anything else."""
    import slicer as real_slicer

    args = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Union else (annotation,)
    return tuple(a().GetClassName() for a in args
                 if isinstance(a, type) and issubclass(a, real_slicer.vtkMRMLNode))


def load_ui_widgets(path: str) -> FakeUI:
    root = ET.parse(path).getroot()
    widgets = {}
    for w in root.iter("widget"):
        props = {}
        for p in w.findall("property"):
            name = p.get("name")
            child = list(p)[0] if list(p) else None
            if child is None:
                continue
            if child.tag == "string" and name in ("text", "toolTip", "SlicerParameterName"):
                props[name] = child.text or ""
            elif child.tag == "bool" and name in ("checked", "enabled", "showChildNodeTypes",
                                                   "noneEnabled"):
                props[name] = child.text == "true"
            elif child.tag == "stringlist" and name == "nodeTypes":
                props[name] = tuple(s.text for s in child.findall("string"))
        factory = FakeWidget
        if w.get("class") == "qMRMLSegmentSelectorWidget":
            from slicer_stub_segments import FakeSegmentSelectorWidget as factory
        widgets[w.get("name")] = factory(w.get("name"), w.get("class"), props)
    return FakeUI(**widgets)


class _Recorder:
    """Keeps what the stubs were asked to do (error dialogs, app signals...)."""

    def __init__(self):
        self.errors: list[str] = []
        self.app_slots: dict[str, list] = {}
        self.clipboard = ""
        self.settings: dict[str, object] = {}
        self.dialog_dir = ""
        self.dialog_file = ""
        self.timers: list = []
        self.displayed: list[str] = []
        self.selected: list[str] = []


def install(recorder: _Recorder | None = None, module_dir: str | os.PathLike | None = None) -> _Recorder:
    """Put stub slicer/qt/ctk into sys.modules (real slicer-core MRML classes inside) and the
    module's folder (default: the checkout's ``MedMVLSlicer/``) first on ``sys.path``."""
    rec = recorder or _Recorder()
    module_dir = Path(module_dir) if module_dir is not None else MODULE_DIR
    import slicer as real_slicer  # slicer-core: MRML classes, headless
    import vtk  # slicer-core's VTK stays the real one

    scene = real_slicer.vtkMRMLScene()

    # ---- qt
    qt = types.ModuleType("qt")

    class QTimer:
        def __init__(self):
            self.interval, self.active, self.slots = 0, False, []
            rec.timers.append(self)

        def setInterval(self, ms):
            self.interval = ms

        def connect(self, signal, slot):
            assert signal == "timeout()"
            self.slots.append(slot)

        def start(self):
            self.active = True

        def stop(self):
            self.active = False

        def fire(self):
            for s in self.slots:
                s()

    class QSettings:
        def value(self, key, default=None):
            return rec.settings.get(key, default)

        def setValue(self, key, value):
            rec.settings[key] = value

    class _Clipboard:
        def setText(self, text):
            rec.clipboard = text

    class QApplication:
        @staticmethod
        def clipboard():
            return _Clipboard()

    class QFileDialog:
        @staticmethod
        def getExistingDirectory(*args):
            return rec.dialog_dir

        @staticmethod
        def getSaveFileName(*args):
            return rec.dialog_file

    qt.QTimer, qt.QSettings, qt.QApplication, qt.QFileDialog = QTimer, QSettings, QApplication, QFileDialog
    ctk = types.ModuleType("ctk")

    # ---- slicer
    sl = types.ModuleType("slicer")
    sl.__path__ = []  # a package, for "from slicer.x import y"
    for name in dir(real_slicer):  # MRML and segmentation classes, as Slicer's own module has them
        if name.startswith(("vtkMRML", "vtkSegment", "vtkOrientedImageData")):
            setattr(sl, name, getattr(real_slicer, name))
    sl.mrmlScene = scene

    class _App:
        def connect(self, signal, slot):
            rec.app_slots.setdefault(signal, []).append(slot)

        def disconnect(self, signal, slot):
            # PythonQt's disconnect removes the connection whose callable compares equal.
            slots = rec.app_slots.get(signal, [])
            if slot in slots:
                slots.remove(slot)

        def processEvents(self):
            # Real Qt events (the Qt transport's replies and timers), when an application exists.
            from qtpy import QtCore

            if QtCore.QCoreApplication.instance() is not None:
                QtCore.QCoreApplication.processEvents()

    sl.app = _App()

    # slicer.ScriptedLoadableModule
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class _Layout:
        def __init__(self):
            self.widgets = []

        def addWidget(self, w):
            self.widgets.append(w)

        def addStretch(self, n=0):
            pass

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent or types.SimpleNamespace(isEntered=True)
            self.moduleName = type(self).__name__[: -len("Widget")]

        def setup(self):
            self.layout = _Layout()

        def resourcePath(self, rel):
            return str(module_dir / "Resources" / rel)

    class _ParameterNode:
        def __init__(self):
            self.params = {}

    class ScriptedLoadableModuleLogic:
        _param = None

        def __init__(self):
            pass

        def getParameterNode(self):
            if ScriptedLoadableModuleLogic._param is None:
                ScriptedLoadableModuleLogic._param = _ParameterNode()
            return ScriptedLoadableModuleLogic._param

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=0):
            rec.displayed.append(message)

    slm.ScriptedLoadableModule = ScriptedLoadableModule
    slm.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    slm.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest

    # slicer.util
    util = types.ModuleType("slicer.util")

    class VTKObservationMixin:
        def __init__(self):
            self.observations = []

        def addObserver(self, obj, event, method):
            self.observations.append((obj, event, method))

        def removeObserver(self, obj, event, method):
            self.observations = [o for o in self.observations if o != (obj, event, method)]

        def removeObservers(self, method=None):
            self.observations = []

    def errorDisplay(text, detailedText=None, **kw):
        rec.errors.append(text + ("\n" + detailedText if detailedText else ""))

    @contextlib.contextmanager
    def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
        # Same contract as Slicer's: exceptions become an error dialog, not a crash.
        try:
            yield
        except Exception as exc:
            if show:
                errorDisplay(message or "Error", detailedText=str(exc))

    class _UIRoot:
        def __init__(self, path):
            self.path = path
            self.ui = load_ui_widgets(path)

        def setMRMLScene(self, s):
            # Qt Designer forms connect mrmlSceneChanged to every MRML widget: all get the scene.
            self.scene = s
            for w in vars(self.ui).values():
                w.setMRMLScene(s)

    util.VTKObservationMixin = VTKObservationMixin
    util.errorDisplay = errorDisplay
    util.tryWithErrorDisplay = tryWithErrorDisplay
    util.loadUI = lambda path: _UIRoot(path)
    util.childWidgetVariables = lambda root: root.ui
    util.startupEnvironment = lambda: {"PATH": os.environ.get("PATH", ""), "HOME": "/tmp"}
    def addVolumeFromArray(array, ijkToRAS=None, name=None, nodeClassName=None):
        import numpy as np
        from vtk.util import numpy_support

        node = scene.AddNewNodeByClass(nodeClassName or "vtkMRMLScalarVolumeNode", name or "")
        a = np.ascontiguousarray(array)
        img = vtk.vtkImageData()
        img.SetDimensions(a.shape[2], a.shape[1], a.shape[0])
        img.GetPointData().SetScalars(numpy_support.numpy_to_vtk(a.reshape(-1), deep=True))
        node.SetAndObserveImageData(img)
        return node

    util.addVolumeFromArray = addVolumeFromArray
    util.arrayFromVolume = real_slicer.util.arrayFromVolume
    util.arrayFromVolumeModified = real_slicer.util.arrayFromVolumeModified

    def loadVolume(path, properties=None):
        # Slicer reads with ITK and stores IJK->RAS; here SimpleITK (LPS) -> RAS by hand.
        import numpy as np
        import SimpleITK as sitk

        image = sitk.ReadImage(str(path))
        name = Path(path).name.split(".")[0]
        node = addVolumeFromArray(sitk.GetArrayFromImage(image), name=name)
        ijk_to_lps = np.eye(4)
        ijk_to_lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
        ijk_to_lps[:3, 3] = image.GetOrigin()
        ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps
        m = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                m.SetElement(r, c, float(ijk_to_ras[r, c]))
        node.SetIJKToRASMatrix(m)
        return node

    def getNodesByClass(cls):
        return [scene.GetNthNodeByClass(i, cls) for i in range(scene.GetNumberOfNodesByClass(cls))]

    def saveScene(path, properties=None):
        # The stub writes the MRML XML only (no .mrb bundle, no bulk data): node names survive.
        scene.SetURL(str(path))
        return bool(scene.Commit())

    def loadScene(path, properties=None):
        scene.Clear(0)
        scene.SetURL(str(path))
        scene.Import()
        return True

    util.loadVolume, util.getNodesByClass = loadVolume, getNodesByClass
    util.saveScene, util.loadScene = saveScene, loadScene
    util.selectModule = lambda name: rec.selected.append(name)
    util.showStatusMessage = lambda text, msec=0: rec.displayed.append(text)
    util.exit = lambda code=0: None

    class _ModuleRepresentation:
        """``slicer.modules.medmvlslicer``: its widget is made (and set up) on first use."""

        widget = None

        def widgetRepresentation(self):
            return self

        def self(self):
            if _ModuleRepresentation.widget is None:
                import MedMVLSlicer

                _ModuleRepresentation.widget = MedMVLSlicer.MedMVLSlicerWidget()
                _ModuleRepresentation.widget.setup()
            return _ModuleRepresentation.widget

    sl.modules = types.SimpleNamespace(medmvlslicer=_ModuleRepresentation())

    # slicer.i18n
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text

    # slicer.parameterNodeWrapper
    pnw = types.ModuleType("slicer.parameterNodeWrapper")

    def parameterNodeWrapper(cls):
        annotations = dict(getattr(cls, "__annotations__", {}))
        names = list(annotations)

        class Wrapped:
            def __init__(self, node):
                object.__setattr__(self, "_node", node)
                for n in names:
                    node.params.setdefault(n, getattr(cls, n, None))
                node.params.setdefault("_gui", {})

            def __getattr__(self, name):
                if name in names:
                    return self._node.params[name]
                raise AttributeError(name)

            def __setattr__(self, name, value):
                if name not in names:
                    raise AttributeError(f"{cls.__name__} has no parameter {name!r}")
                types_ = node_types_of(annotations[name])
                if value is not None and types_ and not any(value.IsA(t) for t in types_):
                    # Slicer's IsInstance validator
                    raise ValueError(f"{name}: {value.GetClassName()} is not one of {types_}")
                self._node.params[name] = value
                for widget in self._node.params["_gui"].get(name, []):  # parameter -> GUI
                    widget.setCurrentNode(value)

            def connectGui(self, ui):
                # Slicer's qMRMLNodeComboBoxToNodeConnector: nodeTypes come from the annotation,
                # the widget shows the parameter, and the parameter follows the widget.
                bound: dict[str, list] = {}
                for widget in vars(ui).values():
                    name = getattr(widget, "SlicerParameterName", "")
                    if not name:
                        continue
                    if name not in names:
                        raise ValueError(f"the .ui binds {name!r}, which {cls.__name__} lacks")
                    if widget.cls == "qMRMLNodeComboBox":
                        widget.nodeTypes = node_types_of(annotations[name])
                        widget.setCurrentNode(self._node.params[name])

                        def changed(node, _name=name):
                            self._node.params[_name] = node

                        widget.connect("currentNodeChanged(vtkMRMLNode*)", changed)
                        widget._param_slot = changed
                    bound.setdefault(name, []).append(widget)
                self._node.params["_gui"] = bound
                return "tag"

            def disconnectGui(self, tag):
                for widgets in self._node.params["_gui"].values():
                    for w in widgets:
                        slots = w._slots.get("currentNodeChanged(vtkMRMLNode*)", [])
                        if getattr(w, "_param_slot", None) in slots:
                            slots.remove(w._param_slot)
                self._node.params["_gui"] = {}

        Wrapped.__name__ = cls.__name__
        Wrapped.annotations = annotations
        return Wrapped

    pnw.parameterNodeWrapper = parameterNodeWrapper

    sl.ScriptedLoadableModule, sl.util, sl.i18n, sl.parameterNodeWrapper = slm, util, i18n, pnw
    sys.modules.update({
        "qt": qt, "ctk": ctk, "slicer": sl, "slicer.ScriptedLoadableModule": slm,
        "slicer.util": util, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": pnw,
    })
    if str(module_dir) not in sys.path:
        sys.path.insert(0, str(module_dir))
    return rec


STUB_NAMES = ("qt", "ctk", "slicer", "slicer.ScriptedLoadableModule", "slicer.util", "slicer.i18n",
              "slicer.parameterNodeWrapper", "MedMVLSlicer")


class FakeWorkerClient:
    """A scripted stand-in for WorkerClient (same method signatures) for controller tests."""

    instances: list = []

    def __init__(self, url="http://fake", token="", timeout=30.0, *, tokens=("The ", "lungs ", "are ", "clear."),
                 boxes=None, api=1, slow=0.0, missing_session_once=False, fail_delete=False):
        import threading

        self.url, self.token = url, token
        self.tokens, self.boxes, self.api, self.slow = list(tokens), boxes, api, slow
        self.missing_session_once = missing_session_once
        self.uploads, self.sessions, self.asked, self.cancelled = [], [], [], []
        self.deleted, self.fail_delete = [], fail_delete
        self._cancel = threading.Event()
        FakeWorkerClient.instances.append(self)

    def health(self):
        return {"status": "ready", "model": "fake-model", "device": "cpu",
                "memory": {"gpu_allocated_mb": 0}, "version": "0.1.0", "api": self.api}

    def wait_ready(self, timeout=120.0):
        return self.health()

    def upload_volume(self, array, spacing, origin, direction, modality="CT"):
        self.uploads.append({"shape": tuple(array.shape), "spacing": tuple(spacing),
                             "origin": tuple(origin), "direction": [list(r) for r in direction],
                             "modality": modality})
        return f"vol{len(self.uploads)}"

    def create_session(self, volume_id):
        self.sessions.append(volume_id)
        return f"sess{len(self.sessions)}"

    def ask(self, session_id, task="ask", question=None, box=None, on_token=None, **kw):
        import time

        from medmvl_core.client import errors
        from medmvl_core.client.client import Answer

        self.asked.append({"session": session_id, "task": task, "question": question, "box": box,
                           "generation": kw.get("generation")})
        if self.missing_session_once:
            self.missing_session_once = False
            raise errors.NotFoundError("unknown session", code="unknown_session", status=404)
        text = ""
        for t in self.tokens:
            if self._cancel.is_set():
                self._cancel.clear()
                raise errors.CancelledError("the answer was cancelled", status=499)
            time.sleep(self.slow)
            text += t
            if on_token:
                on_token(t)
        return Answer(text=text, boxes=list(self.boxes or []), timings={"generate_s": 0.01},
                      num_tokens=len(self.tokens), task=task, question=question or "")

    def delete_session(self, session_id):
        from medmvl_core.client import errors as client_errors

        if self.fail_delete:
            raise client_errors.NotFoundError(f"no session {session_id}")
        self.deleted.append(session_id)

    def cancel(self, session_id):
        self.cancelled.append(session_id)
        self._cancel.set()
        return True
