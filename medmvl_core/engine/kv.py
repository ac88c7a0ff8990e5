"""KV-cache plumbing shared by the engine's paths: per-layer (keys, values) of any transformers
cache, DynamicCaches built from tensors, and moving rows in and out of a batch cache.

Shapes: keys and values are [B, kv_heads, L, head_dim] per layer. A *batch* cache holds B rows
whose real positions are marked by a 2D attention mask [B, L] (1 = real token, 0 = padding);
padding may sit left of a row (left-padded prompts) or between its cached prefix and its new
tokens (a batched follow-up prefill, see :mod:`medmvl_core.engine.batch`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F


def kv_layers(past: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each [B, heads, L, head_dim], of a transformers cache."""
    if hasattr(past, "layers"):
        return [(layer.keys, layer.values) for layer in past.layers]
    if hasattr(past, "key_cache"):
        return list(zip(past.key_cache, past.value_cache))
    return [(k, v) for k, v in past]


def dynamic_from(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A DynamicCache holding (keys, values) per layer, each [B, heads, L, head_dim]."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def stack_caches(pasts: Sequence[Any], lengths: Sequence[int]) -> tuple[Any, torch.Tensor]:
    """Left-pad per-request caches (first ``lengths[b]`` positions of each) into one batch
    DynamicCache (copies; the inputs are not changed). A row may be ``None`` with length 0 (a
    request with nothing cached); at least one row must hold a cache.

    Returns (cache, attention mask [B, Lmax] with 1 at real positions).
    """
    lmax = max(lengths)
    per = [None if p is None else kv_layers(p) for p in pasts]
    ref = next(p for p in per if p is not None)
    stacked = []
    for li in range(len(ref)):
        k0 = ref[li][0]
        ks, vs = [], []
        for b, n in enumerate(lengths):
            if per[b] is None or n == 0:
                z = k0.new_zeros(1, k0.shape[1], lmax, k0.shape[3])
                ks.append(z)
                vs.append(torch.zeros_like(z))
                continue
            k, v = per[b][li]
            ks.append(F.pad(k[:, :, :n], (0, 0, lmax - n, 0)))
            vs.append(F.pad(v[:, :, :n], (0, 0, lmax - n, 0)))
        stacked.append((torch.cat(ks), torch.cat(vs)))
    mask = torch.zeros(len(lengths), lmax, dtype=torch.long, device=stacked[0][0].device)
    for b, n in enumerate(lengths):
        if n:
            mask[b, lmax - n:] = 1
    return dynamic_from(stacked), mask


def split_cache(batch: Any, row: int, pad: int, length: int) -> Any:
    """Row ``row`` of a batch cache without its ``pad`` left-padding slots: ``length`` positions."""
    return dynamic_from([(k[row:row + 1, :, pad:pad + length].clone(),
                          v[row:row + 1, :, pad:pad + length].clone())
                         for k, v in kv_layers(batch)])


def row_cache(batch: Any, mask: torch.Tensor, row: int, length: int) -> Any:
    """Row ``row`` of a batch cache as a single-sequence DynamicCache of its first ``length`` real
    positions (those where ``mask[row]`` [L] is 1, in order; padding anywhere is dropped)."""
    idx = mask[row].nonzero().flatten()[:length].to(mask.device)
    return dynamic_from([(k[row:row + 1].index_select(2, idx.to(k.device)),
                          v[row:row + 1].index_select(2, idx.to(v.device)))
                         for k, v in kv_layers(batch)])
