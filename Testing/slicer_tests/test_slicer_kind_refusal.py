"""The Slicer panel (stub slicer/qt/ctk, real MRML from slicer-core) disables its task button for a
volume the model cannot take and says why in the tooltip, from the checkpoint's config.json alone:
no worker is started and no voxels are read."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

slicer_core = pytest.importorskip("slicer", reason="slicer-core is installed by `make test`")
if not hasattr(slicer_core, "vtkMRMLScene"):
    pytest.skip("the installed `slicer` is not slicer-core", allow_module_level=True)

import vtk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import slicer_stubs as stubs  # noqa: E402
from test_slicer_module import _widget, env  # noqa: E402,F401  (the stub environment fixture)

from medmvl_core.client import controller as ctl  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _volume(scene, name, dims):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    img = vtk.vtkImageData()
    img.SetDimensions(*dims)                                   # (i, j, k)
    img.AllocateScalars(vtk.VTK_SHORT, 1)
    node.SetAndObserveImageData(img)
    return node


def test_task_button_explains_why_it_is_disabled(env, monkeypatch):  # noqa: F811
    mod, _rec = env
    started = []
    monkeypatch.setattr(ctl.PanelController, "start_local", lambda *a, **k: started.append(a))
    w = _widget(mod)
    scene = stubs.sys.modules["slicer"].mrmlScene
    radiograph = _volume(scene, "chest", (64, 48, 1))
    ct = _volume(scene, "ct", (32, 32, 20))
    w.ui.checkpointPathLineEdit.currentPath = str(REPO / "Resources" / "demo_model")   # CT only
    w.ui.inputSelector.setCurrentNode(radiograph)
    assert w.ui.askButton.enabled is False
    assert "takes 3D volumes (CT) only" in w.ui.askButton.toolTip and "2D image" in w.ui.askButton.toolTip
    w.ui.inputSelector.setCurrentNode(ct)
    assert "only" not in w.ui.askButton.toolTip
    # a worker that is running and ready: the button follows the volume
    w.logic.controller.state, w.logic.controller.client = ctl.READY, object()
    w.logic.controller.model_kinds = ctl.read_model_kinds(REPO / "Resources" / "demo_model")
    w.updateTaskWidgets()
    assert w.ui.askButton.enabled is True
    w.ui.inputSelector.setCurrentNode(radiograph)
    assert w.ui.askButton.enabled is False and "3D volumes" in w.ui.askButton.toolTip
    w.on_state(ctl.READY, "")
    assert w.ui.askButton.enabled is False
    assert started == []                                                               # nothing was started
