"""The module one training step runs: vision features (encoded or from the cache), connector,
LLM, and the summed token loss. Wrapped whole by ``accelerator.prepare`` so DDP/FSDP/DeepSpeed
see a single forward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

IGNORE_INDEX = -100


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position loss [B, L-1] of the shifted cross-entropy (0 where labels[:, 1:] == -100).

    logits: [B, L, V]; labels: [B, L] aligned with the inputs (the standard causal-LM shift:
    position t predicts labels[t + 1]).
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none")
    return loss.view(shift_labels.shape)


class TrainStepModule(nn.Module):
    """``forward(batch) -> (loss_sum, n_supervised, new_features)``.

    ``batch["vision"][kind]`` (kind "image" / "image3d") is ``{"pixels": Tensor[M, ...] or None,
    "cached": list[Tensor], "layout": list[("p" | "c", index)]}``: images in batch order, each
    either a row of ``pixels`` (encoded here) or a cached encoder output. ``new_features[kind]``
    returns the encoder outputs computed here (one tensor per pixels row) for the cache.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def _encoder_trains(self, kind: str) -> bool:
        m = self.model
        enc = m.encoder_image3d if kind == "image3d" and m.encoder_image3d is not None else m.encoder_image
        return enc is not None and any(p.requires_grad for p in enc.parameters())

    def vision_embeds(self, vision: dict) -> tuple[Optional[dict], dict]:
        m = self.model
        embeds: dict[str, torch.Tensor] = {}
        new: dict[str, list[torch.Tensor]] = {}
        for kind, v in vision.items():
            layout = v["layout"]
            if not layout:
                continue
            fresh: list[torch.Tensor] = []
            if v.get("pixels") is not None:
                x = v["pixels"]
                if self._encoder_trains(kind):
                    feats = m.vision_features(kind, x)
                else:
                    with torch.no_grad():
                        feats = m.vision_features(kind, x)
                per = feats.reshape(x.shape[0], -1, *feats.shape[-2:])  # [M, k, T, C]
                fresh = list(per.unbind(0))
                new[kind] = fresh
            parts = [fresh[i] if src == "p" else v["cached"][i] for src, i in layout]
            target = fresh[0] if fresh else None
            device = target.device if target is not None else _device(m)
            dtype = target.dtype if target is not None else _vision_dtype(m, kind)
            stacked = torch.stack([p.to(device=device, dtype=dtype) for p in parts])  # [N, k, T, C]
            features = stacked.reshape(-1, *stacked.shape[-2:])
            embeds[kind] = m.project(kind, features, batch_size=len(layout))
        return (embeds or None), new

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                vision: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        embeds, new = self.vision_embeds(vision)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, image_embeds=embeds, use_cache=False)
        losses = token_losses(out.logits, labels)
        n = (labels[:, 1:] != IGNORE_INDEX).sum()
        return losses.sum(), n, new


def _device(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


def _vision_dtype(m: nn.Module, kind: str) -> torch.dtype:
    con = m.connector_image3d if kind == "image3d" and m.connector_image3d is not None else m.connector_image
    return next(con.parameters()).dtype
