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


def turn_attention_mask(segments: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive [B, 1, L, L] mask (0 = may attend, dtype's minimum = may not; what both the eager
    and the SDPA attention of transformers take) for rows packed by ``encode_train_turns``: causal,
    and a token sees the shared prefix (segment 0) and its own turn only. Padding (segment -1)
    sees only itself, so no attention row is empty."""
    n = segments.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=segments.device).tril()
    q, k = segments.unsqueeze(2), segments.unsqueeze(1)
    allowed = causal & (((k == 0) & (q >= 0)) | (k == q)) & (k >= 0)
    allowed |= torch.eye(n, dtype=torch.bool, device=segments.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


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
                vision: dict, position_ids: Optional[torch.Tensor] = None,
                segments: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        embeds, new = self.vision_embeds(vision)
        if segments is not None:  # independent turns: zero the padding's embeddings, then the block mask
            embeds_in = self.model.embed_inputs(input_ids, embeds, attention_mask)
            out = self.model(inputs_embeds=embeds_in, attention_mask=turn_attention_mask(segments, embeds_in.dtype),
                             position_ids=position_ids, use_cache=False)
        else:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, image_embeds=embeds, use_cache=False)
        losses = token_losses(out.logits, labels)
        n = (labels[:, 1:] != IGNORE_INDEX).sum()
        return losses.sum(), n, new


def _device(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


def _vision_dtype(m: nn.Module, kind: str) -> torch.dtype:
    con = m.connector_image3d if kind == "image3d" and m.connector_image3d is not None else m.connector_image
    return next(con.parameters()).dtype
