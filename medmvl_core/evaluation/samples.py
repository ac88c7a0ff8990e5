"""Reading a predictions file: MedM-VL's inference output, ground truth taken from each item.

The file is a JSON list of items as ``medmvl infer`` (and MedM-VL's ``lvlm/inference.py``)
writes them: the input item, with the generated answer appended to ``conversations`` as the
last ``{"from": "gpt", ...}`` turn and the reference answer in ``answer`` (the trailing gpt turn
of the input, moved there before generation). Where each field comes from:

================  ==========================================================================
prediction        last ``gpt`` turn of ``conversations``; else ``prediction`` / ``answer_pred``
                  / ``pred`` (a plain list of strings is accepted with ``references``)
reference         ``answer``; else ``Answer`` (M3D CSV), ``answer_gt``, ``gt``
question          last ``human`` turn; else ``question`` / ``Question``
question_type     ``question_type`` / ``Question Type`` (M3D: 1 Plane ... 5 Location), else
                  ``answer_type`` (SLAKE: OPEN / CLOSED)
answer_choice     ``answer_choice`` / ``Answer Choice``; else the letter of a reference
                  written ``"X. answer"``
box (2D refer)    ``answer`` as a pixel ``[x, y, w, h]`` list (Uni-Med eval files), or ``bbox``
image_size        ``image_size`` ``[W, H]`` (2D refer)
box (3D rec)      the first ``[a, b, c, d, e, f]`` in ``answer``, or ``box`` / ``bbox`` list
================  ==========================================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medmvl_core.data.datasets import read_json_list
from medmvl_core.errors import DataError

_CHOICE = re.compile(r"^\s*\(?([A-Za-z])[.)]")


@dataclass
class Sample:
    """One scored item. ``prediction`` is the raw generated text ("" when absent)."""

    index: int
    id: str | None
    prediction: str
    reference: Any
    question: str | None = None
    question_type: Any = None
    answer_choice: str | None = None
    answer_type: str | None = None
    image_size: list | None = None
    item: dict = field(default_factory=dict, repr=False)
    raw: dict = field(default_factory=dict, repr=False)


def _first(item: dict, *keys: str) -> Any:
    for k in keys:
        if k in item and item[k] is not None:
            return item[k]
    return None


def _turn(item: dict, who: str) -> str | None:
    convs = item.get("conversations")
    if isinstance(convs, list):
        for turn in reversed(convs):
            if isinstance(turn, dict) and turn.get("from") == who:
                v = turn.get("value")
                return v if isinstance(v, str) else (None if v is None else str(v))
    return None


def sample_from_item(index: int, item: Any, reference_item: Any = None) -> Sample:
    """Build a :class:`Sample` from one output item (and an optional separate reference item)."""
    if isinstance(item, str):
        item = {"prediction": item}
    if not isinstance(item, dict):
        raise DataError(f"predictions item {index} is a {type(item).__name__}, expected an object "
                        "(MedM-VL inference output) or a string; check the --predictions file")
    gt = dict(reference_item) if isinstance(reference_item, dict) else {}
    merged = {**gt, **{k: v for k, v in item.items() if k != "conversations"}}
    # An explicit prediction key wins; else the generated (last) gpt turn (MedM-VL output).
    p = _first(item, "prediction", "answer_pred", "pred")
    pred = _turn(item, "gpt") if p is None else str(p)
    pred = "" if pred is None else pred
    reference = _first(merged, "answer", "Answer", "answer_gt", "gt")
    if reference in (None, "") and gt:
        reference = _first(gt, "answer", "Answer", "answer_gt", "gt")
        if reference in (None, ""):
            reference = _turn(gt, "gpt")
    qtype = _first(merged, "question_type", "Question Type")
    atype = _first(merged, "answer_type")
    choice = _first(merged, "answer_choice", "Answer Choice")
    if choice is None and isinstance(reference, str):
        m = _CHOICE.match(reference)
        choice = m.group(1) if m else None
    question = _turn(item, "human") or _first(merged, "question", "Question")
    size = merged.get("image_size")
    return Sample(index=index, id=None if merged.get("id") is None else str(merged.get("id")),
                  prediction=pred, reference=reference, question=question, question_type=qtype,
                  answer_choice=None if choice is None else str(choice),
                  answer_type=None if atype is None else str(atype),
                  image_size=list(size) if isinstance(size, (list, tuple)) else None, item=merged,
                  raw=item)


def load_samples(path: str | Path, references: str | Path | None = None) -> list[Sample]:
    """Read a predictions file (and, for old list-of-strings outputs, a reference file)."""
    fix = "pass the JSON that `medmvl infer` wrote"
    items = read_json_list(path, "predictions file", fix)
    refs = read_json_list(references, "references file", fix) if references else None
    if refs is not None and len(refs) != len(items):
        raise DataError(f"{path} has {len(items)} predictions but {references} has {len(refs)} "
                        "items; they must be aligned one to one, in order")
    return [sample_from_item(i, it, refs[i] if refs else None) for i, it in enumerate(items)]
