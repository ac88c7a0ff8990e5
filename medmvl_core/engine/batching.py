"""Batched decoding: several sequences share every decode step (static batching).

``BatchDecoder.run(requests)`` left-pads the prompts into one static KV cache, prefills them in
one forward pass and decodes all rows together until every row has stopped; a row's greedy
tokens are the ones it gets when decoded alone (positions and masks are per row, padding slots
are never attended). ``BatchQueue`` gathers requests that arrive from several threads within a
short window (e.g. several radiologists on one workstation) and runs them as one batch.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from medmvl_core.engine.fast_decode import DEFAULT_BUCKETS, FastDecoder, FastPathError

logger = logging.getLogger(__name__)


@dataclass
class BatchRequest:
    """One sequence: ``inputs_embeds`` [L, hidden] (or [1, L, hidden]) of the full prompt.

    on_token(token_id) is called for every generated token; cancel() returning True stops the row.
    """

    inputs_embeds: torch.Tensor
    max_new_tokens: int = 256
    eos_ids: frozenset[int] | set[int] = frozenset()
    on_token: Callable[[int], None] | None = None
    cancel: Callable[[], bool] | None = None


@dataclass
class BatchResult:
    """tokens: generated ids (the EOS included when it stopped the row); finish_reason:
    "stop" | "length" | "cancelled" | "error"; error: the exception text for "error"."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    error: str | None = None


def left_pad(embeds: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prompts [L_i, hidden] left-padded -> (embeds [B, L, hidden], mask [B, L])."""
    rows = [e.reshape(-1, e.shape[-1]) for e in embeds]
    n = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), n, rows[0].shape[-1])
    mask = torch.zeros(len(rows), n, dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, n - r.shape[0]:] = r
        mask[i, n - r.shape[0]:] = 1
    return out, mask


class BatchDecoder:
    """Greedy decoding of up to ``max_batch`` sequences at a time through one ``FastDecoder``.

    model: MedMVLForConditionalGeneration or a causal LM. mode/buckets: see FastDecoder
    ("plain" is not batched and is replaced by "static").
    """

    def __init__(self, model: Any, *, mode: str = "auto", buckets: Sequence[int] = DEFAULT_BUCKETS,
                 max_batch: int = 8, decoder: FastDecoder | None = None):
        if max_batch < 1:
            raise FastPathError(f"max_batch must be >= 1, got {max_batch}")
        self.decoder = decoder or FastDecoder(model, mode="static" if mode == "plain" else mode,
                                              buckets=buckets)
        self.max_batch = max_batch

    def run(self, requests: Sequence[BatchRequest]) -> list[BatchResult]:
        """Decode every request; returns one BatchResult per request, in order."""
        results: list[BatchResult] = []
        for i in range(0, len(requests), self.max_batch):
            results.extend(self._run_group(list(requests[i:i + self.max_batch])))
        return results

    def _run_group(self, reqs: list[BatchRequest]) -> list[BatchResult]:
        dec = self.decoder
        for r in reqs:
            if r.max_new_tokens < 1:
                raise FastPathError(f"max_new_tokens must be >= 1, got {r.max_new_tokens}")
        embeds, mask = left_pad([r.inputs_embeds for r in reqs])
        dec.reset()
        logits = dec.prefill(embeds, mask, max_new_tokens=max(r.max_new_tokens for r in reqs))
        res = [BatchResult() for _ in reqs]
        done = [False] * len(reqs)
        while True:
            toks = logits.argmax(-1).tolist()
            for i, r in enumerate(reqs):
                if done[i]:
                    continue
                if r.cancel is not None and r.cancel():
                    done[i], res[i].finish_reason = True, "cancelled"
                    continue
                res[i].tokens.append(toks[i])
                if r.on_token is not None:
                    r.on_token(toks[i])
                if toks[i] in r.eos_ids:
                    done[i], res[i].finish_reason = True, "stop"
                elif len(res[i].tokens) >= r.max_new_tokens:
                    done[i], res[i].finish_reason = True, "length"
            if all(done):
                break
            # finished rows keep stepping with a dummy token; their logits are ignored
            feed = [res[i].tokens[-1] if res[i].tokens else 0 for i in range(len(reqs))]
            logits = dec.step(torch.tensor(feed, dtype=torch.long))
        dec.reset()
        return res


class BatchQueue:
    """Collects requests from many threads and runs them in batches on one decode thread.

    submit(request) -> Future[BatchResult]. A batch starts when ``max_batch`` requests wait or
    ``window_s`` after the first one arrived. close() stops the thread (pending futures fail).
    """

    def __init__(self, decoder: BatchDecoder, window_s: float = 0.02):
        self.decoder = decoder
        self.window_s = window_s
        self._pending: list[tuple[BatchRequest, Future]] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="medmvl-batch", daemon=True)
        self._thread.start()

    def submit(self, request: BatchRequest) -> Future:
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise FastPathError("the batch queue is closed")
            self._pending.append((request, fut))
            self._cv.notify()
        return fut

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)
        for _, fut in self._pending:
            fut.set_exception(FastPathError("the batch queue was closed before this request ran"))
        self._pending.clear()

    def _take(self) -> list[tuple[BatchRequest, Future]]:
        with self._cv:
            while not self._pending and not self._closed:
                self._cv.wait()
            if self._closed:
                return []
            end = time.monotonic() + self.window_s
            while len(self._pending) < self.decoder.max_batch and not self._closed:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch = self._pending[:self.decoder.max_batch]
            del self._pending[:len(batch)]
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            try:
                results = self.decoder.run([r for r, _ in batch])
            except Exception as exc:  # noqa: BLE001 - reported to every waiting caller
                logger.warning("batched decode failed: %s", type(exc).__name__)
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            for (_, fut), res in zip(batch, results):
                fut.set_result(res)
