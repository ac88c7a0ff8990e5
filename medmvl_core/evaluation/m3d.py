"""M3D-Bench (3D) benchmarks, scored as MedM-VL's ``scripts/eval/m3d_bench`` (METRICS.md §1, §4).

- ``m3d-cap``: BLEU-1, ROUGE-1, METEOR, BERTScore F1, each the mean over samples.
- ``m3d-vqa-open``: the same four, per question type, macro and micro averages.
- ``m3d-vqa-closed``: accuracy (``answer_choice + "."`` is a substring of the output), per type,
  macro and micro.
- ``m3d-rec``: 3D box IoU (M3D's enclosing-box variant by default, or standard), mean IoU and
  Acc@0.5.

Predictions and references are stripped; an empty prediction scores 0 on every text metric.
"""

from __future__ import annotations

import logging
from typing import Sequence

from medmvl_core.evaluation import bertscore as bs
from medmvl_core.evaluation import resources
from medmvl_core.evaluation.box_metrics import iou_3d_m3d, iou_3d_standard, parse_box_3d
from medmvl_core.evaluation.meteor import MeteorScorer, WordTokenizer
from medmvl_core.evaluation.options import EvalOptions
from medmvl_core.evaluation.results import EvalResult, aggregate, skipped
from medmvl_core.evaluation.samples import Sample
from medmvl_core.evaluation.text_metrics import bleu1_hfe, rouge1_f

logger = logging.getLogger(__name__)

M3D_QUESTION_TYPES = {1: "Plane", 2: "Phase", 3: "Organ", 4: "Abnormality", 5: "Location"}


def _qtype(s: Sample):
    t = s.question_type
    try:
        return int(t) if t is not None and str(t).strip().isdigit() else t
    except (TypeError, ValueError):
        return t


def _text(v) -> str:
    return "" if v is None else (v if isinstance(v, str) else str(v)).strip()


def text_metrics(samples: Sequence[Sample], options: EvalOptions, by_type: bool,
                 provenance: dict) -> tuple[dict, list[dict]]:
    """BLEU-1 / ROUGE-1 / METEOR / BERTScore per sample, aggregated; skips where data is missing."""
    preds = [_text(s.prediction) for s in samples]
    refs = [_text(s.reference) for s in samples]
    types = [_qtype(s) for s in samples] if by_type else None
    names = M3D_QUESTION_TYPES if by_type else None
    rows = [{"index": s.index, "id": s.id, "question_type": types[i] if types else None,
             "empty_prediction": not preds[i]} for i, s in enumerate(samples)]
    metrics: dict[str, dict] = {}

    def run(key: str, fn) -> None:
        vals = [fn(p, r) if p else 0.0 for p, r in zip(preds, refs)]
        for row, v in zip(rows, vals):
            row[key] = v
        metrics[key] = aggregate(vals, types, type_names=names)

    run("bleu1", bleu1_hfe)
    run("rouge1", rouge1_f)

    punkt, pinfo = resources.find_punkt()
    wordnet, winfo = resources.find_wordnet(options.nltk_data)
    if punkt is None:
        metrics["meteor"] = skipped(pinfo)
    else:
        provenance.update(pinfo)
        tok = WordTokenizer(punkt)
        if wordnet is None:
            metrics["meteor"] = skipped(winfo)
            provenance["wordnet_version"] = None
            run("meteor_nosyn", MeteorScorer(tok, resources.NoSynonyms()))
            metrics["meteor_nosyn"]["note"] = ("approximation: METEOR without the WordNet synonym "
                                               "stage (not the paper's metric)")
        else:
            provenance.update(winfo)
            run("meteor", MeteorScorer(tok, wordnet))

    model_dir, binfo = resources.find_bertscore_model(options.bertscore_model)
    if model_dir is None:
        metrics["bertscore_f1"] = skipped(binfo)
    else:
        idx = [i for i, p in enumerate(preds) if p]
        try:
            setup = bs.plan(model_dir, options.bertscore_layers)
            f1, hash_ = bs.score(setup, [preds[i] for i in idx], [refs[i] for i in idx],
                                 device=options.device, batch_size=options.batch_size)
        except Exception as exc:  # a broken model folder is a skip with the reason, not a crash
            logger.debug("BERTScore failed", exc_info=True)
            metrics["bertscore_f1"] = skipped(resources.Skip(
                f"BERTScore could not run with {model_dir} ({type(exc).__name__}: {exc})",
                resources.BERTSCORE_FIX))
            return metrics, rows
        vals = [0.0] * len(preds)
        for i, v in zip(idx, f1):
            vals[i] = v
        for row, v in zip(rows, vals):
            row[setup.key] = v
        metrics[setup.key] = aggregate(vals, types, type_names=names)
        if setup.key != bs.PAPER_KEY:
            metrics[setup.key]["note"] = (f"proxy: {setup.label} layer {setup.num_layers}, not the "
                                          "paper's roberta-large layer 17")
            metrics[bs.PAPER_KEY] = skipped(resources.Skip(
                f"the BERTScore model given is {setup.label}, not roberta-large (layer 17)",
                resources.BERTSCORE_FIX))
        provenance.update(binfo)
        provenance.update({"bertscore_hash": hash_, "bertscore_layer": setup.num_layers,
                           "bertscore_idf": False, "bertscore_rescale": False})
    return metrics, rows


