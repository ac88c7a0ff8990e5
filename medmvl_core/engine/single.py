"""One request's prefill and decode: the plain path (transformers DynamicCache) or the fast path
(a follow-up's new tokens through ``FastDecoder.extend``, decode steps in its static cache), with
the fall-back from a failing fast step to the plain path on the same cache."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from medmvl_core.engine.decode import run_decode
from medmvl_core.engine.fast_path import FastPath, is_oom
from medmvl_core.engine.records import Prepared


class SingleRunner:
    """Prefills (:meth:`prefill`) and decodes (:meth:`decode`) one prepared request
    (:class:`~medmvl_core.engine.records.Prepared`); its KV cache is left in ``p.past``."""

    def __init__(self, model: Any, device: torch.device, dtype: torch.dtype, fast_path: FastPath,
                 hook: Callable[[str], None]):
        self.model, self.device, self.dtype = model, device, dtype
        self.fast_path, self.hook = fast_path, hook

    def forward(self, ids: list[int], total_len: int, past: Any,
                image_embeds: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        """One plain forward of ``ids`` after ``past``; -> (logits at the last token [1, V], cache)."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        mask = torch.ones(1, total_len, dtype=torch.long, device=self.device)
        kwargs: dict[str, Any] = {"input_ids": x, "attention_mask": mask,
                                  "past_key_values": past, "use_cache": True, "logits_to_keep": 1}
        if image_embeds is not None:
            kwargs["image_embeds"] = image_embeds
        with torch.inference_mode():
            out = self.model(**kwargs)
        return out.logits[:, -1, :], out.past_key_values

    def prefill(self, p: Prepared, extend: bool = False, hook: bool = True) -> torch.Tensor:
        """Prefill the prompt's uncached suffix; returns the logits at its last token.

        extend=True (single answers): a follow-up's new text tokens go through the static cache's
        ``FastDecoder.extend`` (a captured graph on CUDA) when the fast path is in use, and the
        decoder stays loaded for the answer (``p.fast``); otherwise the plain forward.
        """
        if hook:
            self.hook("prefill")
        t0 = time.perf_counter()
        suffix = p.ids[p.lcp:]
        has_img = any(t < 0 for t in suffix)
        logits = self._extend_fast(p, suffix) if extend and not has_img and p.past is not None else None
        if logits is None:
            logits, p.past = self.forward(suffix, len(p.ids), p.past,
                                          p.entry.embeds if has_img else None)
        p.timings["prefill_s"] = time.perf_counter() - t0
        p.timings["prefill_tokens"] = len(suffix)
        p.timings["cached_tokens"] = p.lcp
        p.t_decode = time.perf_counter()
        return logits

    def _extend_fast(self, p: Prepared, suffix: list[int]) -> torch.Tensor | None:
        """Load the session cache into the FastDecoder and extend it with ``suffix`` (text tokens);
        the decoder stays locked for this answer in ``p.fast``. None when the fast path is not in
        use, busy, or the suffix is too long for one chunk (then the plain forward prefills)."""
        from medmvl_core.engine.fast_decode import CHUNKS, pick_bucket

        if len(suffix) > max(CHUNKS):
            return None
        # the cache bucket holds the prefix, the padded chunk and the answer
        fast = self.fast_path.start([p.past], [p.lcp], pick_bucket(len(suffix), CHUNKS) + p.params.max_new_tokens)
        if fast is None:
            return None
        try:
            with torch.inference_mode():
                x = torch.tensor([suffix], dtype=torch.long, device=self.device)
                logits = fast.extend(self.model.embed_inputs(x, None))
        except Exception as exc:  # noqa: BLE001 - fall back to the plain prefill
            self.fast_path.failed(exc, "static-cache prefill failed")
            return None
        p.fast = fast
        p.timings["prefill_path"] = f"static:{fast.mode}"
        return logits.to(self.dtype)

    def decode(self, p: Prepared, logits: torch.Tensor, eos_ids: set[int]) -> tuple[list[int], str, int]:
        """Decode one request from its prefill logits, on the fast path when it is in use (a
        failing fast step continues on the plain path from the same cache)."""
        total = len(p.ids)
        fast, p.fast = p.fast, None  # already loaded (and locked) by the prefill's extend
        if fast is None:
            fast = self.fast_path.start([p.past], [total], p.params.max_new_tokens)
        used_fast = fast is not None

        def step(tok: int) -> torch.Tensor:
            nonlocal total, fast
            self.hook("decode")
            total += 1
            if fast is not None:
                try:
                    return fast.step(tok).to(logits.dtype)
                except Exception as exc:  # noqa: BLE001 - continue on the plain path
                    if is_oom(exc):
                        raise
                    self.fast_path.disable(f"static-cache step failed ({exc})")
                    p.past = fast.to_dynamic(0, total - 1)
                    fast = None
                    self.fast_path.release()
            lg, p.past = self.forward([tok], total, p.past, None)
            return lg

        try:
            out = run_decode(logits, step, p.params, eos_ids, p.streamer, p.check,
                             p.generator, p.on_token_id)
            if fast is not None:
                p.past = fast.to_dynamic(0, len(p.ids) + out[2])
        finally:
            if fast is not None:
                self.fast_path.release()
        p.timings["decode_path"] = (f"static:{self.fast_path.mode}" if fast is not None else
                                    "static->plain" if used_fast else "plain")
        return out
