"""Input kinds read from a checkpoint's config.json (no model load), and the refusal of the wrong
kind before anything starts: ``medmvl ask``, the panel controller and the viewer."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from medmvl_core.client import controller as ctl
from medmvl_core.client import launcher as launcher_mod
from medmvl_core.client.model_kinds import (ModelKinds, WrongInputKindError, check_input_kind, input_kind,
                                            kind_problem, kinds_from_config, read_model_kinds)

REPO = Path(__file__).resolve().parents[2]
CT_DEMO = REPO / "Resources" / "demo_model"
FIXTURES = Path(os.environ.get("MEDMVL_FIXTURES", REPO.parent / "shared" / "fixtures" / "medmvl_reference"))
if not FIXTURES.is_dir():
    FIXTURES = Path("/work/shared/fixtures/medmvl_reference")


def _ckpt(folder: Path, cfg: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


CT_CFG = {"model_type": "medmvl", "encoder_image3d": {"type": "convvit3d"}, "encoder_image": None,
          "preprocessing": {"image3d": {"kind": "volume"}}}
XR_CFG = {"model_type": "medmvl", "encoder_image": {"type": "convvit3d"}, "encoder_image3d": None,
          "preprocessing": {"image": {"kind": "image"}}}


def test_kinds_from_configs():
    assert read_model_kinds(CT_DEMO).kinds == ("image3d",)
    assert kinds_from_config(CT_CFG) == ("image3d",)
    assert kinds_from_config(XR_CFG) == ("image",)   # the 2D convvit3d has no slice-by-slice CT path
    # a SigLIP model (MedM-VL-2D layout) also reads a CT slice by slice, as the engine does
    siglip = {"encoder_image": {"type": "siglip"}, "preprocessing": {"image": {}, "image3d": {}}}
    assert kinds_from_config(siglip) == ("image", "image3d")
    # MedM-VL's own config schema (HEAD: lvlm_ prefix), without a preprocessing block
    assert kinds_from_config({"lvlm_encoder_image3d_type": "m3dclip"}) == ("image3d",)
    assert kinds_from_config({"encoder_image_type": "siglip", "encoder_image3d_type": None}) == ("image", "image3d")


def test_kinds_agree_with_the_engine_on_reference_checkpoints():
    """The torch-free reading equals what the loaded model reports (engine.supported_kinds)."""
    torch = pytest.importorskip("torch")  # noqa: F841
    from medmvl_core.engine.engine import supported_kinds
    from medmvl_core.model.loader import load_checkpoint

    folders = [CT_DEMO] + [p for p in (FIXTURES / "2d_tiny", FIXTURES / "ct_chest_tiny") if p.is_dir()]
    for folder in folders:
        model = load_checkpoint(folder)[0]
        assert read_model_kinds(folder).kinds == supported_kinds(model), folder


def test_input_kind_rules():
    assert input_kind((128, 128)) == "image"
    assert input_kind((1, 128, 128)) == "image"
    assert input_kind((1, 64, 64, 3)) == "image"
    assert input_kind((64, 96, 96)) == "image3d"


def test_message_names_the_model_kind_and_the_model_that_fits(tmp_path):
    ct = _ckpt(tmp_path / "demo_model", CT_CFG)
    msg = kind_problem(read_model_kinds(ct), (1, 128, 128))
    assert "2D image" in msg and "takes 3D volumes (CT) only" in msg
    assert "MedM-VL-2D-3B-en" in msg and "demo_model_2d" not in msg  # no 2D demo beside it yet
    xr = _ckpt(tmp_path / "demo_model_2d", XR_CFG)
    msg = kind_problem(read_model_kinds(ct), (1, 128, 128))
    assert str(xr) in msg                                              # the sibling demo that fits
    msg = kind_problem(read_model_kinds(xr), (40, 64, 64))
    assert "3D volume of 40 slices" in msg and "takes 2D images" in msg and str(ct) in msg
    assert kind_problem(read_model_kinds(xr), (1, 128, 128)) is None


def test_missing_or_bad_config_is_a_clear_error(tmp_path):
    from medmvl_core.client.errors import LaunchError

    with pytest.raises(LaunchError, match="config.json missing"):
        read_model_kinds(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LaunchError, match="cannot read"):
        check_input_kind(tmp_path, (1, 8, 8))


@pytest.fixture
def no_processes(monkeypatch):
    """Fail the test if anything tries to start a process (a worker)."""
    started = []

    def refuse(*a, **k):
        started.append(a)
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(launcher_mod.subprocess, "Popen", refuse)
    return started


def test_ask_refuses_a_radiograph_for_the_ct_model_without_starting_a_worker(tmp_path, no_processes, capsys):
    from PIL import Image

    from medmvl_core.cli import main

    png = tmp_path / "chest.png"
    Image.fromarray(np.full((64, 64), 90, np.uint8), mode="L").save(png)
    rc = main(["ask", "--checkpoint", str(CT_DEMO), "--image", str(png), "--question", "Is there a nodule?"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "takes 3D volumes (CT) only" in err and "2D image" in err
    assert no_processes == []                                          # no worker process was started


class _FakeClient:
    def __init__(self):
        self.calls = []

    def upload_volume(self, *a, **k):
        self.calls.append("upload")
        return "v"

    def create_session(self, *a):
        self.calls.append("session")
        return "s"


def test_controller_refuses_before_uploading(tmp_path):
    c = ctl.PanelController()
    xr = _ckpt(tmp_path / "demo_model_2d", XR_CFG)
    vol = ctl.VolumeData("ct", np.zeros((20, 16, 16), np.float32), np.eye(4))
    # no worker yet: the checkpoint field's config decides
    assert "takes 2D images" in c.input_problem(vol, str(xr))
    assert c.input_problem(vol.array.shape, str(xr)) == c.input_problem(vol, str(xr))
    assert c.input_problem(ctl.VolumeData("xr", np.zeros((1, 16, 16)), np.eye(4)), str(xr)) is None
    # a running worker: its checkpoint's kinds (read when it was started), or its health's
    c.client, c.model_kinds = _FakeClient(), read_model_kinds(xr)
    with pytest.raises(WrongInputKindError, match="takes 2D images"):
        c.run_task(vol, "report")
    assert c.client.calls == [] and c.histories == {}
    c.model_kinds, c.health = None, {"kinds": ["image3d"], "model": "ct-model"}
    with pytest.raises(WrongInputKindError, match="ct-model takes 3D volumes"):
        c.run_task(ctl.VolumeData("xr", np.zeros((1, 16, 16)), np.eye(4)), "report")
    assert c.client.calls == []
    assert ModelKinds("m", ()).describe() == "no images"


def test_viewer_disables_ask_and_says_why(tmp_path):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    pytest.importorskip("qtpy.QtWidgets")
    from qtpy import QtWidgets

    from medmvl_core.viewer.window import ViewerWindow

    QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    w = ViewerWindow()
    try:
        w.checkpointEdit.setText(str(CT_DEMO))
        w.set_volume("chest.png", np.full((1, 32, 32), 80, np.uint8), (1.0, 1.0, 1.0), modality="XR")
        assert not w.askButton.isEnabled()
        assert "takes 3D volumes (CT) only" in w.askButton.toolTip()
        assert "Cannot ask" in w.statusLabel.text()
        w.set_volume("ct.nii", np.zeros((8, 32, 32), np.float32))
        assert "only" not in w.askButton.toolTip()
    finally:
        w.close()