def _finish(name: str, samples: Sequence[Sample], metrics: dict, headline: str, rows: list,
            provenance: dict) -> EvalResult:
    provenance.setdefault("n", len(samples))
    provenance.setdefault("empty_predictions", sum(1 for s in samples if not _text(s.prediction)))
    return EvalResult(benchmark=name, metrics=metrics, headline=headline, samples=rows,
                      provenance=provenance)


def evaluate_cap(samples: Sequence[Sample], options: EvalOptions, name: str = "m3d-cap") -> EvalResult:
    prov = {"aggregation": "mean over samples"}
    metrics, rows = text_metrics(samples, options, by_type=False, provenance=prov)
    return _finish(name, samples, metrics, "bleu1", rows, prov)


def evaluate_vqa_open(samples: Sequence[Sample], options: EvalOptions,
                      name: str = "m3d-vqa-open") -> EvalResult:
    prov = {"aggregation": "value = macro average over question types; micro and per-type also given"}
    metrics, rows = text_metrics(samples, options, by_type=True, provenance=prov)
    return _finish(name, samples, metrics, "bleu1", rows, prov)


def evaluate_vqa_closed(samples: Sequence[Sample], options: EvalOptions,
                        name: str = "m3d-vqa-closed") -> EvalResult:
    types = [_qtype(s) for s in samples]
    rows, vals, missing = [], [], 0
    for s, t in zip(samples, types):
        pred = _text(s.prediction)
        if s.answer_choice is None:
            missing += 1
        correct = s.answer_choice is not None and (s.answer_choice + ".") in pred
        vals.append(1.0 if correct else 0.0)
        rows.append({"index": s.index, "id": s.id, "question_type": t, "correct": correct,
                     "empty_prediction": not pred})
    prov = {"aggregation": "value = macro average over question types; micro and per-type also given",
            "missing_answer_choice": missing}
    metrics = {"accuracy": aggregate(vals, types, type_names=M3D_QUESTION_TYPES)}
    return _finish(name, samples, metrics, "accuracy", rows, prov)


def _numbers(v) -> list[float] | None:
    if isinstance(v, (list, tuple)) and len(v) == 6:
        try:
            return [float(x) for x in v]
        except (TypeError, ValueError):
            return None
    return None


def _gt_box_3d(s: Sample):
    for v in (s.item.get("box"), s.item.get("bbox"), s.reference):
        box = _numbers(v)
        if box is not None:
            return box
    return parse_box_3d(_text(s.reference))


def evaluate_rec(samples: Sequence[Sample], options: EvalOptions, name: str = "m3d-rec") -> EvalResult:
    """Per sample IoU; -1 when the prediction or the reference has no parseable box (M3D).

    ``miou`` counts -1 as 0; ``acc_0.5`` = share of samples with IoU > 0.5 (-1 is a miss)."""
    mode = options.iou_mode
    if mode not in ("m3d", "standard"):
        from medmvl_core.errors import ConfigError

        raise ConfigError(f"--iou-mode {mode!r} is not one of: m3d, standard")
    iou_fn = iou_3d_m3d if mode == "m3d" else iou_3d_standard
    rows, ious = [], []
    no_gt = 0
    for s in samples:
        pred_box = parse_box_3d(_text(s.prediction))
        gt_box = _gt_box_3d(s)
        no_gt += gt_box is None
        iou = iou_fn(pred_box, gt_box) if (pred_box is not None and gt_box is not None) else -1.0
        ious.append(iou)
        rows.append({"index": s.index, "id": s.id, "iou": iou, "pred_box": pred_box,
                     "gt_box": gt_box, "question_type": _qtype(s)})
    types = [_qtype(s) for s in samples]
    metrics = {}
    for key, vals in (("miou", [max(0.0, v) for v in ious]),
                      ("acc@0.5", [1.0 if v > 0.5 else 0.0 for v in ious])):
        metrics[key] = aggregate(vals, None)
        if any(t is not None for t in types):
            by_type = aggregate(vals, types)
            metrics[key].update(per_type=by_type["per_type"], per_type_n=by_type["per_type_n"],
                                macro=by_type["macro"])
    prov = {"aggregation": "value = mean over samples (micro); per-type means also given",
            "iou_mode": mode, "unparseable_predictions": sum(1 for v in ious if v == -1.0),
            "missing_reference_boxes": no_gt}
    return _finish(name, samples, metrics, "miou", rows, prov)


__all__ = ["evaluate_cap", "evaluate_vqa_open", "evaluate_vqa_closed", "evaluate_rec",
           "text_metrics", "M3D_QUESTION_TYPES"]
