"""MedM-VL JSON data items: validation and the inference split.

A data item (MedM-VL's dataset format) looks like::

    {"id": "...", "conversations": [{"from": "human", "value": "<image3d>\\nQuestion"},
                                    {"from": "gpt", "value": "Answer"}, ...],
     "image3d": ["volume.npy"]}          # or "image": ["picture.png"]

These helpers check what MedM-VL takes for granted (it silently drops a first non-human turn,
pairs turns by position and ignores extra questions) and split inference items the way
``lvlm/inference.py`` does.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

from medmvl_core.errors import DataError, PlaceholderError
from medmvl_core.processing.constants import GPT, HUMAN, KIND_TO_PLACEHOLDER

Conversation = list[dict[str, str]]


def count_placeholders(conversations: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Number of ``<image>`` and ``<image3d>`` placeholders over all turns: ``{"image": n, "image3d": m}``."""
    counts = {kind: 0 for kind in KIND_TO_PLACEHOLDER}
    for turn in conversations:
        value = turn.get("value") if isinstance(turn, Mapping) else None
        if isinstance(value, str):
            for kind, placeholder in KIND_TO_PLACEHOLDER.items():
                counts[kind] += value.count(placeholder)
    return counts


def check_placeholders(
    conversations: Sequence[Mapping[str, Any]], num_images: int = 0, num_images3d: int = 0
) -> None:
    """Raise :class:`PlaceholderError` unless there is one placeholder per image and per volume."""
    counts = count_placeholders(conversations)
    given = {"image": num_images, "image3d": num_images3d}
    problems = [
        f"{counts[kind]} {KIND_TO_PLACEHOLDER[kind]} placeholder(s) for {given[kind]} {kind} input(s)"
        for kind in KIND_TO_PLACEHOLDER
        if counts[kind] != given[kind]
    ]
    if problems:
        raise PlaceholderError(
            "the conversation does not match its images: "
            + "; ".join(problems)
            + ". Put exactly one placeholder (<image> for a 2D image, <image3d> for a volume) in the "
            "text for each image passed, in the order the images are given."
        )


def validate_conversation(
    conversations: Any,
    num_images: int | None = None,
    num_images3d: int | None = None,
    last: str | None = None,
) -> Conversation:
    """Check a MedM-VL conversation and return it as a list of ``{"from", "value"}`` dicts.

    Turns must be dicts with ``"from"`` in ``{"human", "gpt"}`` and a string ``"value"``,
    starting with ``human`` and alternating. ``last`` (``"human"`` or ``"gpt"``) requires the
    role of the final turn (``"human"`` for generation, ``"gpt"`` for training). When
    ``num_images`` / ``num_images3d`` are given the placeholders are counted against them.
    Raises :class:`DataError` (structure) or :class:`PlaceholderError` (counts).
    """
    if not isinstance(conversations, Sequence) or isinstance(conversations, (str, bytes)) or not conversations:
        raise DataError(
            "conversations must be a non-empty list of {'from': 'human'|'gpt', 'value': str} turns, "
            f"got {type(conversations).__name__}"
        )
    out: Conversation = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise DataError(f"turn {i} must be a dict with keys 'from' and 'value', got {turn!r:.80}")
        role, value = turn["from"], turn["value"]
        if role not in (HUMAN, GPT):
            raise DataError(f"turn {i} has role {role!r}; MedM-VL conversations use only 'human' and 'gpt'")
        if not isinstance(value, str):
            raise DataError(f"turn {i} ('{role}') must have a string value, got {type(value).__name__}")
        expected = HUMAN if i % 2 == 0 else GPT
        if role != expected:
            raise DataError(
                f"turn {i} is from {role!r} but {expected!r} was expected: conversations start with a "
                "'human' turn and alternate human/gpt"
            )
        out.append({"from": role, "value": value})
    if last is not None and out[-1]["from"] != last:
        want = "a question (generation)" if last == HUMAN else "an answer (training)"
        raise DataError(
            f"the last turn is from {out[-1]['from']!r} but {want} needs it to be from {last!r}; "
            + ("drop the trailing answer (see split_inference_item)" if last == HUMAN else "add the answer")
        )
    if num_images is not None or num_images3d is not None:
        check_placeholders(out, num_images or 0, num_images3d or 0)
    return out


def validate_item(item: Mapping[str, Any], last: str | None = None) -> Conversation:
    """Validate a MedM-VL data item: its conversation, and placeholders against ``image`` / ``image3d`` lists."""
    if not isinstance(item, Mapping) or "conversations" not in item:
        raise DataError("a data item must be a dict with a 'conversations' list (MedM-VL JSON format)")
    counts = {}
    for kind in KIND_TO_PLACEHOLDER:
        files = item.get(kind, [])
        if isinstance(files, str):
            files = [files]
        if not isinstance(files, Sequence):
            raise DataError(f"item field {kind!r} must be a list of file names, got {type(files).__name__}")
        counts[kind] = len(files)
    try:
        return validate_conversation(item["conversations"], counts["image"], counts["image3d"], last=last)
    except (DataError, PlaceholderError) as exc:
        raise type(exc)(f"item {item.get('id', '?')!r}: {exc}") from None


def split_inference_item(item: Mapping[str, Any]) -> tuple[Conversation, str]:
    """Split an inference item as ``lvlm/inference.py`` does: ``(conversations, answer)``.

    A trailing ``gpt`` turn is removed and becomes the answer; an explicit ``"answer"`` field of
    the item takes precedence (MedM-VL keeps an existing ``answer``). With no answer anywhere the
    answer is ``""``. The item is not modified.
    """
    if not isinstance(item, Mapping) or not isinstance(item.get("conversations"), Sequence):
        raise DataError("an inference item must be a dict with a 'conversations' list")
    conversations = copy.deepcopy(list(item["conversations"]))
    answer = ""
    if conversations and isinstance(conversations[-1], Mapping) and conversations[-1].get("from") == GPT:
        answer = conversations.pop()["value"]
    if "answer" in item:
        answer = item["answer"]
    return conversations, answer


def multiturn_questions(item: Mapping[str, Any]) -> list[str]:
    """The human turns of an item, in order, as ``lvlm/inference_multiturn.py`` replays them.

    MedM-VL takes the values at positions 0, 2, 4, ... (``(len + 1) // 2`` questions), generates
    an answer after each and appends it (stripped) before asking the next one.
    """
    if not isinstance(item, Mapping) or not isinstance(item.get("conversations"), Sequence):
        raise DataError("an inference item must be a dict with a 'conversations' list")
    turns = validate_conversation(item["conversations"])
    return [turn["value"] for turn in turns[0::2]]
