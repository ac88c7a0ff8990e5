"""The shipped demo checkpoint (Resources/demo_model): format, size, and well-formed answers.

The benchmark numbers of this checkpoint (model card: Resources/demo_model/README.md) are measured with
``medmvl infer`` + ``medmvl eval --benchmark phantoms`` on 200 test phantoms; this test checks what
must hold for the demo to work on any machine: it loads offline, takes phantom CT volumes, and
answers every task in the trained format (parseable yes/no, a Findings/Impression report, a 3D box).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DEMO = Path(__file__).resolve().parents[2] / "Resources" / "demo_model"


def test_demo_checkpoint_is_small_and_self_contained():
    assert (DEMO / "config.json").is_file(), "Resources/demo_model is missing; see its model card, Resources/demo_model/README.md"
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size <= 20 * 2**20, size
    assert not list(DEMO.glob("*.bin")) and not list(DEMO.glob("*.pt")) and not list(DEMO.glob("*.pkl"))
    cfg = json.loads((DEMO / "config.json").read_text())
    assert cfg["model_type"] == "medmvl"
    spec = cfg["preprocessing"]["image3d"]
    assert spec["size"] == [32, 64, 64] and spec["crop_foreground"] is False


def test_demo_model_answers_unseen_phantoms_in_format():
    import torch

    from medmvl_core.data.phantom_dataset import format_box_3d, model_box_fn
    from medmvl_core.data.phantom_tasks import make_tasks, parse_yes_no
    from medmvl_core.data.phantoms import make_ct_phantom
    from medmvl_core.evaluation.phantom_metrics import parse_box
    from medmvl_core.imaging import Volume
    from medmvl_core.model import load_checkpoint

    model, proc = load_checkpoint(DEMO)

    def answer(vol, question, n):
        s = proc([{"from": "human", "value": "<image3d>\n" + question}], image3d=vol, mode="generate")
        with torch.no_grad():
            out = model.generate(input_ids=s["input_ids"][None], attention_mask=s["attention_mask"][None],
                                 images3d=s["images3d"], max_new_tokens=n, do_sample=False,
                                 pad_token_id=proc.tokenizer.pad_token_id, eos_token_id=proc.tokenizer.eos_token_id)
        return model.resolve_box_refs(proc.batch_decode(out), s["images3d"])[0]  # box references -> boxes

    for index in range(3):
        ph = make_ct_phantom(0, "test", 150 + index)
        vol = Volume(array=ph.array, spacing=ph.spacing, origin=ph.origin,
                     direction=np.asarray(ph.direction).reshape(3, 3), modality="CT", source="phantom")
        tasks = make_tasks(ph, np.random.default_rng(index), model_box_fn(ph, None), format_box_3d)
        by_task = {t["task"]: t for t in tasks}
        assert parse_yes_no(answer(vol, by_task["closed"]["question"], 4)) is not None
        report = answer(vol, by_task["report"]["question"], 96)
        assert "Findings:" in report and "Impression:" in report, report
        box = parse_box(answer(vol, "Where is the nodule in this image? Please output the bounding box.", 48), 3)
        assert box is not None and all(0.0 <= v <= 1.0 for v in box) and box[0] <= box[3], box


def _balanced_yes_no(after_report: bool) -> tuple[float, int]:
    """Balanced accuracy over every (kind, region) yes/no question on 20 unseen phantoms, asked as
    the first turn or as a follow-up after the model's own report (as in a worker session)."""
    import torch

    from medmvl_core.data.phantom_tasks import REPORT_QUESTION, _CLOSED_SPACE, _closed_question, _side_region, \
        parse_yes_no
    from medmvl_core.data.phantoms import make_ct_phantom
    from medmvl_core.imaging import Volume
    from medmvl_core.model import load_checkpoint

    model, proc = load_checkpoint(DEMO)

    def generate(convs, vol, n):
        batch = proc.collate([proc(c, image3d=vol, mode="generate") for c in convs], padding_side="left")
        with torch.no_grad():
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 images3d=batch["images3d"], max_new_tokens=n, do_sample=False,
                                 pad_token_id=proc.tokenizer.pad_token_id, eos_token_id=proc.tokenizer.eos_token_id)
        return proc.batch_decode(out)

    hits = {True: [], False: []}
    for index in range(20):
        ph = make_ct_phantom(0, "test", 100 + index)
        present = {(f.kind, _side_region(f)) for f in ph.findings}
        vol = Volume(array=ph.array, spacing=ph.spacing, origin=ph.origin,
                     direction=np.asarray(ph.direction).reshape(3, 3), modality="CT", source="phantom")
        first = {"from": "human", "value": "<image3d>\n" + REPORT_QUESTION["CT"]}
        history = [first, {"from": "gpt", "value": generate([[first]], vol, 96)[0].strip()}] if after_report else []
        convs = [history + [{"from": "human", "value": ("" if history else "<image3d>\n") + _closed_question(k, r)}]
                 for k, r in _CLOSED_SPACE]
        for (k, r), text in zip(_CLOSED_SPACE, generate(convs, vol, 3)):
            truth = (k, r) in present
            hits[truth].append(parse_yes_no(text) == truth)
    return 0.5 * (np.mean(hits[True]) + np.mean(hits[False])), len(hits[True])


