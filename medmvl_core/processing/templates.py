"""Chat templates: MedM-VL's prompts, token ids and label masks, reproduced exactly.

MedM-VL (``lvlm/dataset/template/*.py``, HEAD 225fc0f) uses one Vicuna-style layout for every
chat LLM and changes only the end-of-answer string::

    <system> USER: <q1> ASSISTANT: <a1><eos>USER: <q2> ASSISTANT: <a2><eos>
    <system> USER: <q1> ASSISTANT:                       (generation prompt, no trailing space)

The two ``pretrain*`` templates replace the whole user turn by the image placeholder and append
the caption with no end-of-answer string.

Tokenization (``Template.tokenizer_special_token``): the prompt is split at the placeholders;
each text chunk is tokenized on its own (so ``"USER: "`` ends with a lone space token before the
placeholder), the placeholders become one sentinel id each, and a tokenizer that adds a BOS gets
exactly one, at the very start, only when the prompt starts with text.

Label masking (``Template.make_labels``): the prompt is cut at every end-of-answer string; in
each round the text up to and including the separator `` ASSISTANT:`` is masked, the answer
(from its space-prefixed first token) and the end-of-answer token stay supervised. When the
lengths computed per round do not add up to the whole sequence MedM-VL prints a warning and
masks the whole sample; here that is a :class:`TokenizationMismatchError` (or, with
``on_mismatch="mask"``, MedM-VL's masking with the fact reported in the result).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from medmvl_core.errors import RegistryError, TokenizationMismatchError
from medmvl_core.processing.constants import (
    HUMAN,
    IGNORE_INDEX,
    IMAGE3D_PLACEHOLDER,
    IMAGE_PLACEHOLDER,
    PLACEHOLDER_IDS,
)

logger = logging.getLogger(__name__)

CONTENT = "{{content}}"
GENERATION_PROMPT = "ASSISTANT:"
"""What MedM-VL appends after the last question when there is no answer (every template)."""

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

_PLACEHOLDER_SPLIT = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDER_IDS) + ")")

OnMismatch = Literal["raise", "mask"]


@dataclass(frozen=True)
class EncodedText:
    """Token ids of one conversation, before placeholder expansion (one sentinel per placeholder).

    ``labels`` is ``None`` in generation mode. ``tokenization_mismatch`` is True only when
    ``on_mismatch="mask"`` let a mismatching sample through with all labels ignored.
    """

    prompt: str
    input_ids: list[int]
    labels: list[int] | None
    tokenization_mismatch: bool = False


def split_questions_answers(conversations: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """MedM-VL's ``get_list_from_message``: a first non-human turn is dropped, then turns alternate
    question / answer by position (roles after the first are not looked at; validate first)."""
    questions: list[str] = []
    answers: list[str] = []
    skip_first = 0
    for i, turn in enumerate(conversations):
        if i == 0 and turn["from"] != HUMAN:
            skip_first = 1
            continue
        (questions if i % 2 == skip_first else answers).append(turn["value"])
    return questions, answers


def adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer puts its BOS first (MedM-VL's ``"test string"`` probe)."""
    ids = tokenizer("test string").input_ids
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def tokenize_with_placeholders(text: str, tokenizer: Any, bos: bool | None = None) -> list[int]:
    """Token ids of ``text`` with each placeholder as one sentinel id (-200 / -201).

    Text chunks between placeholders are tokenized separately; at most one BOS, at position 0,
    and only when the text starts with a non-placeholder chunk (MedM-VL's behaviour).
    """
    if bos is None:
        bos = adds_bos(tokenizer)
    offset = 1 if bos else 0
    ids: list[int] = []
    for chunk in _PLACEHOLDER_SPLIT.split(text):
        if chunk in PLACEHOLDER_IDS:
            ids.append(PLACEHOLDER_IDS[chunk])
        elif chunk:
            if not ids and bos:
                ids.append(tokenizer.bos_token_id)
            ids.extend(tokenizer(chunk).input_ids[offset:])
    return ids


