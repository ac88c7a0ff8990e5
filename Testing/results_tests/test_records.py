"""Conversation records, model identity and the Markdown export (torch-free client side)."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slicer_stubs import FakeWorkerClient  # noqa: E402

from medmvl_core.client import controller as ctl  # noqa: E402
from medmvl_core.client import records as rec  # noqa: E402
from medmvl_core.client.model_identity import (UNKNOWN_USE, ModelIdentity,  # noqa: E402
                                               read_model_identity)

DEMO = Path(__file__).resolve().parents[2] / "Resources" / "demo_model"


def _identity():
    return ModelIdentity(name="MedM-VL demo (phantoms)", content_hash="0123456789abcdef",
                         hash_scope="weights",
                         intended_use="trained on synthetic phantoms only, not for clinical use")


def _conversation():
    m = np.diag([-0.7, -0.7, 2.5, 1.0])  # RAS
    m[:3, 3] = (10.0, 20.0, -30.0)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ m
    vol = rec.VolumeRef(key="vtkMRMLScalarVolumeNode1", shape=[32, 64, 64], ijk_to_lps=lps.tolist(),
                        modality="CT", dicom={"series_uid": "1.2.3"})
    t1 = rec.Turn(task="find", question="nodule", answer="[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]",
                  model=_identity(), generation={"max_new_tokens": 48, "do_sample": False},
                  asked_at="2026-12-06T20:00:00Z", answered_at="2026-12-06T20:00:02Z",
                  boxes=[rec.BoxRecord(voxel=[10, 30, 22, 14, 38, 29], label="nodule",
                                       model=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6])])
    t2 = rec.Turn(task="describe", question="", answer="A cyst.", model=_identity(),
                  region=rec.BoxRecord(voxel=[0, 0, 0, 2, 3, 4], source="drawn"))
    return rec.Conversation(volume=vol, turns=[t1, t2])


# ---------------------------------------------------------------- records
def test_conversation_json_round_trip_keeps_everything():
    conv = _conversation()
    back = rec.Conversation.from_json(conv.to_json())
    assert back == conv
    d = json.loads(conv.to_json())
    assert d["format"] == "medmvl.conversation" and d["version"] == 1
    assert d["turns"][0]["model"]["intended_use"].startswith("trained on synthetic phantoms only")


@pytest.mark.parametrize("text, match", [
    ('{"format": "medmvl.conversation", "version": 7, "turns": []}', "newer MedM-VL"),
    ('{"format": "something.else", "version": 1}', "not a MedM-VL conversation"),
    ("{not json", "not valid JSON"),
    ('{"format": "medmvl.conversation", "version": 1, "turns": [{"task": "ask"}]}', "misses answer, model"),
])
def test_bad_records_say_what_is_wrong(text, match):
    with pytest.raises(rec.RecordFormatError, match=match):
        rec.Conversation.from_json(text)


def test_describe_box_reads_as_ranges_and_millimetres():
    b = rec.BoxRecord(voxel=[10, 30, 22, 14, 38, 29], label="nodule")
    # 4 slices x 2.5 mm, 8 rows x 0.7 mm, 7 columns x 0.7 mm
    assert rec.describe_box(b, (0.7, 0.7, 2.5), shown=True) == (
        "nodule: slices 10–13, rows 30–37, columns 22–28 (4.9 × 5.6 × 10.0 mm), shown in the views")
    assert rec.describe_box(rec.BoxRecord(voxel=[5, 6, 15, 26], source="drawn"), (0.5, 2.0)) == (
        "drawn region: rows 5–14, columns 6–25 (10.0 × 20.0 mm)")


def test_readable_answer_replaces_3d_and_2d_box_numbers_with_words():
    box3 = rec.BoxRecord(voxel=[10, 30, 22, 14, 38, 29], label="nodule")
    text = rec.readable_answer("[0.31, 0.47, 0.34, 0.44, 0.59, 0.45]", [box3], (0.7, 0.7, 2.5))
    assert text == "found 1 box\n  nodule: slices 10–13, rows 30–37, columns 22–28 (4.9 × 5.6 × 10.0 mm), shown in the views"
    # MedM-VL's 2D box format (x1, y1, x2, y2 on a 0-100 grid) on a radiograph of 2.6 mm pixels
    box2 = rec.BoxRecord(voxel=[102, 48, 114, 62], label="cyst")
    text = rec.readable_answer("The cyst is at {<38><80><48><89>}.", [box2], (2.6, 2.6))
    assert "<38>" not in text and text.startswith("The cyst is at")
    assert text.endswith("cyst: rows 102–113, columns 48–61 (36.4 × 31.2 mm), shown in the views")
    assert rec.readable_answer("{<38><80><48><89>}", [], (1.0, 1.0)) == "{<38><80><48><89>}"  # no box: as written


def test_box_corners_are_voxel_edges_in_lps():
    conv = _conversation()
    corners = rec.box_corners_lps([10, 30, 22, 14, 38, 29], np.asarray(conv.volume.ijk_to_lps))
    # LPS = diag(0.7, 0.7, 2.5) ijk + (-10, -20, -30); edges at index - 0.5 and end - 0.5.
    lo = np.array([0.7 * 21.5 - 10, 0.7 * 29.5 - 20, 2.5 * 9.5 - 30])
    hi = np.array([0.7 * 28.5 - 10, 0.7 * 37.5 - 20, 2.5 * 13.5 - 30])
    assert np.allclose(corners.min(0), lo) and np.allclose(corners.max(0), hi)
    assert len({tuple(c) for c in np.round(corners, 6)}) == 8


def test_markdown_names_model_use_and_ai_flag():
    md = _conversation().to_markdown()
    assert "AI-generated, not reviewed" in md.splitlines()[0]
    assert "MedM-VL demo (phantoms) (sha256 0123456789ab) — trained on synthetic phantoms only" in md
    assert "**Find**: nodule" in md and "nodule: slices 10–13" in md
    assert "Region: drawn region: slices 0–1, rows 0–2, columns 0–3" in md
    # the model's normalised numbers give way to the box in words; no empty time
    assert "2026-12-06T20:00:02Z): found 1 box" in md and "[0.1, 0.2" not in md
    assert "**Answer** (MedM-VL demo (phantoms)): A cyst." in md
    text = _conversation().to_text()
    assert "**" not in text and "AI-generated, not reviewed" in text


def test_found_boxes_deduplicates_and_names():
    boxes = [{"voxel": [1, 2, 3, 4, 5, 6], "model": [0.1] * 6}, {"voxel": [1.0, 2, 3, 4, 5, 6]},
             {"model": [0.2] * 6}, {"voxel": [0, 0, 0, 1, 1, 1]}]
    out = rec.found_boxes(boxes, "cyst")
    assert [b.voxel for b in out] == [[1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 1, 1]]
    assert out[0].label == "cyst" and out[0].model == [0.1] * 6


# ---------------------------------------------------------------- model identity
def test_demo_model_is_marked_synthetic_only():
    ident = read_model_identity(DEMO)
    assert "synthetic phantoms only, not for clinical use" in ident.intended_use
    assert ident.name == "MedM-VL demo (phantoms)" and ident.hash_scope == "weights"
    assert len(ident.content_hash) == 16 and "not for clinical use" in ident.label()


def test_content_hash_follows_weights_and_card_sources(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text('{"model_type": "medmvl"}')
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    blob = len(header).to_bytes(8, "little") + header
    (ck / "model.safetensors").write_bytes(blob + b"\0" * 8)
    full = read_model_identity(ck)
    assert full.intended_use == UNKNOWN_USE and full.name == "ck"
    (ck / "model.safetensors").write_bytes(blob + b"\1" + b"\0" * 7)  # one weight byte changed
    changed = read_model_identity(ck)
    assert changed.content_hash != full.content_hash
    # Large checkpoints: config + headers only, so equal headers give equal hashes.
    assert read_model_identity(ck, full_limit=0).content_hash == read_model_identity(
        ck, full_limit=0).content_hash
    assert read_model_identity(ck, full_limit=0).hash_scope == "config+headers"
    # A Hugging Face card: front matter wins over the section; the hub revision is read.
    (ck / "README.md").write_text("---\nmodel_name: Chest CT 3B\n---\n# Card\n\n## Intended use\n\n"
                                  "Research on chest CT.\nNot for diagnosis.\n\n## Training\n")
    meta = ck / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    sha = hashlib.sha1(b"x").hexdigest()
    (meta / "config.json.metadata").write_text(f"{sha}\netag\n")
    ident = read_model_identity(ck)
    assert ident.name == "Chest CT 3B" and ident.revision == sha
    assert ident.intended_use == "Research on chest CT. Not for diagnosis."
    (ck / "README.md").write_text("---\nintended_use: education only\n---\n")
    assert read_model_identity(ck).intended_use == "education only"


def test_identity_from_old_worker_health_says_use_is_unknown():
    ident = ModelIdentity.from_health({"model": "ckpt", "status": "ready"})
    assert ident.name == "ckpt" and ident.intended_use == UNKNOWN_USE
    info = _identity().to_dict()
    assert ModelIdentity.from_health({"model": "x", "model_info": info}) == _identity()


# ---------------------------------------------------------------- controller and worker
class CardClient(FakeWorkerClient):
    def health(self):
        return dict(super().health(), model_info=_identity().to_dict())


def test_controller_records_each_answer_with_model_and_settings():
    c = ctl.PanelController(client_factory=functools.partial(
        CardClient, boxes=[{"voxel": [1, 1, 1, 3, 3, 3], "model": [0.0] * 6}]))
    c.connect_remote("http://fake:1", "tok")
    c.wait(10)
    vol = ctl.VolumeData(key="v", array=np.zeros((4, 5, 6), np.int16),
                         ijk_to_ras=np.diag([-0.5, -0.5, 2.0, 1.0]), dicom={"series_uid": "9.8"})
    c.generation.max_new_tokens = 64
    c.run_task(vol, "find", "the cyst")
    c.wait(10)
    c.run_task(vol, "describe", box=(0, 0, 0, 2, 2, 2))
    c.wait(10)
    conv = c.conversations["v"]
    assert [t.task for t in conv.turns] == ["find", "describe"]
    t = conv.turns[0]
    assert t.model == _identity() and t.generation["max_new_tokens"] == 64
    assert t.answer == "The lungs are clear." and t.asked_at <= t.answered_at
    assert t.boxes[0].voxel == [1, 1, 1, 3, 3, 3] and t.boxes[0].label == "the cyst"
    assert conv.turns[1].region.voxel == [0, 0, 0, 2, 2, 2]
    assert np.allclose(conv.volume.ijk_to_lps, np.diag([0.5, 0.5, 2.0, 1.0]))
    assert conv.volume.dicom == {"series_uid": "9.8"} and conv.volume.shape == [4, 5, 6]
    # Restoring a stored conversation gives the panel the same history.
    c2 = ctl.PanelController()
    c2.restore("v", rec.Conversation.from_json(conv.to_json()))
    assert c2.transcript("v") == c.transcript("v")
    c.clear_history("v")
    assert "v" not in c.conversations


def test_worker_health_reports_model_info(tmp_path):
    from fastapi.testclient import TestClient

    from medmvl_core.worker.app import create_app
    from medmvl_core.worker.settings import WorkerSettings
    from medmvl_core.worker.state import WorkerState

    shutil.copy(DEMO / "config.json", tmp_path / "config.json")
    shutil.copy(DEMO / "model_card.json", tmp_path / "model_card.json")
    settings = WorkerSettings(token="t" * 20, model_name="demo",
                              model_info=read_model_identity(tmp_path).to_dict())
    client = TestClient(create_app(WorkerState(settings)))
    h = client.get("/v1/health", headers={"Authorization": "Bearer " + "t" * 20}).json()
    assert "not for clinical use" in h["model_info"]["intended_use"]
    assert ModelIdentity.from_health(h).name == "MedM-VL demo (phantoms)"


def test_records_and_exports_import_no_torch_or_highdicom():
    import subprocess

    code = ("import sys; import medmvl_core.client.records, medmvl_core.client.model_identity, "
            "medmvl_core.client.segments, medmvl_core.export.sr, medmvl_core.viewer.files; "
            "print([m for m in ('torch', 'transformers', 'highdicom') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
