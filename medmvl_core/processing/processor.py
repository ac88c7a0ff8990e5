"""The processor: conversation + pixels -> model inputs, used by training, inference and the worker.

``encode`` gives MedM-VL's exact ids and labels (one sentinel per placeholder); ``__call__``
expands every placeholder into ``num_image_tokens[kind]`` copies of its sentinel (labels -100,
attention 1), truncates to ``max_length`` and preprocesses the pixels through
:mod:`medmvl_core.imaging`; ``collate`` pads a batch on the left or the right.

Differences from MedM-VL, on purpose:

- a tokenization mismatch raises :class:`TokenizationMismatchError` (``on_mismatch="mask"``
  reproduces MedM-VL's all-ignored labels and reports ``tokenization_mismatch=True``);
- truncation happens once, after expansion, and raises :class:`SequenceTooLongError` when it
  would cut into or drop an image run (MedM-VL would feed a partial image);
- the attention mask is 1 on every token of the sample; MedM-VL derives it from
  ``input_ids != pad_id`` and so also hides (and drops) a literal pad token inside the text.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medmvl_core.errors import CheckpointError, ConfigError, DataError, PlaceholderError, SequenceTooLongError
from medmvl_core.processing.constants import GPT, HUMAN, ID_TO_KIND, IGNORE_INDEX, KIND_TO_ID
from medmvl_core.processing.conversation import check_placeholders, validate_conversation
from medmvl_core.processing.templates import ChatTemplate, OnMismatch, get_template

logger = logging.getLogger(__name__)

CONFIG_NAME = "processor_config.json"
_PAD_RULES = {"llama3": "eos", "phi": "unk"}


def apply_medmvl_tokenizer_rules(tokenizer: Any, llm_type: str) -> Any:
    """Set the pad token as MedM-VL's loaders do (``lvlm/model/llm/*.py``): Llama-3 pads with its
    eos, Phi-2 with its unk; the other LLM types keep the tokenizer's own pad. Returns the tokenizer."""
    source = _PAD_RULES.get(llm_type)
    if source == "eos":
        tokenizer.pad_token = tokenizer.eos_token
    elif source == "unk":
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


