"""Uni-Med (2D) task benchmarks, scored as MedM-VL's ``scripts/eval/unimed/eval_unimed.py``
(METRICS.md §2, §4). The headline of each is the number MedM-VL writes to ``results.csv``:

- classification (medmnist_derma, medmnist_organs): ``normalize(pred) == normalize(gt)``;
- report (mimic, medpix): coco corpus BLEU-1 (pycocoevalcap; skipped with the fix if absent);
- VQA (slakevqa, pathvqa) and identify (slake/samed): mean nltk sentence BLEU-1 on normalised
  tokens, over all questions;
- refer (slake/samed): mIoU with Uni-Med's parsing and inclusive-pixel IoU.
"""

from __future__ import annotations

import logging
from typing import Sequence

from medmvl_core.errors import DataError
from medmvl_core.evaluation import resources
from medmvl_core.evaluation.box_metrics import iou_2d_inclusive, parse_box_2d, xywh_to_xyxy
from medmvl_core.evaluation.options import EvalOptions
from medmvl_core.evaluation.results import EvalResult, aggregate, ok, skipped
from medmvl_core.evaluation.samples import Sample
from medmvl_core.evaluation.text_metrics import nltk_bleu, normalize_word, token_f1

logger = logging.getLogger(__name__)


def _s(v) -> str:
    return "" if v is None else (v if isinstance(v, str) else str(v))


def _finish(name, samples, metrics, headline, rows, prov) -> EvalResult:
    prov.setdefault("n", len(samples))
    prov.setdefault("empty_predictions", sum(1 for s in samples if not _s(s.prediction).strip()))
    return EvalResult(benchmark=name, metrics=metrics, headline=headline, samples=rows,
                      provenance=prov)


def _mean_metric(rows: list[dict], key: str, vals: list[float]) -> dict:
    for r, v in zip(rows, vals):
        r[key] = v
    return aggregate(vals, None)


def _bleu_f1(samples: Sequence[Sample], rows: list[dict], metrics: dict) -> None:
    """nltk BLEU-1..4 on normalised tokens (no smoothing) and token F1 (normalised and raw)."""
    preds = [normalize_word(_s(s.prediction)) for s in samples]
    refs = [normalize_word(_s(s.reference)) for s in samples]
    for n in (1, 2, 3, 4):
        metrics[f"bleu{n}"] = _mean_metric(rows, f"bleu{n}", [
            nltk_bleu(p.split(), r.split(), n) for p, r in zip(preds, refs)])
    metrics["token_f1"] = _mean_metric(rows, "token_f1", [token_f1(p, r) for p, r in zip(preds, refs)])
    metrics["token_f1_no_norm"] = _mean_metric(rows, "token_f1_no_norm", [
        token_f1(_s(s.prediction), _s(s.reference)) for s in samples])


def _rows(samples: Sequence[Sample]) -> list[dict]:
    return [{"index": s.index, "id": s.id, "empty_prediction": not _s(s.prediction).strip()}
            for s in samples]


def _exact(s: Sample) -> float:
    """1.0 when the normalised prediction equals the normalised reference; an empty prediction
    scores 0 (METRICS.md §0), even against an empty reference."""
    pred = _s(s.prediction)
    return 1.0 if pred.strip() and normalize_word(pred) == normalize_word(_s(s.reference)) else 0.0


def evaluate_cls(samples: Sequence[Sample], options: EvalOptions, name: str = "unimed-cls") -> EvalResult:
    rows = _rows(samples)
    metrics = {"accuracy": _mean_metric(rows, "correct", [_exact(s) for s in samples])}
    return _finish(name, samples, metrics, "accuracy", rows, {"aggregation": "mean over samples"})


def _is_closed(s: Sample) -> bool:
    if s.answer_type:
        return s.answer_type.strip().upper() == "CLOSED"
    return normalize_word(_s(s.reference)) in ("yes", "no")


