"""Phantom benchmark metrics against hand-computed values and MONAI's box IoU."""

from __future__ import annotations

import numpy as np
import pytest

from medmvl_core.errors import DataError
from medmvl_core.evaluation.phantom_metrics import box_iou, evaluate, parse_box


def _item(task, pred, truth, answer=""):
    # the gpt turn holds the prediction, as in a predictions file; the reference is truth.answer
    return {"task": task, "prediction": pred, "truth": truth | {"answer": answer},
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": pred}]}


def test_box_iou_matches_monai():
    import torch
    from monai.data.box_utils import box_iou as monai_iou

    rng = np.random.default_rng(0)
    for dims in (2, 3):
        lo = rng.uniform(0, 0.6, size=(20, dims))
        boxes = np.concatenate([lo, lo + rng.uniform(0.05, 0.4, size=(20, dims))], axis=1)
        ref = monai_iou(torch.tensor(boxes[:10]), torch.tensor(boxes[10:])).numpy()
        ours = np.array([[box_iou(a, b) for b in boxes[10:]] for a in boxes[:10]])
        np.testing.assert_allclose(ours, ref, atol=1e-5)  # MONAI computes in float32
        assert (ref > 0).any()


def test_evaluate_hand_computed():
    truth_a = {"findings": [["nodule", "right upper lobe"], ["effusion", "left pleural space"]]}
    items = [
        # TP nodule, FN effusion, FP mass (both sentence forms: kind first, version 2; size first, version 1)
        _item("report", "Findings: A nodule measuring 25 mm is seen in the right upper lobe. A 45 mm mass is seen "
                        "in the left lower lobe. Impression: Nodule.", truth_a),
        # TP cyst; the Impression's mention of an effusion is ignored
        _item("report", "Findings: A 35 mm cyst is seen in the liver. Impression: small left pleural effusion.",
              {"findings": [["cyst", "liver"]]}),
        _item("closed", "Yes.", {"yes": True}),
        _item("closed", "yes, there is", {"yes": False}),
        _item("choice", "(c) cyst.", {"letter": "c"}),
        _item("choice", "garbled", {"letter": "a"}),
        _item("find", "[0.1, 0.1, 0.1, 0.3, 0.3, 0.3]", {"box": [0.1, 0.1, 0.1, 0.3, 0.3, 0.3]}),
        _item("find", "[0.2, 0.1, 0.1, 0.4, 0.3, 0.3]", {"box": [0.1, 0.1, 0.1, 0.3, 0.3, 0.3]}),
        _item("find", "no box here", {"box": [0.1, 0.1, 0.1, 0.3, 0.3, 0.3]}),
        _item("find", "{<10><20><30><40>}", {"box": [10, 20, 30, 40]}),
        _item("region", "A nodule in the right upper lobe.", {"kind": "nodule"}),
        _item("region", "Normal lung.", {"kind": "mass"}),
        _item("region", "In the right upper lobe: normal lung.", {"kind": "normal"}),
        _item("open", "in the Right upper lobe", {}, answer="In the right upper lobe."),
        _item("open", "25 mm.", {}, answer="30 mm."),
    ]
    m = evaluate(items)
    assert m["report_precision"] == pytest.approx(2 / 3)
    assert m["report_recall"] == pytest.approx(2 / 3)
    assert m["report_f1"] == pytest.approx(2 / 3)
    assert m["report_exact"] == pytest.approx(0.5)
    assert m["yesno_accuracy"] == 0.5 and m["choice_accuracy"] == 0.5 and m["closed_accuracy"] == 0.5
    # IoUs: 1, (0.1*0.2*0.2)/(2*0.008-0.004)=1/3, 0 (unparsed), 1
    assert m["find_mean_iou"] == pytest.approx((1 + 1 / 3 + 0 + 1) / 4)
    assert m["find_acc_iou50"] == pytest.approx(0.5)
    assert m["find_parse_rate"] == pytest.approx(0.75)
    assert m["region_accuracy"] == pytest.approx(2 / 3)
    assert m["open_accuracy"] == 0.5
    assert m["n_find"] == 4


def test_parse_box_and_errors():
    assert parse_box("at [0.1, 0.2, 0.3, 0.4, 0.5, 0.6].", 3) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert parse_box("{<1><2><3><4>}", 2) == [1, 2, 3, 4]
    assert parse_box("[0.1, 0.2]", 3) is None
    with pytest.raises(DataError, match="prediction"):
        evaluate([{"task": "closed", "truth": {"yes": True}}])
    with pytest.raises(DataError, match="unknown task"):
        evaluate([_item("segment", "x", {})])
    with pytest.raises(DataError, match="same even length"):
        box_iou([0, 0, 1, 1], [0, 0, 0, 1, 1, 1])


def test_medmvl_eval_benchmark_phantoms(tmp_path, capsys):
    """Through `medmvl eval`: reference answers as predictions score 100; flipped yes/no answers do not."""
    import json

    from medmvl_core.cli import main
    from medmvl_core.data.phantom_dataset import generate_dataset

    generate_dataset(tmp_path, {"test": 3}, seed=1)
    items = json.loads((tmp_path / "test_tasks.json").read_text())
    (tmp_path / "perfect.json").write_text(json.dumps(items))
    assert main(["eval", "--predictions", str(tmp_path / "perfect.json"), "--benchmark", "phantoms", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["metrics"]
    assert m["closed_accuracy"]["value"] == 100.0 and m["report_f1"]["value"] == 100.0
    closed = [it for it in items if it["task"] == "closed"]
    for it in closed:  # the generated gpt turn is the prediction
        it["conversations"][-1]["value"] = "No." if it["truth"]["yes"] else "Yes."
    (tmp_path / "flipped.json").write_text(json.dumps(items))
    assert main(["eval", "--predictions", str(tmp_path / "flipped.json"), "--benchmark", "phantoms", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["metrics"]
    assert m["yesno_accuracy"]["value"] == 0.0
    assert m["closed_accuracy"]["value"] == pytest.approx(100.0 * 3 / (3 + len(closed)))