class MedMVLProcessor:
    """Tokenizer + chat template + placeholder expansion + image preprocessing + batching.

    Args:
        tokenizer: a transformers tokenizer (MedM-VL loads the slow one; the fast one gives the
            same ids on the reference fixture).
        template: a registered template name (``qwen2``, ``llama3``, ``llama``, ``phi``, ``phi3``,
            ``pretrain``, ``pretrain_image3d``).
        num_image_tokens: ``{"image": N, "image3d": M}``, the number of feature rows the model's
            connector yields per 2D image / per volume (``model.num_image_tokens(kind)``).
        preprocessing: ``{"image": spec, "image3d": spec}`` for :func:`medmvl_core.imaging.preprocess`.
        padding_side: ``"right"`` (training) or ``"left"`` (batched generation).
        max_length: maximum sequence length after expansion (MedM-VL's ``llm_max_length``); None = no limit.
    """

    def __init__(
        self,
        tokenizer: Any,
        template: str | ChatTemplate = "qwen2",
        num_image_tokens: Mapping[str, int] | None = None,
        preprocessing: Mapping[str, Any] | None = None,
        padding_side: str = "right",
        max_length: int | None = 512,
    ):
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.num_image_tokens = _check_num_image_tokens(num_image_tokens)
        self.preprocessing = dict(preprocessing or {})
        self.padding_side = _check_padding_side(padding_side)
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ConfigError(f"max_length must be a positive integer or None, got {max_length!r}")
        self.max_length = max_length

    # -- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable settings written to ``processor_config.json``."""
        return {
            "processor_class": type(self).__name__,
            "template": self.template.name,
            "num_image_tokens": dict(self.num_image_tokens),
            "preprocessing": self.preprocessing,
            "padding_side": self.padding_side,
            "max_length": self.max_length,
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``processor_config.json`` and the tokenizer files into ``save_directory``."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        self.tokenizer.save_pretrained(str(path))

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, use_fast: bool = False, **overrides: Any
    ) -> "MedMVLProcessor":
        """Load a processor saved by :meth:`save_pretrained` (offline; ``overrides`` replace saved settings)."""
        from transformers import AutoTokenizer

        path = Path(directory)
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise CheckpointError(
                f"{config_file} not found: {path} is not a processor saved by MedMVLProcessor.save_pretrained; "
                "to read a MedM-VL checkpoint folder use medmvl_core.model.load_checkpoint"
            )
        try:
            settings = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_file} is not valid JSON ({exc}); re-save the processor") from None
        settings.pop("processor_class", None)
        settings.update(overrides)
        tokenizer = AutoTokenizer.from_pretrained(
            str(path), use_fast=use_fast, trust_remote_code=False, local_files_only=True
        )
        return cls(tokenizer, **settings)

    # -- text -------------------------------------------------------------------------------------
    def prompt(self, conversations: Sequence[Mapping[str, Any]], add_generation_prompt: bool | None = None) -> str:
        """MedM-VL's prompt string (byte-identical). A conversation ending with a question gets the
        generation prompt ``ASSISTANT:``; ``add_generation_prompt`` (if given) must agree with that."""
        last = None if add_generation_prompt is None else (HUMAN if add_generation_prompt else GPT)
        conversations = validate_conversation(conversations, last=last)
        return self.template.render(conversations)

    def encode(
        self,
        conversations: Sequence[Mapping[str, Any]],
        mode: str = "train",
        on_mismatch: OnMismatch = "raise",
    ) -> dict[str, Any]:
        """MedM-VL's ids and labels, one sentinel (-200 / -201) per placeholder, not truncated.

        Returns ``{"prompt", "input_ids": list[int], "labels": list[int], "tokenization_mismatch": bool}``;
        in ``generate`` mode (conversation ending with a question) every label is -100.
        """
        if mode not in ("train", "generate"):
            raise ValueError(f"mode must be 'train' or 'generate', got {mode!r}")
        conversations = validate_conversation(conversations, last=GPT if mode == "train" else HUMAN)
        encoded = self.template.encode(
            conversations, self.tokenizer, mode=mode, max_length=self._mismatch_limit(), on_mismatch=on_mismatch
        )
        labels = encoded.labels if encoded.labels is not None else [IGNORE_INDEX] * len(encoded.input_ids)
        return {
            "prompt": encoded.prompt,
            "input_ids": encoded.input_ids,
            "labels": labels,
            "tokenization_mismatch": encoded.tokenization_mismatch,
        }

    def _mismatch_limit(self) -> int:
        # MedM-VL compares against tokenizer.model_max_length, which it sets to llm_max_length.
        if self.max_length is not None:
            return self.max_length
        return int(getattr(self.tokenizer, "model_max_length", 1 << 30))

    def expand(self, input_ids: Sequence[int], labels: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
        """Replace each sentinel by ``num_image_tokens[kind]`` copies (labels -100 there)."""
        labels = list(labels) if labels is not None else [IGNORE_INDEX] * len(input_ids)
        if len(labels) != len(input_ids):
            raise ValueError(f"labels ({len(labels)}) and input_ids ({len(input_ids)}) differ in length")
        ids_out: list[int] = []
        labels_out: list[int] = []
        for token, label in zip(input_ids, labels):
            kind = ID_TO_KIND.get(token)
            if kind is None:
                ids_out.append(token)
                labels_out.append(label)
                continue
            n = self.num_image_tokens.get(kind)
            if n is None:
                raise PlaceholderError(
                    f"the text has a {kind} placeholder but this processor has no num_image_tokens[{kind!r}] "
                    "(the model has no encoder for that kind of input); remove the placeholder or use a "
                    "checkpoint that accepts it"
                )
            ids_out.extend([token] * n)
            labels_out.extend([IGNORE_INDEX] * n)
        return ids_out, labels_out

    def truncate(self, input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """Cut expanded ids/labels to ``max_length``; raise if that would cut into or drop an image run."""
        limit = self.max_length
        if limit is None or len(input_ids) <= limit:
            return input_ids, labels
        if any(token in ID_TO_KIND for token in input_ids[limit:]):
            raise SequenceTooLongError(
                f"the sample has {len(input_ids)} tokens after image expansion and max_length is {limit}; "
                "truncating would cut into an image's placeholder tokens. Shorten the text before the "
                "image, or raise max_length (at most the LLM's context length)."
            )
        logger.debug("truncated a sample from %d to %d tokens", len(input_ids), limit)
        return input_ids[:limit], labels[:limit]

    # -- pixels -----------------------------------------------------------------------------------
    def preprocess_image(self, x: Any) -> tuple[np.ndarray, Any]:
        """A 2D image (path, Volume, or array [H, W] / [H, W, 3]) -> (array [3, H, W], GeometryRecord)."""
        return self._preprocess(x, "image", None)

    def preprocess_volume(self, x: Any, roi: Any = None, augment: Any = None) -> tuple[np.ndarray, Any]:
        """A volume (path, Volume, or HU array [D, H, W]) -> (array [C, D, H, W], GeometryRecord).

        ``roi``: voxel box ``(k1, j1, i1, k2, j2, i2)``; ``augment``: train-mode rot90/flip
        parameters (``medmvl_core.imaging.draw_augment``), None at inference."""
        return self._preprocess(x, "image3d", roi, augment)

    def _preprocess(self, x: Any, kind: str, roi: Any, augment: Any = None) -> tuple[np.ndarray, Any]:
        from medmvl_core import imaging

        spec = self.preprocessing.get(kind)
        if spec is None:
            raise ConfigError(
                f"this processor has no preprocessing spec for {kind!r} inputs (preprocessing keys: "
                f"{sorted(self.preprocessing)}); the checkpoint does not take {kind} inputs"
            )
        volume = _as_volume(x, kind, imaging)
        if augment is not None:
            return imaging.preprocess(volume, spec, roi, augment=augment)
        return imaging.preprocess(volume, spec, roi)

    @staticmethod
    def _items(x: Any, kind: str) -> list[Any]:
        """The inputs of one kind as a list (a stacked tensor is split, nothing is preprocessed)."""
        import torch

        if x is None:
            return []
        if isinstance(x, torch.Tensor):
            per_item_dims = 3 if kind == "image" else 4
            if x.dim() == per_item_dims:
                return [x]
            if x.dim() == per_item_dims + 1:
                return list(x)
            raise DataError(
                f"a preprocessed {kind} tensor must have {per_item_dims} dims (one) or "
                f"{per_item_dims + 1} (several), got shape {tuple(x.shape)}"
            )
        return list(x) if isinstance(x, (list, tuple)) else [x]

    def _pixels(self, items: list[Any], kind: str, roi: Any, augment: Any = None) -> tuple[list[Any], list[Any]]:
        """Preprocessed tensors (one per input) and their geometry records (None for given tensors)."""
        import torch

        tensors, geometries = [], []
        for item in items:
            if isinstance(item, torch.Tensor):
                tensors.append(item)
                geometries.append(None)
                continue
            array, geometry = self._preprocess(item, kind, roi, augment)
            tensors.append(torch.as_tensor(np.asarray(array)))
            geometries.append(geometry)
        return tensors, geometries

    # -- samples and batches -----------------------------------------------------------------------
    def __call__(
        self,
        conversations: Sequence[Mapping[str, Any]],
        image: Any = None,
        image3d: Any = None,
        mode: str = "generate",
        roi: Any = None,
        on_mismatch: OnMismatch = "raise",
        augment: Any = None,
    ) -> dict[str, Any]:
        """Model inputs for one sample.

        ``image`` / ``image3d``: None, one input or a list of inputs, each a path, a Volume, a raw
        array (preprocessed here) or an already preprocessed tensor ([3, H, W] / [C, D, H, W], or
        a stacked batch of them). ``roi`` and ``augment`` apply to the volumes.

        Returns ``input_ids``, ``attention_mask`` (LongTensor [L]), ``labels`` (LongTensor [L]
        in ``train`` mode, None in ``generate`` mode), ``images`` (Tensor [n, 3, H, W] or None),
        ``images3d`` (Tensor [m, C, D, H, W] or None), ``geometry`` ({"image": [...],
        "image3d": [...]}, one record per input, None for given tensors) and
        ``tokenization_mismatch`` (bool; True only with ``on_mismatch="mask"``).
        """
        import torch

        # text first: a bad conversation fails before any (slow) image preprocessing
        image_items, volume_items = self._items(image, "image"), self._items(image3d, "image3d")
        conversations = validate_conversation(conversations)
        # count in the rendered prompt: the pretrain templates put their own placeholder there
        check_placeholders([{"value": self.template.render(conversations)}], len(image_items), len(volume_items))
        encoded = self.encode(conversations, mode=mode, on_mismatch=on_mismatch)
        ids, labels = self.truncate(*self.expand(encoded["input_ids"], encoded["labels"]))
        images, geom_2d = self._pixels(image_items, "image", None)
        volumes, geom_3d = self._pixels(volume_items, "image3d", roi, augment)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.ones(len(ids), dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long) if mode == "train" else None,
            "images": torch.stack(images) if images else None,
            "images3d": torch.stack(volumes) if volumes else None,
            "geometry": {"image": geom_2d, "image3d": geom_3d},
            "tokenization_mismatch": encoded["tokenization_mismatch"],
        }

    def collate(self, samples: Sequence[Mapping[str, Any]], padding_side: str | None = None) -> dict[str, Any]:
        """Pad samples from :meth:`__call__` into a batch.

        Returns exactly the model's inputs, so ``model(**batch)`` / ``model.generate(**batch)``
        work: ``input_ids`` (padded with the tokenizer's pad id), ``attention_mask`` (1 on real
        tokens and placeholders, 0 on padding), LongTensor [B, L]; ``labels`` (-100 on padding,
        only when every sample has labels, i.e. ``train`` mode); ``images`` / ``images3d``
        concatenated over the batch in sample order (or None). Per-sample ``geometry`` and
        ``tokenization_mismatch`` stay in the samples (count skips there).
        """
        import torch

        if not samples:
            raise DataError("collate needs at least one sample")
        side = _check_padding_side(padding_side or self.padding_side)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ConfigError(
                "the tokenizer has no pad token; set one (MedM-VL: Llama-3 pads with eos, Phi-2 with unk; "
                "see apply_medmvl_tokenizer_rules)"
            )
        length = max(int(s["input_ids"].shape[0]) for s in samples)
        with_labels = all(s.get("labels") is not None for s in samples)
        batch = {
            "input_ids": torch.full((len(samples), length), pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(samples), length), dtype=torch.long),
        }
        if with_labels:
            batch["labels"] = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        for row, sample in enumerate(samples):
            n = int(sample["input_ids"].shape[0])
            cols = slice(length - n, length) if side == "left" else slice(0, n)
            batch["input_ids"][row, cols] = sample["input_ids"]
            batch["attention_mask"][row, cols] = sample.get("attention_mask", torch.ones(n, dtype=torch.long))
            if with_labels:
                batch["labels"][row, cols] = sample["labels"]
        for key in ("images", "images3d"):
            parts = [s[key] for s in samples if s.get(key) is not None]
            try:
                batch[key] = torch.cat(parts) if parts else None
            except RuntimeError as exc:
                raise DataError(
                    f"the {key} of this batch have different shapes ({[tuple(p.shape[1:]) for p in parts]}); "
                    "preprocess them with the same spec"
                ) from exc
        return batch

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True) -> list[str]:
        """Decode generated ids (new tokens only, as the model returns them) to text."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(template={self.template.name!r}, num_image_tokens={self.num_image_tokens}, "
            f"padding_side={self.padding_side!r}, max_length={self.max_length})"
        )


def _check_num_image_tokens(value: Mapping[str, int] | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for kind, n in dict(value or {}).items():
        if kind not in KIND_TO_ID:
            raise ConfigError(f"num_image_tokens has unknown kind {kind!r}; valid kinds: {sorted(KIND_TO_ID)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"num_image_tokens[{kind!r}] must be a positive integer, got {n!r}")
        out[kind] = n
    return out


def _check_padding_side(side: str) -> str:
    if side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', got {side!r}")
    return side


def _as_volume(x: Any, kind: str, imaging: Any) -> Any:
    """A path is read, a Volume passes through, an array becomes a Volume with unit geometry."""
    if isinstance(x, (str, os.PathLike)):
        return imaging.read_image(str(x))
    volume_cls = imaging.Volume
    if isinstance(x, volume_cls):
        return x
    array = np.asarray(x)
    if kind == "image":
        if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3 and array.shape[0] != 1):
            array = array[None]
        if not (array.ndim == 3 or (array.ndim == 4 and array.shape[-1] == 3)):
            raise DataError(f"a 2D image array must be [H, W] or [H, W, 3], got shape {array.shape}")
        modality = "photo" if array.ndim == 4 else "XR"
    else:
        if array.ndim != 3:
            raise DataError(f"a volume array must be [D, H, W] (slice, row, column), got shape {array.shape}")
        modality = "CT"
    return volume_cls(
        array=array,
        spacing=(1.0, 1.0, 1.0),
        origin=(0.0, 0.0, 0.0),
        direction=np.eye(3),
        modality=modality,
        source="array",
    )
