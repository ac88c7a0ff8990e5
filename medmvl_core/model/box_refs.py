"""Box references: the LLM names a finding's box by one token; the encoder's box head gives the box.

A small LLM writes a box's six coordinates digit by digit from image tokens that each cover a large
part of the volume, so it places a small finding only to within a token (the demo measured find IoU
0.03 for nodules). Grounding models with a region proposer (Groma, Ma et al. 2024) let the LLM refer
to a region token instead and decode the reference to the proposer's box. Here the proposer is the
``convvit3d`` encoder's box head (``box_refs: true``): per finding label, the stem classifier's peak
cell and the box regressed there. With ``MedMVLConfig.box_refs`` (the encoder's labels, in its order)
the tokenizer holds one token per label, ``<|box:LABEL|>``; a stage-2 run trains answers that are a
box as that token (:func:`refer_box_answers`), and every decode path (``medmvl infer``, the
engine and worker) replaces the token in the answer by the box as text (:func:`resolve_box_refs`), in
the model's box format, so callers see an ordinary answer. The conversation the LLM continues keeps
the token (what it was trained on).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from medmvl_core.errors import ConfigError
from medmvl_core.processing.boxes import format_box_2d, format_box_3d

_BOX3D = re.compile(r"^\s*\[\s*(-?\d+(?:\.\d+)?\s*,\s*){5}-?\d+(?:\.\d+)?\s*\]\s*\.?\s*$")
_BOX2D = re.compile(r"^\s*\{(\s*<\s*\d{1,3}\s*>){4}\s*\}\s*\.?\s*$")


def box_text(box: Sequence[float], kind: str = "image3d") -> str:
    """A box head's box ``[z1, y1, x1, z2, y2, x2]`` (0-1 of the model input) as the model's box text:
    3D ``[z1, y1, x1, z2, y2, x2]`` for ``image3d``, 2D ``{<x1><y1><x2><y2>}`` (0-100) for ``image``
    (a 2D encoder's box spans its one slice, so z is dropped)."""
    b = [float(v) for v in box]
    if kind == "image":
        return format_box_2d([b[2] * 100, b[1] * 100, b[5] * 100, b[4] * 100])
    return format_box_3d(b)


def box_ref_token(label: str) -> str:
    """The reference token of a finding label: ``<|box:nodule|>``."""
    return f"<|box:{label}|>"


def check_labels(labels: Any) -> list[str]:
    """Validate ``box_refs`` labels: a non-empty list of distinct, non-empty strings without ``|``."""
    if not isinstance(labels, (list, tuple)) or not labels:
        raise ConfigError(f"box_refs must be a non-empty list of finding labels (the encoder's dense_tokens "
                          f"labels, in its order), got {labels!r}")
    out = [str(x) for x in labels]
    if any(not x.strip() or "|" in x or x != x.strip() for x in out) or len(set(out)) != len(out):
        raise ConfigError(f"box_refs labels must be distinct, non-empty and without '|' or outer spaces, got {out}")
    return out


def add_box_ref_tokens(tokenizer: Any, labels: Sequence[str] | None, vocab_size: int | None = None) -> int:
    """Make sure ``tokenizer`` has each label's reference token (as an ordinary added token, so that
    decoding keeps it); tokens it lacks are appended in label order. Returns how many were added;
    raises when the vocabulary would outgrow the LLM's ``vocab_size``."""
    if not labels:
        return 0
    vocab = tokenizer.get_vocab()
    missing = [box_ref_token(l) for l in labels if box_ref_token(l) not in vocab]
    if vocab_size is not None and len(tokenizer) + len(missing) > vocab_size:
        raise ConfigError(f"the tokenizer ({len(tokenizer)} tokens) plus {len(missing)} box reference tokens exceed "
                          f"the LLM's vocab_size {vocab_size}; raise vocab_size")
    return tokenizer.add_tokens(missing, special_tokens=False) if missing else 0


def resolve_box_refs(text: str, boxes: Any, labels: Sequence[str], kind: str = "image3d") -> str:
    """Replace each ``<|box:LABEL|>`` in ``text`` by the box of that label (``boxes`` [K, 6], the
    labels' order) in the model's box text for inputs of ``kind`` (:func:`box_text`: 3D for a CT,
    2D for a radiograph); text without references is returned unchanged."""
    if "<|box:" not in text:
        return text
    for k, label in enumerate(labels):
        tok = box_ref_token(label)
        if tok in text:
            text = text.replace(tok, box_text(boxes[k], kind))
    return text


def _named_labels(question: str, labels: Sequence[str]) -> list[str]:
    q = question.lower()
    return [l for l in labels if re.search(r"\b" + re.escape(l.lower()) + r"s?\b", q)]


def refer_box_answers(conversations: list[dict], labels: Sequence[str]) -> tuple[list[dict], int]:
    """Training rows for ``box_refs``: each answer that is a box (3D: six numbers in brackets; 2D:
    ``{<x1><y1><x2><y2>}``) after a question naming exactly one label becomes that label's reference
    token. Returns (a new list of turns, how many answers changed); other turns are kept as they are."""
    out = list(conversations)
    n = 0
    for t in range(1, len(out)):
        a, q = out[t], out[t - 1]
        value = str(a.get("value", ""))
        if a.get("from") != "gpt" or q.get("from") != "human" or not (_BOX3D.match(value) or _BOX2D.match(value)):
            continue
        named = _named_labels(str(q.get("value", "")), labels)
        if len(named) == 1:
            out[t] = dict(a, value=box_ref_token(named[0]))
            n += 1
    return out, n
