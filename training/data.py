"""Training data for a run: records of every dataset, row checks, the per-step batch plan, collate.

Batch plan: the epoch's order is ``mixture_plan(sizes, ratios, epoch, seed)``; optimizer step ``s``
of the epoch uses the global batch ``order[s*G:(s+1)*G]`` with ``G = micro_batch * grad_accum *
processes``; process ``r`` takes micro-batch ``a`` = ``order[s*G + (a*P + r)*mb : ... + mb]``.
The same global batch therefore gives the same samples whatever the number of processes, and
the data position of a run is just its step number.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from medmvl_core.data.datasets import MedMVLDataset, Record, RowProblem, TrainEncodings, _report_problems, \
    load_records, mixture_plan
from medmvl_core.errors import DataError, MedMVLError
from training.config import RunConfig

logger = logging.getLogger(__name__)


@dataclass
class TrainData:
    records: list          # all datasets' records, concatenated
    offsets: list          # start index of each dataset in ``records``
    sizes: list
    ratios: list
    skipped: int = 0
    encodings: Optional[TrainEncodings] = None  # the rows' text encodings made by check_rows, for the dataset

    def epoch_order(self, epoch: int, seed: int) -> list[int]:
        plan = mixture_plan(self.sizes, self.ratios, epoch, seed)
        return [self.offsets[d] + i for d, i in plan]

    @property
    def epoch_len(self) -> int:
        return sum(int(round(r * n)) for n, r in zip(self.sizes, self.ratios))


def check_rows(records: list[Record], processor: Any, max_length: int, on_bad_row: str,
               what: str, independent_turns: bool = False, multi_turn_share: float = 0.0,
               encodings: Optional[TrainEncodings] = None) -> tuple[list[Record], int]:
    """Encode every record once (template, label masking, expansion; each encoding the row may be
    trained with): rows that fail, are too long or have no supervised token are an error or a
    counted skip. The encodings are kept in ``encodings`` (pass it on to the dataset to reuse them)."""
    good, problems = [], []
    if encodings is None:
        encodings = TrainEncodings(processor, independent_turns)
    modes = [independent_turns] + ([False] if independent_turns and multi_turn_share > 0 else [])
    for rec in records:
        try:
            encs = [encodings.get(rec, packed, {"image": len(rec.images), "image3d": len(rec.images3d)})
                    for packed in modes]
        except (MedMVLError, ValueError) as exc:
            problems.append(RowProblem(rec.source, rec.index, rec.id, "encode_error", str(exc)))
            continue
        enc = max(encs, key=lambda e: len(e["input_ids"]))
        n = len(enc["input_ids"])
        if n > max_length:
            problems.append(RowProblem(rec.source, rec.index, rec.id, "too_long",
                                       f"{n} tokens with image tokens > model.max_length {max_length}"))
        elif all(v == -100 for v in enc["labels"][1:]):
            problems.append(RowProblem(rec.source, rec.index, rec.id, "no_supervised_tokens",
                                       "every label is masked"))
        else:
            good.append(rec)
    if problems:
        _report_problems(problems, on_bad_row, len(records), what)
    return good, len(records) - len(good)


def load_train_data(cfg: RunConfig, processor: Any, max_length: int, key: str = "datasets",
                    box_refs: Optional[list] = None) -> TrainData:
    """Records of ``data.<key>``, checked; raises or skips bad rows per ``data.on_bad_row``. With
    ``box_refs`` (the model's labels), answers that are a 3D box become the label's reference token
    (:func:`medmvl_core.model.box_refs.refer_box_answers`)."""
    records, offsets, sizes, ratios, skipped = [], [], [], [], 0
    encodings = TrainEncodings(processor, cfg.data.independent_turns)
    for i, ds in enumerate(getattr(cfg.data, key)):
        path = cfg.resolve_path(ds.path)
        recs = load_records(path, cfg.resolve_path(ds.image_dir), cfg.resolve_path(ds.image3d_dir),
                            on_bad_row=cfg.data.on_bad_row)
        n_rows = len(recs)
        if box_refs:
            from medmvl_core.model.box_refs import refer_box_answers

            changed = 0
            for r in recs:
                r.conversations, n = refer_box_answers(r.conversations, box_refs)
                changed += n
            logger.info("data %s: %d box answers trained as box references", path, changed)
        recs, bad = check_rows(recs, processor, max_length, cfg.data.on_bad_row, str(path),
                               cfg.data.independent_turns, cfg.data.multi_turn_share, encodings)
        skipped += bad
        if not recs:
            raise DataError(f"data.{key}.{i} ({path}) has no usable row; see the messages above "
                            "or run medmvl-train validate")
        logger.info("data %s: %d rows used (%d skipped)", path, len(recs), n_rows - len(recs))
        offsets.append(len(records))
        records.extend(recs)
        sizes.append(len(recs))
        ratios.append(ds.ratio)
    return TrainData(records, offsets, sizes, ratios, skipped, encodings)


def rank_micro_batches(order: list[int], step_in_epoch: int, micro_batch: int, grad_accum: int,
                       world: int, rank: int) -> list[list[int]]:
    """Dataset indices of this process's micro-batches for one optimizer step (see module doc)."""
    g = micro_batch * grad_accum * world
    base = step_in_epoch * g
    return [order[base + (a * world + rank) * micro_batch: base + (a * world + rank + 1) * micro_batch]
            for a in range(grad_accum)]


class Collator:
    """Pads text with the processor's ``collate`` and groups images per kind (pixels or cache keys)."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, samples: list[dict]) -> dict:
        text = self.processor.collate([{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples],
                                      padding_side="right")
        batch = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"], "labels": text["labels"],
                 "n_samples": len(samples), "vision": {}}
        if "segments" in samples[0]:  # independent turns: pad positions with 0, segments with -1 (padding)
            n = batch["input_ids"].shape[1]
            for key, fill in (("position_ids", 0), ("segments", -1)):
                out = torch.full((len(samples), n), fill, dtype=torch.long)
                for i, s in enumerate(samples):
                    out[i, :len(s[key])] = s[key]
                batch[key] = out
        for kind, key in (("image", "images"), ("image3d", "images3d")):
            items: list = []  # per image: a pixel tensor or a cache key (str)
            for s in samples:
                v = s.get(key)
                if v is None:
                    continue
                items.extend(list(v))
            if items:
                batch["vision"][kind] = items
        return batch


def move_batch(batch: dict, device: torch.device, cache: Optional[Any]) -> tuple[dict, dict]:
    """Model inputs on ``device``: per kind, the pixel rows to encode plus cached features in order.

    Returns (inputs, pending) where ``pending[kind]`` lists the cache keys of the pixel rows
    (None when the image has no key) so fresh features can be stored after the step.
    """
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels", "position_ids", "segments")
              if k in batch}
    vision, pending = {}, {}
    for kind, items in batch["vision"].items():
        keys = batch.get("keys", {}).get(kind) or [None] * len(items)
        pixels, cached, layout, pend = [], [], [], []
        for item, key in zip(items, keys):
            if isinstance(item, str):  # the dataset skipped the pixels: the cache has them
                cached.append(cache.get(item))
                layout.append(("c", len(cached) - 1))
            elif key is not None and cache is not None and cache.has(key):
                cached.append(cache.get(key))
                layout.append(("c", len(cached) - 1))
            else:
                pixels.append(item)
                pend.append(key)
                layout.append(("p", len(pixels) - 1))
        vision[kind] = {"pixels": torch.stack(pixels).to(device) if pixels else None, "cached": cached,
                        "layout": layout}
        pending[kind] = pend
    inputs["vision"] = vision
    return inputs, pending


def make_dataset(records: list[Record], processor: Any, cfg: RunConfig, max_length: int, cache: Optional[Any],
                 encodings: Optional[TrainEncodings] = None, pixel_cache: Optional[Any] = None) -> MedMVLDataset:
    skip = cache.has if cache is not None else None
    return MedMVLDataset(records, processor, max_length=max_length, augment=cfg.data.augment, seed=cfg.seed,
                         skip_pixels=skip, independent_turns=cfg.data.independent_turns,
                         multi_turn_share=cfg.data.multi_turn_share, encodings=encodings,
                         shuffle_choices=cfg.data.shuffle_choices, augment_flip_p=cfg.data.augment_flip_p,
                         augment_intensity=cfg.data.augment_intensity, pixel_cache=pixel_cache)


class KeyedCollator(Collator):
    """Collator that also carries each image's cache key (for storing fresh encoder outputs)."""

    def __call__(self, samples: list[dict]) -> dict:
        batch = super().__call__(samples)
        keys: dict[str, list] = {}
        for kind, key in (("image", "images"), ("image3d", "images3d")):
            ks: list = []
            for s in samples:
                v = s.get(key)
                if v is None:
                    continue
                n = len(v)
                own = [k for k in s.get("image_keys", [])]
                # image_keys lists 2D keys then 3D keys; take this kind's share
                if kind == "image":
                    ks.extend(own[:n] if own else [None] * n)
                else:
                    n2d = 0 if s.get("images") is None else len(s["images"])
                    ks.extend(own[n2d:n2d + n] if own else [None] * n)
            if ks:
                keys[kind] = ks
        batch["keys"] = keys
        return batch
