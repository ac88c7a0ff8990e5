"""The two 3D ViTs MedM-VL uses, written here so no remote code is needed.

- ``M3DViT``: M3D-CLIP's vision encoder (BAAI-DCAI/M3D ``LaMed/src/model/multimodal_encoder/vit.py``,
  a MONAI 1.3 ViT with a CLS token): parameter names ``patch_embedding.patch_embeddings.1``,
  ``patch_embedding.position_embeddings``, ``blocks.N.{norm1,attn.qkv,attn.out_proj,norm2,mlp.linear1,
  mlp.linear2}``, ``norm``, ``cls_token``, as in the released weights.
- ``MedMViT``: MedM-CLIP-CT's vision encoder (vit-pytorch layout): ``to_patch_embedding.{1,2,3}``,
  ``pos_embedding``, ``cls_token``, ``transformer_layers.N`` (``nn.TransformerEncoderLayer``), ``mlp_head``.

Both return ``(output, hidden_states)`` where ``hidden_states`` holds every block's output.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from medmvl_core.errors import ConfigError


def _triple(v: int | Sequence[int], dims: int) -> list[int]:
    return [int(v)] * dims if isinstance(v, int) else [int(x) for x in v]


def _grid(img: list[int], patch: list[int]) -> list[int]:
    for m, p in zip(img, patch):
        if m % p:
            raise ConfigError(f"image size {img} is not divisible by patch size {patch}")
    return [m // p for m, p in zip(img, patch)]


class _SelfAttention(nn.Module):
    """MONAI ``SABlock`` (fused qkv, no qkv bias by default)."""

    def __init__(self, hidden: int, heads: int, dropout: float, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.qkv = nn.Linear(hidden, hidden * 3, bias=qkv_bias)
        self.out_proj = nn.Linear(hidden, hidden)
        self.drop_weights = nn.Dropout(dropout)
        self.drop_output = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        att = (torch.einsum("blxd,blyd->blxy", q, k) * self.head_dim**-0.5).softmax(dim=-1)
        out = torch.einsum("bhxy,bhyd->bhxd", self.drop_weights(att), v)
        return self.drop_output(self.out_proj(out.transpose(1, 2).reshape(b, n, -1)))


class _Mlp(nn.Module):
    def __init__(self, hidden: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, hidden)
        self.fn = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.linear2(self.drop1(self.fn(self.linear1(x)))))


class _Block(nn.Module):
    """MONAI ``TransformerBlock``: pre-norm attention and MLP."""

    def __init__(self, hidden: int, mlp_dim: int, heads: int, dropout: float, qkv_bias: bool) -> None:
        super().__init__()
        self.mlp = _Mlp(hidden, mlp_dim, dropout)
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = _SelfAttention(hidden, heads, dropout, qkv_bias)
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Perceptron(nn.Module):
    """'b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)' then a Linear at index 1."""

    def __init__(self, patch: list[int], patch_dim: int, hidden: int) -> None:
        super().__init__()
        self.patch = patch
        self.add_module("1", nn.Linear(patch_dim, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        sizes = x.shape[2:]
        dims = len(self.patch)
        split = []
        for s, p in zip(sizes, self.patch):
            split += [s // p, p]
        x = x.reshape(b, c, *split)
        grid_axes = [2 + 2 * i for i in range(dims)]
        patch_axes = [3 + 2 * i for i in range(dims)]
        x = x.permute(0, *grid_axes, *patch_axes, 1)
        n = math.prod(s // p for s, p in zip(sizes, self.patch))
        return getattr(self, "1")(x.reshape(b, n, -1))


class _PatchEmbedding(nn.Module):
    def __init__(self, in_channels: int, img: list[int], patch: list[int], hidden: int, proj: str, dropout: float) -> None:
        super().__init__()
        self.proj = proj
        n = math.prod(_grid(img, patch))
        if proj == "perceptron":
            self.patch_embeddings = _Perceptron(patch, in_channels * math.prod(patch), hidden)
        elif proj == "conv":
            conv = {2: nn.Conv2d, 3: nn.Conv3d}[len(patch)]
            self.patch_embeddings = conv(in_channels, hidden, kernel_size=patch, stride=patch)
        else:
            raise ConfigError(f"m3dclip pos_embed = {proj!r} is not supported; use 'perceptron' or 'conv'")
        self.position_embeddings = nn.Parameter(torch.zeros(1, n, hidden))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings(x)
        if self.proj == "conv":
            x = x.flatten(2).transpose(-1, -2)
        return self.dropout(x + self.position_embeddings)


class M3DViT(nn.Module):
    """M3D-CLIP vision encoder. Input [B, C, D, H, W] -> (normed [B, 1+N, C'], list of [B, 1+N, C'])."""

    def __init__(self, in_channels: int, img_size: list[int], patch_size: list[int], hidden_size: int,
                 mlp_dim: int, num_layers: int, num_heads: int, pos_embed: str = "perceptron",
                 dropout_rate: float = 0.0, qkv_bias: bool = False) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ConfigError(f"m3dclip hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.hidden_size = hidden_size
        self.grid = _grid(img_size, patch_size)
        self.patch_embedding = _PatchEmbedding(in_channels, img_size, patch_size, hidden_size, pos_embed, dropout_rate)
        self.blocks = nn.ModuleList(
            [_Block(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias) for _ in range(num_layers)]
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))

    @classmethod
    def from_config(cls, cfg: dict) -> "M3DViT":
        """Build from an M3D-CLIP ``config.json`` dict (``img_size``, ``patch_size``, ...)."""
        dims = int(cfg.get("spatial_dims", 3))
        return cls(
            in_channels=int(cfg.get("in_channels", 1)),
            img_size=_triple(cfg.get("img_size", (32, 256, 256)), dims),
            patch_size=_triple(cfg.get("patch_size", (4, 16, 16)), dims),
            hidden_size=int(cfg.get("hidden_size", 768)),
            mlp_dim=int(cfg.get("mlp_dim", 3072)),
            num_layers=int(cfg.get("num_layers", 12)),
            num_heads=int(cfg.get("num_heads", 12)),
            pos_embed=cfg.get("pos_embed", "perceptron"),
            dropout_rate=float(cfg.get("dropout_rate", 0.0)),
            qkv_bias=bool(cfg.get("qkv_bias", False)),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embedding(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        hidden_states = []
        for blk in self.blocks:
            x = blk(x)
            hidden_states.append(x)
        return self.norm(x), hidden_states


class _MedMPatchEmbedding(nn.Module):
    """'b c (f pf) (h p1) (w p2) -> b (f h w) (p1 p2 pf c)', LayerNorm, Linear, LayerNorm (indices 1-3)."""

    def __init__(self, patch: list[int], patch_dim: int, dim: int) -> None:
        super().__init__()
        self.patch = patch  # [pf, p1, p2]
        self.add_module("1", nn.LayerNorm(patch_dim))
        self.add_module("2", nn.Linear(patch_dim, dim))
        self.add_module("3", nn.LayerNorm(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        pf, p1, p2 = self.patch
        x = x.reshape(b, c, d // pf, pf, h // p1, p1, w // p2, p2)
        x = x.permute(0, 2, 4, 6, 5, 7, 3, 1).reshape(b, (d // pf) * (h // p1) * (w // p2), -1)
        for i in ("1", "2", "3"):
            x = getattr(self, i)(x)
        return x


class MedMViT(nn.Module):
    """MedM-CLIP-CT vision encoder. Input [B, 1, D, H, W] -> (head output, list of [B, 1+N, C])."""

    def __init__(self, image_size: int, image_patch_size: int, frames: int, frame_patch_size: int,
                 dim: int, depth: int, heads: int, mlp_dim: int, channels: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.hidden_size = dim
        self.grid = _grid([frames, image_size, image_size], [frame_patch_size, image_patch_size, image_patch_size])
        patch_dim = channels * image_patch_size * image_patch_size * frame_patch_size
        self.to_patch_embedding = _MedMPatchEmbedding([frame_patch_size, image_patch_size, image_patch_size],
                                                      patch_dim, dim)
        self.pos_embedding = nn.Parameter(torch.randn(1, math.prod(self.grid) + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(dropout)
        self.transformer_layers = nn.ModuleList(
            [nn.TransformerEncoderLayer(d_model=dim, nhead=heads, dropout=dropout, dim_feedforward=mlp_dim,
                                        batch_first=True) for _ in range(depth)]
        )
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))

    @classmethod
    def from_config(cls, cfg: dict) -> "MedMViT":
        """Build from a MedM-CLIP ``config.json`` dict (``image_size``, ``frame_size``, ...)."""

        def scalar(v, i):  # MedM-VL rewrites image_size/patch_size as [frames, H, W] lists
            return int(v[i]) if isinstance(v, (list, tuple)) else int(v)

        img = cfg.get("image_size", 256)
        patch = cfg.get("image_patch_size", cfg.get("patch_size", 16))
        return cls(
            image_size=scalar(img, 1),
            image_patch_size=scalar(patch, 1),
            frames=int(cfg.get("frame_size", scalar(img, 0) if isinstance(img, (list, tuple)) else 32)),
            frame_patch_size=int(cfg.get("frame_patch_size", 4)),
            dim=int(cfg.get("hidden_size", 768)),
            depth=int(cfg.get("image_num_layers", 12)),
            heads=int(cfg.get("image_num_heads", 12)),
            mlp_dim=int(cfg.get("image_mlp_dim", 3072)),
            channels=int(cfg.get("channels", 1)),
            dropout=float(cfg.get("dropout_rate", 0.0)),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.to_patch_embedding(x)
        b, n, _ = x.shape
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x = self.dropout(x + self.pos_embedding[:, : n + 1])
        hidden_states = []
        for layer in self.transformer_layers:
            x = layer(x)
            hidden_states.append(x)
        return self.mlp_head(x[:, 0]), hidden_states
