"""Metrics of the synthetic phantom benchmark (``medmvl eval`` benchmark "phantoms").

Input: the items of ``<split>_tasks.json`` written by ``medmvl phantoms`` (see
:mod:`medmvl_core.data.phantom_dataset`), each with the model's answer added::

    {"task": "report" | "closed" | "choice" | "open" | "find" | "region",
     "prediction": str,                       # the model's generated text
     "truth": {...},                          # as written by the generator
     ...}                                     # other keys are ignored

``truth`` per task: report ``{"findings": [[kind, location], ...]}``; closed ``{"yes": bool}``;
choice ``{"letter": "a".."d"}``; find ``{"box": [z1, y1, x1, z2, y2, x2] (0-1) | [x1, y1, x2, y2]
(0-100)}``; region ``{"kind": kind | "normal"}``; every task also has ``"answer"`` (the reference
text; open questions are scored by normalized exact match with it). The gpt turn of
``conversations`` is never read: in a predictions file it is the model's answer.

Returned metrics (a task with no items has none of its keys): ``closed_accuracy`` (yes/no and
multiple choice together), ``yesno_accuracy``, ``choice_accuracy``, ``report_precision``,
``report_recall``, ``report_f1`` (micro-averaged over (kind, location) findings parsed from the
Findings section), ``report_exact`` (share of reports whose finding set is exactly right),
``find_mean_iou``, ``find_acc_iou50``, ``find_parse_rate``, ``region_accuracy``, ``open_accuracy``,
and ``n_<task>`` counts.
"""

from __future__ import annotations

import re
from typing import Sequence

from medmvl_core.data.phantom_tasks import (normalize_answer, parse_choice, parse_kind, parse_report,
                                            parse_yes_no)
from medmvl_core.errors import DataError

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX3D_RE = re.compile(r"\[" + ",".join([_NUM] * 6) + r"\]")
_BOX2D_RE = re.compile(r"\{" + "".join([r"<\s*(\d+)\s*>"] * 4) + r"\}")


def parse_box(text: str, dims: int) -> list[float] | None:
    """The first 3D (``dims`` 3: ``[z1, y1, x1, z2, y2, x2]``) or 2D (``{<x1><y1><x2><y2>}``) box in text."""
    m = (_BOX3D_RE if dims == 3 else _BOX2D_RE).search(text)
    return None if m is None else [float(v) for v in m.groups()]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two axis-aligned boxes given as (mins..., maxs...), any dimension.

    A box with a max below its min has zero volume.
    """
    if len(a) != len(b) or len(a) % 2:
        raise DataError(f"boxes must have the same even length, got {len(a)} and {len(b)} values")
    n = len(a) // 2
    inter, va, vb = 1.0, 1.0, 1.0
    for d in range(n):
        inter *= max(0.0, min(a[d + n], b[d + n]) - max(a[d], b[d]))
        va *= max(0.0, a[d + n] - a[d])
        vb *= max(0.0, b[d + n] - b[d])
    union = va + vb - inter
    return inter / union if union > 0 else 0.0


def _reference(item: dict) -> str:
    # Not the conversation's gpt turn: in a predictions file that turn is the model's answer.
    ref = item.get("truth", {}).get("answer", item.get("answer"))
    if ref is None:
        raise DataError(f"phantom item {item.get('id', '?')} has no truth.answer; regenerate the items "
                        "with `medmvl phantoms`")
    return str(ref)


def evaluate(items: list[dict]) -> dict:
    """Phantom benchmark metrics for items with ``task``, ``prediction`` and ``truth`` (see module doc)."""
    acc: dict[str, list[float]] = {k: [] for k in ("yesno", "choice", "region", "open", "iou", "parsed")}
    tp = fp = fn = exact = n_report = 0
    counts: dict[str, int] = {}
    for n, item in enumerate(items):
        try:
            task, pred, truth = item["task"], str(item["prediction"]), item.get("truth", {})
        except KeyError as exc:
            raise DataError(f"phantom item {n} has no {exc.args[0]!r}; every item needs 'task' and "
                            "'prediction' (run the model on <split>_tasks.json from `medmvl phantoms`)") from None
        counts[task] = counts.get(task, 0) + 1
        if task == "report":
            ref = {tuple(f) for f in truth["findings"]}
            got = parse_report(pred)
            tp, fp, fn = tp + len(ref & got), fp + len(got - ref), fn + len(ref - got)
            exact += ref == got
            n_report += 1
        elif task == "closed":
            acc["yesno"].append(float(parse_yes_no(pred) == bool(truth["yes"])))
        elif task == "choice":
            acc["choice"].append(float(parse_choice(pred) == truth["letter"]))
        elif task == "find":
            ref_box = truth["box"]
            box = parse_box(pred, 3 if len(ref_box) == 6 else 2)
            acc["parsed"].append(float(box is not None))
            acc["iou"].append(box_iou(box, ref_box) if box is not None else 0.0)
        elif task == "region":
            acc["region"].append(float(parse_kind(pred) == truth["kind"]))
        elif task == "open":
            acc["open"].append(float(normalize_answer(pred) == normalize_answer(_reference(item))))
        else:
            raise DataError(f"phantom item {n} has unknown task {task!r}; "
                            "expected report, closed, choice, open, find or region")
    out: dict[str, float] = {f"n_{k}": float(v) for k, v in sorted(counts.items())}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    closed = acc["yesno"] + acc["choice"]
    if closed:
        out["closed_accuracy"] = mean(closed)
    for key in ("yesno", "choice", "region", "open"):
        if acc[key]:
            out[f"{key}_accuracy"] = mean(acc[key])
    if n_report:
        p = tp / (tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0)
        r = tp / (tp + fn) if tp + fn else (1.0 if fp == 0 else 0.0)
        out.update(report_precision=p, report_recall=r,
                   report_f1=2 * p * r / (p + r) if p + r else 0.0, report_exact=exact / n_report)
    if acc["iou"]:
        out.update(find_mean_iou=mean(acc["iou"]), find_acc_iou50=mean([float(v >= 0.5) for v in acc["iou"]]),
                   find_parse_rate=mean(acc["parsed"]))
    return out
