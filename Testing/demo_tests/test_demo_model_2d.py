"""The shipped radiograph demo checkpoint (Resources/demo_model_2d): format, size, kinds, and answers
on unseen radiograph phantoms; ``medmvl ask`` on a real DICOM CR, a PNG and JPEGs through a worker.

Its benchmark figures (docs/radiographs-2d.md) are measured with ``medmvl infer`` + ``medmvl eval
--benchmark phantoms`` on 200 test radiographs; this test checks what must hold on any machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "Resources" / "demo_model_2d"


def _image(ph):
    from medmvl_core.imaging import Volume

    return Volume(array=ph.array[None], spacing=(*ph.spacing, 1.0), modality="XR", source="phantom")


def _generate(model, proc, img, questions, n):
    import torch

    batch = proc.collate([proc([{"from": "human", "value": "<image>\n" + q}], image=img, mode="generate")
                          for q in questions], padding_side="left")
    with torch.no_grad():
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             images=batch["images"], max_new_tokens=n, do_sample=False,
                             pad_token_id=proc.tokenizer.pad_token_id, eos_token_id=proc.tokenizer.eos_token_id)
    return model.resolve_box_refs(proc.batch_decode(out), batch["images"])


def test_checkpoint_is_small_self_contained_and_2d_only():
    from medmvl_core.client.model_kinds import read_model_kinds

    assert (DEMO / "config.json").is_file(), "Resources/demo_model_2d is missing; see docs/radiographs-2d.md"
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size <= 20 * 2**20, size
    assert not list(DEMO.glob("*.bin")) and not list(DEMO.glob("*.pt")) and not list(DEMO.glob("*.pkl"))
    cfg = json.loads((DEMO / "config.json").read_text())
    assert cfg["model_type"] == "medmvl" and cfg["encoder_image"]["type"] == "convvit3d"
    assert set(cfg["preprocessing"]) == {"image"} and cfg["box_refs"]
    assert read_model_kinds(DEMO).kinds == ("image",)


def test_answers_unseen_radiographs_in_format_and_reads_the_image():
    """Every task in the trained format, and yes/no answers that depend on the radiograph: balanced
    accuracy over every (kind, side) question on 20 unseen phantoms (an image-blind model gets 0.5)."""
    from medmvl_core.data.phantom_tasks import _CLOSED_SPACE, _closed_question, _side_region, parse_yes_no
    from medmvl_core.data.phantoms import make_xray_phantom
    from medmvl_core.evaluation.phantom_metrics import parse_box
    from medmvl_core.model import load_checkpoint

    model, proc = load_checkpoint(DEMO)
    hits = {True: [], False: []}
    for index in range(20):
        ph = make_xray_phantom(0, "test", 100 + index)
        img = _image(ph)
        present = {(f.kind, _side_region(f)) for f in ph.findings}
        answers = _generate(model, proc, img, [_closed_question(k, r) for k, r in _CLOSED_SPACE], 3)
        for (k, r), text in zip(_CLOSED_SPACE, answers):
            truth = (k, r) in present
            hits[truth].append(parse_yes_no(text) == truth)
        if index < 3:
            report, box = _generate(model, proc, img, ["Generate radiology report for the chest X-ray.",
                                                       "Where is the mass in this image? Please output the "
                                                       "bounding box."], 112)
            assert "Findings:" in report and "Impression:" in report, report
            b = parse_box(box, 2)
            assert b is not None and all(0 <= v <= 100 for v in b) and b[0] <= b[2], box
    balanced = 0.5 * (np.mean(hits[True]) + np.mean(hits[False]))
    print(f"balanced yes/no accuracy {balanced:.3f} ({len(hits[True])} yes truths)")
    # measured 0.779 for the shipped model (its yes/no accuracy is 77.8% on the test split); 0.5 = image-blind
    assert len(hits[True]) >= 15 and balanced >= 0.70, balanced


def test_finds_findings_on_unseen_radiographs():
    from medmvl_core.data.phantom_dataset import format_box_2d, model_box_fn
    from medmvl_core.data.phantom_tasks import make_tasks
    from medmvl_core.data.phantoms import make_xray_phantom
    from medmvl_core.evaluation.phantom_metrics import box_iou, parse_box
    from medmvl_core.model import load_checkpoint

    model, proc = load_checkpoint(DEMO)
    ious = []
    for index in range(30):
        ph = make_xray_phantom(0, "test", 100 + index)
        finds = [t for t in make_tasks(ph, np.random.default_rng(index), model_box_fn(ph), format_box_2d)
                 if t["task"] == "find"]
        if finds:
            text = _generate(model, proc, _image(ph), [finds[0]["question"]], 16)[0]
            box = parse_box(text, 2)
            ious.append(box_iou(box, finds[0]["truth"]["box"]) if box else 0.0)
    print(f"find mean IoU {np.mean(ious):.3f} over {len(ious)} findings")
    assert len(ious) >= 15 and np.mean(ious) >= 0.35, np.mean(ious)


def _radiograph_file(source: str, folder: Path):
    """(path, [H, W], truth box of its one finding or None) for ``medmvl ask``: pydicom-data's real
    DICOM CR (RG3_UNCR.dcm, MONOCHROME1, 1760 x 1760), or unseen test phantom 3 (one cyst) as the
    generator writes it (PNG) and converted to an 8-bit JPEG by Pillow (default quality 75), grey
    or 3-channel."""
    if source == "dicom_cr":
        from pydicom.data import get_testdata_file

        try:
            path = get_testdata_file("RG3_UNCR.dcm")
        except Exception:  # noqa: BLE001
            path = None
        if not path:
            pytest.skip("pydicom-data's RG3_UNCR.dcm is not available")
        return Path(path), (1760, 1760), None
    from PIL import Image

    from medmvl_core.data.phantoms import make_xray_phantom, write_phantom

    ph = make_xray_phantom(0, "test", 3)
    assert [f.kind for f in ph.findings] == ["cyst"]
    path = folder / write_phantom(ph, folder)
    if source != "png":
        jpg = path.with_suffix(".jpg")
        Image.open(path).convert("RGB" if source == "jpeg_rgb" else "L").save(jpg)
        path = jpg
    return path, ph.array.shape, ph.findings[0].box


def _ask(capsys, path: Path, *args: str) -> dict:
    """``medmvl ask --json`` with the 2D demo (a worker process started for it); its JSON answer."""
    from medmvl_core.cli import main

    rc = main(["ask", "--checkpoint", str(DEMO), "--image", str(path), "--device", "cpu", "--json", *args])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["model"] == "demo_model_2d", out
    return out


@pytest.mark.parametrize("source", ["dicom_cr", "png", "jpeg", "jpeg_rgb"])
def test_medmvl_ask_finds_on_radiograph_files(source, tmp_path, capsys):
    """``medmvl ask --task find`` through a real worker on the 2D demo: the found box comes back as a
    pixel box inside the image; on the phantom files, one box on the cyst (no truth for the CR)."""
    from medmvl_core.evaluation.phantom_metrics import box_iou

    path, shape, truth = _radiograph_file(source, tmp_path)
    out = _ask(capsys, path, "--task", "find", "--question", "mass" if truth is None else "cyst",
               "--max-new-tokens", "16")
    assert out["task"] == "find"
    for b in out["boxes"]:
        j1, i1, j2, i2 = b["voxel"]
        assert 0 <= j1 < j2 <= shape[0] and 0 <= i1 < i2 <= shape[1]
    if truth is not None:
        assert len(out["boxes"]) == 1, out
        # measured 0.48 on the PNG and on both JPEGs (JPEG loss does not move the box)
        assert box_iou(out["boxes"][0]["voxel"], truth) >= 0.3, (out["boxes"], truth)


def test_medmvl_ask_reports_on_a_jpeg(tmp_path, capsys):
    """``medmvl ask --task report`` on a 3-channel JPEG radiograph: a report in the trained format."""
    path, _shape, _truth = _radiograph_file("jpeg_rgb", tmp_path)
    out = _ask(capsys, path, "--task", "report", "--max-new-tokens", "112")
    assert out["task"] == "report" and out["finish_reason"] == "stop" and out["boxes"] == []
    assert "Findings:" in out["text"] and "Impression:" in out["text"], out["text"]


def test_medmvl_demo_runs_the_radiograph_model(capsys):
    """``medmvl demo --kind xray``: a worker on the 2D demo answers every task about an unseen
    radiograph phantom, describe included (its region box goes to the worker as a 2D pixel box)."""
    from medmvl_core.cli import main

    assert main(["demo", "--kind", "xray", "--n", "1", "--start", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "xr-test-00002" in out and "radiograph phantoms" in out and "model demo_model_2d" in out
    assert "DESCRIBE" in out and "FIND" in out and "Summary over 1 unseen phantoms" in out