def evaluate_vqa(samples: Sequence[Sample], options: EvalOptions, name: str = "unimed-vqa") -> EvalResult:
    rows = _rows(samples)
    metrics: dict[str, dict] = {}
    _bleu_f1(samples, rows, metrics)
    closed = [i for i, s in enumerate(samples) if _is_closed(s)]
    hits = []
    for i in closed:
        s = samples[i]
        hit = 1.0 if normalize_word(_s(s.reference)) in normalize_word(_s(s.prediction)) else 0.0
        rows[i]["closed_correct"] = bool(hit)
        hits.append(hit)
    metrics["closed_accuracy"] = aggregate(hits, None)
    metrics["closed_accuracy"]["note"] = ("closed questions = answer_type CLOSED, or (without "
                                          "answer_type) a yes/no reference")
    by_type = [s.answer_type.upper() if s.answer_type else None for s in samples]
    if any(by_type):
        b1 = aggregate([r["bleu1"] for r in rows], by_type)
        metrics["bleu1"].update(per_type=b1["per_type"], per_type_n=b1["per_type_n"])
    prov = {"aggregation": "mean over all questions (open and closed)", "closed_questions": len(closed)}
    return _finish(name, samples, metrics, "bleu1", rows, prov)


def evaluate_identify(samples: Sequence[Sample], options: EvalOptions,
                      name: str = "unimed-identify") -> EvalResult:
    rows = _rows(samples)
    metrics: dict[str, dict] = {}
    _bleu_f1(samples, rows, metrics)
    metrics["accuracy"] = _mean_metric(rows, "correct", [_exact(s) for s in samples])
    return _finish(name, samples, metrics, "bleu1", rows, {"aggregation": "mean over samples"})


def evaluate_report(samples: Sequence[Sample], options: EvalOptions,
                    name: str = "unimed-report") -> EvalResult:
    """Pairs with an empty reference or prediction are dropped first (MedM-VL does)."""
    kept = [s for s in samples if _s(s.reference) and _s(s.prediction)]
    rows = _rows(kept)
    metrics: dict[str, dict] = {}
    prov: dict = {"aggregation": "coco metrics: corpus over kept pairs; others: mean over kept pairs",
                  "dropped_empty_pairs": len(samples) - len(kept), "n_kept": len(kept)}
    ready, info = resources.find_pycocoevalcap()
    coco_keys = ["coco_bleu1", "coco_bleu2", "coco_bleu3", "coco_bleu4", "coco_meteor", "coco_rouge_l"]
    if ready is None:
        for k in coco_keys:
            metrics[k] = skipped(info)
    elif not kept:
        for k in coco_keys:
            metrics[k] = ok(None, note="no non-empty pairs")
    else:
        from medmvl_core.evaluation.coco import coco_scores

        prov.update(info)
        scores = coco_scores([_s(s.prediction) for s in kept], [_s(s.reference) for s in kept])
        for k in coco_keys:
            metrics[k] = ok(scores[k] * 100.0, n=len(kept), aggregation="corpus")
    _bleu_f1(kept, rows, metrics)
    return _finish(name, samples, metrics, "coco_bleu1", rows, prov)


def _gt_box_2d(s: Sample) -> tuple[list[float], list[float]]:
    box = s.item.get("bbox")
    if box is None:
        box = s.reference
    if isinstance(box, str):
        import json

        try:
            box = json.loads(box)
        except ValueError:
            box = None
    if not (isinstance(box, (list, tuple)) and len(box) >= 4 and s.image_size and len(s.image_size) >= 2):
        raise DataError(
            f"refer item {s.index} (id {s.id}) lacks the ground truth: it needs the pixel box "
            "[x, y, w, h] in 'answer' (or 'bbox') and 'image_size' [W, H], as in Uni-Med's eval "
            "files; a quantised {<..>} string cannot be scored exactly")
    try:
        return xywh_to_xyxy(box), [float(v) for v in s.image_size[:2]]
    except (TypeError, ValueError):
        raise DataError(f"refer item {s.index} (id {s.id}) has a non-numeric box {box!r} or image_size "
                        f"{s.image_size!r}; both must be numbers") from None


def evaluate_refer(samples: Sequence[Sample], options: EvalOptions, name: str = "unimed-refer") -> EvalResult:
    rows = _rows(samples)
    ious = []
    unparsed = 0
    for s, row in zip(samples, rows):
        gt, size = _gt_box_2d(s)
        pred = parse_box_2d(_s(s.prediction), size)
        iou = iou_2d_inclusive(pred, gt) if pred is not None else 0.0
        unparsed += pred is None
        row.update(iou=iou, pred_box=pred, gt_box=gt)
        ious.append(iou)
    metrics = {"miou": aggregate(ious, None),
               "acc@0.5": aggregate([1.0 if v > 0.5 else 0.0 for v in ious], None)}
    prov = {"aggregation": "mean over samples; acc = IoU > 0.5 (strict)",
            "unparseable_predictions": unparsed}
    return _finish(name, samples, metrics, "miou", rows, prov)