@dataclass(frozen=True)
class ChatTemplate:
    """One MedM-VL conversation template.

    ``user`` / ``assistant`` are slots where the first ``{{content}}`` is replaced by the
    (stripped) turn text; with ``fixed_user`` the user slot is emitted as is (pretraining: the
    question is replaced by the placeholder). ``separator`` and ``eos`` drive the label masks.
    """

    name: str
    system: str
    user: str
    assistant: str
    separator: str
    eos: str
    fixed_user: bool = False

    # -- prompt -------------------------------------------------------------------------------
    def build_prompt(self, questions: Sequence[str], answers: Sequence[str]) -> str:
        """MedM-VL's ``Template.prompt``: one more question than answers adds the generation prompt."""
        answers = list(answers)
        if len(questions) == len(answers) + 1:
            answers.append("")
        msg = ""
        for i, (question, answer) in enumerate(zip(questions, answers)):
            if i == 0:
                msg += self.system
            question = question.strip()
            answer = answer.strip()
            msg += self.user if self.fixed_user else self.user.replace(CONTENT, question, 1)
            msg += self.assistant.replace(CONTENT, answer, 1) if answer else GENERATION_PROMPT
        return msg

    def render(self, conversations: Sequence[Mapping[str, Any]]) -> str:
        """The prompt string of a MedM-VL conversation (``[{"from", "value"}, ...]``)."""
        return self.build_prompt(*split_questions_answers(conversations))

    # -- ids and labels -----------------------------------------------------------------------
    def encode(
        self,
        conversations: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        mode: Literal["train", "generate"] = "train",
        max_length: int | None = None,
        on_mismatch: OnMismatch = "raise",
    ) -> EncodedText:
        """Prompt, ids (one sentinel per placeholder) and, in ``train`` mode, labels.

        ``max_length`` plays the role of MedM-VL's ``tokenizer.model_max_length``: the mismatch
        check is skipped when the masked length reaches it (default: the tokenizer's value).
        """
        prompt = self.render(conversations)
        bos = adds_bos(tokenizer)
        input_ids = tokenize_with_placeholders(prompt, tokenizer, bos)
        if mode == "generate":
            return EncodedText(prompt, input_ids, None)
        if mode != "train":
            raise ValueError(f"mode must be 'train' or 'generate', got {mode!r}")
        if max_length is None:
            max_length = int(getattr(tokenizer, "model_max_length", 1 << 30))
        labels, cur_len, total_len = self._make_labels(input_ids, prompt, tokenizer, bos)
        mismatch = cur_len < max_length and cur_len != total_len
        if mismatch:
            message = (
                f"tokenization mismatch in template {self.name!r}: the per-round label masks cover "
                f"{cur_len} tokens but the sample has {total_len}. MedM-VL would silently ignore every "
                "label of this sample. Check that no answer or question contains the separator "
                f"{self.separator!r} or the end-of-answer string {self.eos!r}, that the last turn is an "
                "answer, and that the tokenizer matches the template."
            )
            if on_mismatch == "raise":
                raise TokenizationMismatchError(message)
            logger.warning("%s (sample kept with all labels ignored)", message.split(". MedM-VL")[0])
            labels = [IGNORE_INDEX] * len(input_ids)
        return EncodedText(prompt, input_ids, labels, mismatch)

    def _make_labels(
        self, input_ids: list[int], prompt: str, tokenizer: Any, bos: bool
    ) -> tuple[list[int], int, int]:
        """Labels plus the masked length and the expected length (MedM-VL's ``make_labels``)."""
        labels = list(input_ids)
        n = len(labels)
        if self.fixed_user:
            # Pretraining: only the placeholder is masked, and there is no consistency check.
            instruction_len = len(tokenize_with_placeholders(self.user, tokenizer, bos))
            for i in range(min(instruction_len, n)):
                labels[i] = IGNORE_INDEX
            return labels, n, n

        pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        total_len = sum(1 for t in labels if t != pad_id)
        if pad_id == eos_id:
            total_len += prompt.count(self.eos)
        eos_token_length = len(tokenizer.encode(self.eos))

        def mask(start: int, stop: int) -> None:
            for i in range(max(start, 0), min(stop, n)):
                labels[i] = IGNORE_INDEX

        cur = 0
        for idx, round_text in enumerate(prompt.split(self.eos)):
            if round_text == "":
                break
            parts = round_text.split(self.separator)
            if len(parts) != 2:
                break
            instruction = parts[0] + self.separator
            round_len = len(tokenize_with_placeholders(round_text, tokenizer, bos)) + 1
            instruction_len = len(tokenize_with_placeholders(instruction, tokenizer, bos))
            if eos_token_length > 1 and idx != 0:
                # a tokenizer that adds a BOS counted one per round; only round 0 has it
                round_len -= 1
                instruction_len -= 1
            mask(cur, cur + instruction_len)
            cur += round_len
        mask(cur, n)
        return labels, cur, total_len


def _chat(name: str, eos: str) -> ChatTemplate:
    return ChatTemplate(
        name=name,
        system=VICUNA_SYSTEM + " ",
        user="USER: " + CONTENT + " ",
        assistant="ASSISTANT: " + CONTENT + eos,
        separator=" ASSISTANT:",
        eos=eos,
    )


def _pretrain(name: str, placeholder: str) -> ChatTemplate:
    return ChatTemplate(
        name=name, system="", user=placeholder, assistant=CONTENT, separator="", eos="", fixed_user=True
    )


TEMPLATES: dict[str, ChatTemplate] = {}
"""Name -> template. Names are MedM-VL's ``conv_version`` values."""


def register_template(template: ChatTemplate) -> ChatTemplate:
    """Add a template under ``template.name``; a name that is taken raises :class:`RegistryError`."""
    if template.name in TEMPLATES:
        raise RegistryError(
            f"a chat template named {template.name!r} is already registered; pick another name",
            code="duplicate_name",
        )
    TEMPLATES[template.name] = template
    return template


def get_template(name: str | ChatTemplate) -> ChatTemplate:
    """The registered template ``name`` (a template passes through); unknown names raise."""
    if isinstance(name, ChatTemplate):
        return name
    try:
        return TEMPLATES[name]
    except (KeyError, TypeError):
        raise RegistryError(
            f"unknown chat template {name!r}; valid names: {', '.join(sorted(TEMPLATES))}"
        ) from None


for _t in (
    _pretrain("pretrain", IMAGE_PLACEHOLDER),
    _pretrain("pretrain_image3d", IMAGE3D_PLACEHOLDER),
    _chat("llama", "</s>"),
    _chat("llama3", "<|eot_id|>"),
    _chat("qwen2", "<|im_end|>"),
    _chat("phi", "<|endoftext|>"),
    _chat("phi3", "<|endoftext|>"),
):
    register_template(_t)
del _t

__all__ = [
    "ChatTemplate",
    "EncodedText",
    "GENERATION_PROMPT",
    "TEMPLATES",
    "VICUNA_SYSTEM",
    "adds_bos",
    "get_template",
    "register_template",
    "split_questions_answers",
    "tokenize_with_placeholders",
]
