"""Templated text for the phantom benchmark: reports, questions, answers and their parsers.

Every task is a single question about one phantom, as a dict::

    {"task": "report" | "closed" | "choice" | "open" | "find" | "region",
     "question": str, "answer": str, "truth": {...task-specific...}}

``truth`` holds what the metrics need: ``findings`` ([[kind, location], ...]) for reports,
``yes`` (bool) for closed questions, ``letter`` for multiple choice, ``box`` (model-space box,
3D ``[z1, y1, x1, z2, y2, x2]`` in 0-1 or 2D ``[x1, y1, x2, y2]`` in 0-100) for find, ``kind``
(a finding kind or ``"normal"``) and ``location`` for region descriptions.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

from medmvl_core.data.phantoms import FINDING_KINDS, LOBES, Finding, Phantom

TASKS = ("report", "closed", "choice", "open", "find", "region")
REPORT_QUESTION = {"CT": "Generate radiology report for the CT.",
                   "XR": "Generate radiology report for the chest X-ray."}
KIND_TEXT = {"nodule": "nodule", "mass": "mass", "calcification": "calcification", "cyst": "cyst",
             "effusion": "pleural effusion"}
CHOICE_OPTIONS = ("nodule", "mass", "calcification", "cyst", "pleural effusion", "no abnormality")
NORMAL_REGION = "normal lung"
# The protocol's task prompts (medmvl_core.client.protocol.TASK_SPECS), so "describe" / "find"
# requests from the plugin reach the demo model worded exactly as in its training data.
DESCRIBE_PROMPT = "What is in the region {box}? Describe it."
FIND_PROMPT = "Where is the {target} in this image? Please output the bounding box."

BoxFn = Callable[[tuple[int, ...]], list[float]]   # voxel/pixel box -> model-space box
BoxTextFn = Callable[[list[float]], str]           # model-space box -> text


def finding_sentence(f: Finding) -> str:
    """One Findings sentence, e.g. "A nodule measuring 25 mm is seen in the right upper lobe.".

    The kind comes first (generator version 2; version 1 wrote "A 25 mm nodule ..."): a model writes
    left to right, and with the size first it committed to a size before naming the kind, so the
    kind followed the size guess (nodules are 20-30 mm, calcifications 15-20 mm) rather than the
    image (a calcification is 1000 HU, a nodule 60). Measured on the demo model: see docs/history/demo-model-log.md.
    """
    if f.kind == "effusion":
        return f"A {f.grade} {f.location.split()[0]} pleural effusion is seen."
    return f"A {f.kind} measuring {f.size_mm} mm is seen in the {f.location}."


def report_text(findings: Sequence[Finding]) -> str:
    """Structured "Findings: ... Impression: ..." report for a list of findings.

    Organ by organ, in a fixed order — lungs, pleura, liver, heart — each organ either its finding
    sentences or its normal sentence (generator version 2; version 1 listed every finding first and
    the normal organs after). As in a structured radiology report, each organ's "normal or not" is
    decided where the organ comes (in version 1 the liver's came at the first word, against the lung
    findings). The demo model names no liver cyst with either order: its encoder barely sees them
    (see docs/history/demo-model-log.md).
    """
    organs = (("nodule", "mass", "calcification"), ("effusion",), ("cyst",))
    normal = ("The lungs are clear.", "No pleural effusion is seen.", "The liver is normal.")
    parts, ordered = [], []
    for kinds, sentence in zip(organs, normal):
        fs = [f for f in findings if f.kind in kinds]
        ordered += fs
        parts += [finding_sentence(f) for f in fs] or [sentence]
    parts.append("The heart size is normal.")
    if ordered:
        imp = "; ".join(_impression_item(f) for f in ordered)
        imp = imp[0].upper() + imp[1:] + "."
    else:
        imp = "No acute abnormality."
    return "Findings: " + " ".join(parts) + " Impression: " + imp


def _impression_item(f: Finding) -> str:
    if f.kind == "effusion":
        return f"{f.grade} {f.location.split()[0]} pleural effusion"
    return f"{f.kind} in the {f.location}"


_LESION_RE = re.compile(r"(nodule|mass|calcification|cyst)\s+measuring\s+\d+\s*mm\s+is seen in the\s+([a-z ]+?)\s*\.")
_LESION_V1_RE = re.compile(r"\d+\s*mm\s+(nodule|mass|calcification|cyst)\s+is seen in the\s+([a-z ]+?)\s*\.")
_EFFUSION_RE = re.compile(r"(small|moderate|large)\s+(right|left)\s+pleural effusion")


def parse_report(text: str) -> set[tuple[str, str]]:
    """The set of (kind, location) findings stated in the Findings section of a report.

    Text after "Impression:" is ignored (it repeats the findings); without a "Findings:" header
    the whole text is read. Both sentence forms are read: "A nodule measuring 25 mm is seen in
    the right upper lobe." (generator version 2) and "A 25 mm nodule is seen in ..." (version 1).
    """
    text = text.lower()
    if "findings:" in text:
        text = text.split("findings:", 1)[1]
    text = text.split("impression:", 1)[0]
    out = {(m.group(1), m.group(2).strip()) for r in (_LESION_RE, _LESION_V1_RE) for m in r.finditer(text)}
    out |= {("effusion", f"{m.group(2)} pleural space") for m in _EFFUSION_RE.finditer(text)}
    return out


def parse_yes_no(text: str) -> bool | None:
    """True for an answer starting with "yes", False for "no", None otherwise."""
    m = re.match(r"\W*(yes|no)\b", text.strip().lower())
    return None if m is None else m.group(1) == "yes"


def parse_choice(text: str) -> str | None:
    """The option letter (a-d) of a multiple-choice answer, or None."""
    m = re.search(r"\(([a-d])\)", text.lower()) or re.match(r"\s*([a-d])\b", text.lower())
    return m.group(1) if m else None


def parse_kind(text: str) -> str | None:
    """The finding kind named in a region description, "normal", or None if neither."""
    t = text.lower()
    for kind in FINDING_KINDS:
        if kind in t:
            return kind
    return "normal" if "normal" in t else None


def _side_region(f: Finding) -> str:
    if f.kind == "cyst":
        return "the liver"
    return f"the {f.location.split()[0]} lung"


def _closed_question(kind: str, region: str) -> str:
    if kind == "effusion":
        return f"Is there a pleural effusion on the {region.split()[1]} side?"
    return f"Is there a {kind} in {region}?"


_CLOSED_SPACE = [(k, f"the {s} lung") for k in ("nodule", "mass", "calcification") for s in ("right", "left")] \
    + [("cyst", "the liver"), ("effusion", "the right lung"), ("effusion", "the left lung")]


TRAIN_CHOICES = 3  # multiple-choice questions per training phantom (each with its own options and order)


def make_tasks(ph: Phantom, rng: np.random.Generator, box_fn: BoxFn, box_text: BoxTextFn,
               train: bool = False) -> list[dict]:
    """The questions for one phantom (report, 2 closed, choice, open, find, region).

    ``box_fn`` maps a voxel (3D) or pixel (2D) box to the model-space box; ``box_text`` formats it.
    With ``train``, there is one find question per finding instead of one, and ``TRAIN_CHOICES``
    multiple-choice questions instead of one: answering with the letter is a look-up in the question
    that a small LLM learns only from many examples (measured on the demo: the abnormality named
    right in 75% of the test questions, its letter in 24%). The extra questions come last, so the
    questions of the evaluation splits do not change.
    """
    fs = ph.findings
    tasks = [{"task": "report", "question": REPORT_QUESTION[ph.modality], "answer": report_text(fs),
              "truth": {"findings": sorted([f.kind, f.location] for f in fs)}}]
    present = {(f.kind, _side_region(f)) for f in fs}
    absent = [c for c in _CLOSED_SPACE if c not in present]
    picks = []
    if present:
        picks.append(sorted(present)[rng.integers(len(present))])
    picks.append(absent[rng.integers(len(absent))])
    if rng.random() < 0.5 and len(picks) > 1:
        picks.reverse()
    for kind, region in picks:
        yes = (kind, region) in present
        tasks.append({"task": "closed", "question": _closed_question(kind, region),
                      "answer": "Yes." if yes else "No.", "truth": {"yes": yes}})
    tasks.append(_choice_task(ph, rng))
    tasks.append(_open_task(ph, rng))
    targets = fs if train else ([fs[rng.integers(len(fs))]] if fs else [])
    for f in targets:
        mbox = box_fn(f.box)
        tasks.append({"task": "find", "question": FIND_PROMPT.format(target=KIND_TEXT[f.kind]),
                      "answer": box_text(mbox), "truth": {"box": mbox, "kind": f.kind}})
    tasks.append(_region_task(ph, rng, box_fn, box_text))
    if train:
        tasks += [_choice_task(ph, rng) for _ in range(TRAIN_CHOICES - 1)]
    return tasks


def _choice_task(ph: Phantom, rng) -> dict:
    present = {KIND_TEXT[f.kind] for f in ph.findings}
    correct = sorted(present)[rng.integers(len(present))] if present else "no abnormality"
    wrong = [o for o in CHOICE_OPTIONS if o not in present and o != correct]
    if present:
        wrong = [o for o in wrong if o != "no abnormality"] + ["no abnormality"]
    options = [correct] + [str(o) for o in rng.choice(wrong, size=3, replace=False)]
    options = [options[i] for i in rng.permutation(4)]
    letter = "abcd"[options.index(correct)]
    noun = "CT" if ph.modality == "CT" else "chest X-ray"
    q = f"Which abnormality is seen in this {noun}? " + " ".join(f"({l}) {o}" for l, o in zip("abcd", options))
    return {"task": "choice", "question": q, "answer": f"({letter}) {correct}.", "truth": {"letter": letter}}


def _open_task(ph: Phantom, rng) -> dict:
    if not ph.findings:
        return {"task": "open", "question": "How many abnormalities are seen?", "answer": "None.",
                "truth": {}}
    f = ph.findings[rng.integers(len(ph.findings))]
    name = KIND_TEXT[f.kind]
    if f.kind == "effusion" or rng.random() < 0.5:
        loc = f"the {f.location}" if f.kind != "effusion" else f"the {f.location.split()[0]} side"
        return {"task": "open", "question": f"Where is the {name}?", "answer": f"In {loc}.", "truth": {}}
    return {"task": "open", "question": f"How large is the {name}?", "answer": f"{f.size_mm} mm.", "truth": {}}


def _region_task(ph: Phantom, rng, box_fn: BoxFn, box_text: BoxTextFn) -> dict:
    """"What is in the region [box]?" about one finding's box (70% when there are findings) or a box
    of normal lung. The answer names the place first ("In the left lower lobe: a nodule.", "In the
    right upper lobe: normal lung."; generator version 4; before, "A nodule in the left lower lobe."
    and "Normal lung."): the place is what the box's coordinates say, and the kind is then read at
    that place rather than guessed first. On the demo model it raised region accuracy from 60.5% to
    73% (normal boxes 61% -> 77%; docs/history/demo-model-log.md)."""
    if ph.findings and rng.random() < 0.7:
        f = ph.findings[rng.integers(len(ph.findings))]
        what = f"a {f.grade} pleural effusion" if f.kind == "effusion" else f"a {KIND_TEXT[f.kind]}"
        box, kind, loc = f.box, f.kind, f.location
    else:
        box, kind, loc, what = ph.normal_box, "normal", ph.normal_location, NORMAL_REGION
    ans = f"In the {loc}: {what}." if loc else what[0].upper() + what[1:] + "."
    mbox = box_fn(box)
    return {"task": "region", "question": DESCRIBE_PROMPT.format(box=box_text(mbox)), "answer": ans,
            "truth": {"kind": kind, "location": loc, "box": mbox}}


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and extra spaces removed (open-question exact match)."""
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


__all__ = ["TASKS", "REPORT_QUESTION", "make_tasks", "report_text", "parse_report", "parse_yes_no",
           "parse_choice", "parse_kind", "normalize_answer", "LOBES"]
