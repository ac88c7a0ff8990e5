"""KV-cache plumbing for the fast decode paths: a static (preallocated) cache with bucketed
lengths for one sequence, and stacking/splitting per-request caches for batched decoding.

The static path keeps every decode step's tensor shapes fixed (the precondition for CUDA-graph
capture / ``torch.compile(mode="reduce-overhead")``); on the CPU it runs eagerly and exists so the
cache logic is tested. Greedy tokens equal the plain path's (tests).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def llm_config(model: Any) -> Any:
    """The language model's config (what a StaticCache is shaped from)."""
    llm = getattr(model, "llm", None)
    if llm is not None and hasattr(llm, "config"):
        return llm.config
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def bucket_len(n: int, bucket: int = 256) -> int:
    """Round a cache length up to a multiple of ``bucket`` so compiled graphs are reused."""
    return ((n + bucket - 1) // bucket) * bucket


def _layers(past: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each [B, heads, L, head_dim], of a DynamicCache."""
    if hasattr(past, "layers"):
        return [(layer.keys, layer.values) for layer in past.layers]
    return list(zip(past.key_cache, past.value_cache))


def dynamic_from(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    from transformers import DynamicCache
    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


class StaticDecoder:
    """Decode one sequence with a preallocated cache of ``bucket_len(length + max_new)`` slots.

    ``step(token) -> logits [1, V]``; ``to_dynamic()`` returns the filled part as a DynamicCache
    (so the session keeps reusing it). ``compiled`` wraps the step with ``torch.compile`` (CUDA).
    """

    def __init__(self, model: Any, past: Any, length: int, max_new_tokens: int,
                 bucket: int = 256, compile_step: bool = False):
        from transformers import StaticCache
        self.model = model
        self.pos = length
        layers = _layers(past)
        k0 = layers[0][0]
        self.max_len = bucket_len(length + max_new_tokens + 1, bucket)
        self.cache = StaticCache(config=llm_config(model), max_cache_len=self.max_len)
        prefix = torch.arange(length, device=k0.device)
        for i, (k, v) in enumerate(layers):
            self.cache.update(k[:, :, :length], v[:, :, :length], i, {"cache_position": prefix})
        self._forward: Callable = self._eager
        if compile_step:
            self._forward = torch.compile(self._eager, mode="reduce-overhead", fullgraph=False)

    def _eager(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=x, attention_mask=None, past_key_values=self.cache,
                         use_cache=True, cache_position=pos, position_ids=pos[None])
        return out.logits[:, -1, :]

    def step(self, token: int) -> torch.Tensor:
        dev = self.cache.layers[0].keys.device
        x = torch.tensor([[token]], dtype=torch.long, device=dev)
        pos = torch.tensor([self.pos], dtype=torch.long, device=dev)
        with torch.inference_mode():
            logits = self._forward(x, pos)
        self.pos += 1
        return logits.clone()

    def to_dynamic(self) -> Any:
        return dynamic_from([(layer.keys[:, :, :self.pos].clone(), layer.values[:, :, :self.pos].clone())
                             for layer in self.cache.layers])


def stack_caches(pasts: list[Any], lengths: list[int]) -> tuple[Any, torch.Tensor]:
    """Left-pad per-request caches to one batch cache. Returns (cache, attention mask [B, Lmax])."""
    lmax = max(lengths)
    per = [_layers(p) for p in pasts]
    stacked = []
    for li in range(len(per[0])):
        ks = [F.pad(per[b][li][0][:, :, :n], (0, 0, lmax - n, 0)) for b, n in enumerate(lengths)]
        vs = [F.pad(per[b][li][1][:, :, :n], (0, 0, lmax - n, 0)) for b, n in enumerate(lengths)]
        stacked.append((torch.cat(ks), torch.cat(vs)))
    dev = stacked[0][0].device
    mask = torch.zeros(len(lengths), lmax, dtype=torch.long, device=dev)
    for b, n in enumerate(lengths):
        mask[b, lmax - n:] = 1
    return dynamic_from(stacked), mask


def split_cache(batch: Any, row: int, pad: int, length: int) -> Any:
    """Row ``row`` of a batch cache without its left padding, ``length`` positions."""
    return dynamic_from([(k[row:row + 1, :, pad:pad + length].clone(),
                          v[row:row + 1, :, pad:pad + length].clone())
                         for k, v in _layers(batch)])
