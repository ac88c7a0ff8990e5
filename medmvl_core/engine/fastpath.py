"""KV-cache plumbing for batched decoding on the plain path: stacking per-request (session)
caches into one left-padded batch cache and splitting it back. The static-cache / CUDA-graph
path is :mod:`medmvl_core.engine.fast_decode`."""

from __future__ import annotations

import logging
from typing import Any

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
