"""Batched prefill and decode steps on the plain path (transformers DynamicCache).

One forward prefills every request of a batch, whatever each one has cached:

    slot:   0 ............ P ............ P+S
    row 0:  [pad][cached prefix 0] [pad][new tokens 0]      (a follow-up)
    row 1:  [pad  pad  pad  pad  ] [   new tokens 1   ]     (a fresh question)

The cached prefixes are left-padded to the longest one (P) and copied into one batch cache; the
new tokens are left-padded to the longest suffix (S) so every row's last token sits at the last
slot (its logits are the only ones computed). When every row is fresh, the text they all open
with (the template's system prompt) is computed once, at batch 1, and used as every row's
cached prefix. The 2D attention mask marks the real slots, and the position ids count each
row's real tokens, so every row sees exactly what it would see alone.
Decoding then feeds one token per row per step (:class:`PlainBatch`), and each row's cache is
taken back out with :func:`~medmvl_core.engine.kv.row_cache`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from medmvl_core.engine.decode import run_batch_decode
from medmvl_core.engine.fast_path import FastPath, is_oom
from medmvl_core.engine.kv import row_cache, stack_caches

logger = logging.getLogger(__name__)
Result = tuple[list[int], str, int]   # (new token ids, finish reason, tokens fed into the cache)


@dataclass
class PrefillRow:
    """One request's part of a batched prefill: ``past`` holds its first ``cached`` prompt
    positions (None when nothing is cached); ``new_ids`` are the prompt ids after them
    (placeholders < 0 included); ``image_embeds`` [1, N, hidden] fill those placeholders."""

    past: Any
    cached: int
    new_ids: list[int]
    image_embeds: torch.Tensor | None = None


class PlainBatch:
    """A batch cache being decoded: ``step(tokens [B])`` -> next logits [B, vocab]."""

    def __init__(self, model: Any, cache: Any, mask: torch.Tensor, positions: torch.Tensor):
        self.model, self.cache = model, cache
        self.mask = mask              # [B, W]: 1 at every row's real slots
        self.positions = positions    # [B]: next position id per row

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; rows that are done are fed padding (never read back)."""
        b = tokens.shape[0]
        self.mask = torch.cat([self.mask, self.mask.new_ones(b, 1)], 1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask,
                         position_ids=self.positions[:, None], past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.positions = self.positions + 1
        return out.logits[:, -1, :]

    def row(self, b: int, length: int) -> Any:
        """Row ``b``'s first ``length`` real positions as its own DynamicCache (a copy)."""
        return row_cache(self.cache, self.mask, b, length)


def padded_embeds(model: Any, rows: Sequence[PrefillRow], device: torch.device,
                  pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' new tokens left-padded to the longest, embedded with their image features.

    Returns (embeddings [B, S, hidden] with zeros at padding, mask [B, S] with 1 at real tokens).
    """
    new = [len(r.new_ids) for r in rows]
    b, s = len(rows), max(new)
    ids = torch.full((b, s), pad_id, dtype=torch.long)
    mask = torch.zeros(b, s, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, s - new[i]:] = torch.tensor(r.new_ids, dtype=torch.long)
        mask[i, s - new[i]:] = 1
    ids, mask = ids.to(device), mask.to(device)
    # the features of every row that has placeholders among its new tokens, in row order
    feats = [r.image_embeds.reshape(1, -1, r.image_embeds.shape[-1]) for r in rows
             if r.image_embeds is not None and any(t < 0 for t in r.new_ids)]
    embeds = model.embed_inputs(ids, torch.cat(feats, 1) if feats else None)
    return embeds * mask[..., None].to(embeds.dtype), mask


#: Shortest common opening (tokens) worth a forward of its own in :func:`prefill_batch`.
MIN_SHARED_PREFIX = 8


def _shared_prefix(rows: Sequence[PrefillRow]) -> int:
    """Length of the text (no placeholders) that every row opens with, when all rows are fresh
    and it is at least MIN_SHARED_PREFIX tokens; else 0. Each row keeps at least one new token."""
    if len(rows) < 2 or any(r.past is not None and r.cached for r in rows):
        return 0
    first = rows[0].new_ids
    limit = min(len(r.new_ids) for r in rows) - 1
    n = 0
    while n < limit and first[n] >= 0 and all(r.new_ids[n] == first[n] for r in rows):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


def prefill_batch(model: Any, rows: Sequence[PrefillRow], device: torch.device,
                  pad_id: int = 0) -> tuple[torch.Tensor, PlainBatch]:
    """One forward over every row's new tokens (see the module docstring for the layout).

    Returns (logits at each row's last prompt token [B, vocab], the batch ready to decode).
    The rows' own caches are copied, never changed.
    """
    shared = _shared_prefix(rows)
    if shared:   # fresh rows open with the same text (the system prompt): compute it once
        with torch.inference_mode():
            x = torch.tensor([list(rows[0].new_ids[:shared])], dtype=torch.long, device=device)
            out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True, logits_to_keep=1)
        rows = [PrefillRow(out.past_key_values, shared, r.new_ids[shared:], r.image_embeds) for r in rows]
    cached = [r.cached if r.past is not None else 0 for r in rows]
    if max(cached) > 0:
        cache, pmask = stack_caches([r.past if c else None for r, c in zip(rows, cached)], cached)
    else:
        from transformers import DynamicCache

        cache, pmask = DynamicCache(), None
    with torch.inference_mode():
        embeds, smask = padded_embeds(model, rows, device, pad_id)
        # position ids: each row's count of real tokens so far (padding repeats a valid id)
        pos = torch.tensor(cached, device=device)[:, None] + (smask.cumsum(-1) - 1).clamp_min(0)
        mask = smask if pmask is None else torch.cat([pmask.to(device), smask], 1)
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
    lengths = torch.tensor([c + len(r.new_ids) for c, r in zip(cached, rows)], device=device)
    return out.logits[:, -1, :], PlainBatch(model, out.past_key_values, mask, lengths)


def _empty_cache(exc: BaseException, device: torch.device) -> None:
    if is_oom(exc) and device.type == "cuda":
        torch.cuda.empty_cache()


class BatchRunner:
    """Prefills and decodes a batch of prepared requests (:class:`~medmvl_core.engine.records.
    Prepared`) with shared steps, for :meth:`Engine.answer_batch`. Each method returns per row
    (token ids, finish reason, tokens fed) or that row's exception, and leaves each row's KV
    cache in ``p.past``; None when the batch could not be done this way (out of memory, a failed
    prefill): the engine then tries the next way, down to one by one.
    """

    def __init__(self, model: Any, device: torch.device, dtype: torch.dtype, fast_path: FastPath,
                 hook: Callable[[str], None]):
        self.model, self.device, self.dtype = model, device, dtype
        self.fast_path, self.hook = fast_path, hook

    @staticmethod
    def _mark_prefill(preps: Sequence[Any], seconds: float, path: str) -> None:
        for p in preps:
            p.timings.update(prefill_s=seconds, prefill_tokens=len(p.ids) - p.lcp, cached_tokens=p.lcp,
                             prefill_path=path)
            p.t_decode = time.perf_counter()

    def fresh_static(self, preps: Sequence[Any], eos_ids: set[int], pad_id: int
                     ) -> list[Result | BaseException] | None:
        """Requests with nothing cached: one left-padded prefill for all of them in the
        FastDecoder's static cache, then the batched decode from there (no cache copies). None
        when the fast path is busy, or the prefill fails, or the decode runs out of memory."""
        fast = self.fast_path.acquire()
        if fast is None:
            return None
        n = len(preps)
        lengths = [len(p.ids) for p in preps]
        try:
            t0 = time.perf_counter()
            with torch.inference_mode():
                embeds, mask = padded_embeds(self.model, [PrefillRow(None, 0, p.ids, p.entry.embeds) for p in preps],
                                             self.device, pad_id)
                logits = fast.prefill(embeds, mask, max_new_tokens=max(p.params.max_new_tokens for p in preps))
        except Exception as exc:  # noqa: BLE001 - prefill them another way
            self.fast_path.release()
            _empty_cache(exc, self.device)
            logger.warning("batched prefill in the static cache failed (%s); prefilling on the plain path", exc)
            return None
        self._mark_prefill(preps, time.perf_counter() - t0, f"batch{n}:static:{fast.mode}")
        try:
            with torch.inference_mode():
                outs = run_batch_decode(preps, logits.to(self.dtype), fast.step, eos_ids, pad_id, self.hook)
                for b, (p, out) in enumerate(zip(preps, outs)):
                    p.past = fast.to_dynamic(b, lengths[b] + (0 if isinstance(out, BaseException) else out[2]))
                    p.timings["decode_path"] = f"batch{n}:static:{fast.mode}"
            return outs
        except BaseException as exc:  # noqa: BLE001
            if not is_oom(exc):
                return [exc] * n   # every row fails alike (a broken step)
            logger.warning("out of memory in a batched decode; trying the batch on the plain path")
            _empty_cache(exc, self.device)
            for p in preps:
                p.streamer.ids = []
            return None
        finally:
            self.fast_path.release()

    def plain(self, preps: Sequence[Any], eos_ids: set[int], pad_id: int
              ) -> list[Result | BaseException] | None:
        """One plain batched prefill of every request's uncached tokens (:func:`prefill_batch`),
        then the shared decode steps: the fast path's when in use (the rows' caches loaded into
        it), else the batch cache's. None when it runs out of memory or the prefill fails."""
        n = len(preps)
        t0 = time.perf_counter()
        try:
            logits, batch = prefill_batch(self.model, [PrefillRow(p.past, p.lcp, p.ids[p.lcp:], p.entry.embeds)
                                                       for p in preps], self.device, pad_id)
        except Exception as exc:  # noqa: BLE001 - prefill them one by one instead
            _empty_cache(exc, self.device)
            logger.warning("batched prefill failed (%s); answering the requests one by one", exc)
            return None
        self._mark_prefill(preps, time.perf_counter() - t0, f"batch{n}")
        lengths = [len(p.ids) for p in preps]
        fast = None
        try:
            if self.fast_path.enabled:   # the rows' caches move into its static cache
                fast = self.fast_path.start([batch.row(b, m) for b, m in enumerate(lengths)], lengths,
                                            max(p.params.max_new_tokens for p in preps))
                if fast is not None:
                    batch.cache = None   # the static cache holds the rows now
            with torch.inference_mode():
                outs = run_batch_decode(preps, logits.to(self.dtype), fast.step if fast else batch.step,
                                        eos_ids, pad_id, self.hook)
                for b, (p, out) in enumerate(zip(preps, outs)):
                    m = lengths[b] + (0 if isinstance(out, BaseException) else out[2])
                    p.past = fast.to_dynamic(b, m) if fast else batch.row(b, m)
                    p.timings["decode_path"] = f"batch{n}" + (f":static:{fast.mode}" if fast else "")
            return outs
        except BaseException as exc:  # noqa: BLE001
            if not is_oom(exc):
                return [exc] * n
            logger.warning("out of memory in a batched decode; answering the requests one by one")
            _empty_cache(exc, self.device)
            return None
        finally:
            if fast is not None:
                self.fast_path.release()