def test_demo_model_reads_the_image():
    """Yes/no answers depend on the phantom: balanced accuracy over every (kind, region) question.

    A model that ignores the image gives the same answer to a question whatever the phantom, so its
    balanced accuracy (mean of the hit rates on "yes" and on "no" truths) is 0.5 however skewed the
    priors; the shipped model must be far above that on phantoms it never saw.
    """
    balanced, n_yes = _balanced_yes_no(after_report=False)
    print(f"balanced yes/no accuracy {balanced:.3f} ({n_yes} yes truths)")
    assert n_yes >= 15
    assert balanced >= 0.80, balanced  # measured 0.940 (model card); an image-blind model gets 0.5


def test_demo_model_answers_follow_up_questions():
    """The same questions asked after the model's own report in one conversation, as the Slicer
    module's session does: a model trained only on first turns answers these with nonsense."""
    balanced, _ = _balanced_yes_no(after_report=True)
    print(f"balanced yes/no accuracy after the report {balanced:.3f}")
    assert balanced >= 0.80, balanced  # measured 0.910; a first-turn-only model: 0.012 (docs/history/demo-model-log.md)


def test_demo_model_finds_findings_on_unseen_phantoms():
    """"Where is the X?" on 30 unseen phantoms: the answer's box against the true box. The demo model
    names the label's box by a reference token (box_refs) and the encoder's box head places it; a box
    placed to within one image token, as the LLM's own digits did, gave a mean IoU of 0.27 (docs/history/demo-model-log.md)."""
    import torch

    from medmvl_core.data.phantom_dataset import format_box_3d, model_box_fn
    from medmvl_core.data.phantom_tasks import make_tasks
    from medmvl_core.data.phantoms import make_ct_phantom
    from medmvl_core.evaluation.phantom_metrics import box_iou, parse_box
    from medmvl_core.imaging import Volume
    from medmvl_core.model import load_checkpoint

    model, proc = load_checkpoint(DEMO)
    ious = []
    for index in range(30):
        ph = make_ct_phantom(0, "test", 100 + index)
        vol = Volume(array=ph.array, spacing=ph.spacing, origin=ph.origin,
                     direction=np.asarray(ph.direction).reshape(3, 3), modality="CT", source="phantom")
        for t in make_tasks(ph, np.random.default_rng(index), model_box_fn(ph, None), format_box_3d):
            if t["task"] != "find":
                continue
            s = proc([{"from": "human", "value": "<image3d>\n" + t["question"]}], image3d=vol, mode="generate")
            with torch.no_grad():
                out = model.generate(input_ids=s["input_ids"][None], attention_mask=s["attention_mask"][None],
                                     images3d=s["images3d"], max_new_tokens=48, do_sample=False,
                                     pad_token_id=proc.tokenizer.pad_token_id, eos_token_id=proc.tokenizer.eos_token_id)
            text = model.resolve_box_refs(proc.batch_decode(out), s["images3d"])[0]
            box = parse_box(text, 3)
            ious.append(box_iou(box, t["truth"]["box"]) if box else 0.0)
    print(f"find mean IoU {np.mean(ious):.3f} over {len(ious)} findings")
    assert len(ious) >= 15
    assert np.mean(ious) >= 0.40, np.mean(ious)  # the target; see the model card for the measured value
