"""Connectors (vision features -> LLM embeddings) in an explicit registry, numerically as MedM-VL's.

- ``mlp``: ``Linear(in, out)`` then (N-1) x ``[GELU, Linear(out, out)]`` for ``mlpNx_gelu``.
- ``spatial_pooling``: features reshaped to their patch grid, ``avg_pool`` (kernel = stride = 2),
  flattened back, then the MLP (MedM-VL's 3D version; a 2D grid uses ``avg_pool2d``).
- ``attn_pooling``: learned queries [Q, in] repeated over the batch, ``nn.MultiheadAttention``
  (8 heads, ``batch_first``) with the features as keys and values, then the MLP.

Parameter names match MedM-VL's (``connector.*``, ``query``, ``attn.*``).

Optional (not in MedM-VL; default off, so parity is unchanged): ``output_norm: "layernorm"`` appends
``nn.LayerNorm(out)`` (parameters ``output_norm.*``) to every connector, with its affine weight
initialised to ``output_scale`` (default 1.0) so the image tokens can start at the scale of the
LLM's text embeddings (per-token norm = ``output_scale * sqrt(out)``).
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from medmvl_core.errors import ConfigError, RegistryError


OUTPUT_NORMS = (None, "layernorm")  # allowed values of a connector spec's optional "output_norm"


def build_mlp(name: str, input_dim: int, output_dim: int) -> nn.Sequential:
    """``mlpNx_gelu`` -> ``nn.Sequential`` with N Linear layers and GELU between them."""
    m = re.match(r"^mlp(\d+)x_gelu$", name or "")
    if not m:
        raise ConfigError(f"connector name {name!r} is not supported; use 'mlpNx_gelu' (e.g. 'mlp2x_gelu')")
    modules: list[nn.Module] = [nn.Linear(input_dim, output_dim)]
    for _ in range(1, int(m.group(1))):
        modules += [nn.GELU(), nn.Linear(output_dim, output_dim)]
    return nn.Sequential(*modules)


class Connector(nn.Module):
    """Base. ``forward(x: [B, T, in]) -> [B, Q, out]``; ``num_tokens(T) -> Q``."""

    def __init__(self, spec: dict, input_dim: int, output_dim: int, grid: list[int] | None) -> None:
        super().__init__()
        self.spec = spec
        self.connector = build_mlp(spec.get("name", "mlp2x_gelu"), input_dim, output_dim)
        norm = spec.get("output_norm")
        if norm is None:
            self.output_norm: nn.Module | None = None
        elif norm == "layernorm":
            self.output_norm = nn.LayerNorm(output_dim)
            with torch.no_grad():
                self.output_norm.weight.fill_(float(spec.get("output_scale", 1.0)))
        else:
            raise ConfigError(f"connector output_norm {norm!r} is not supported; use one of {list(OUTPUT_NORMS)}")

    def num_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP, then the optional output norm: ``[B, Q, in] -> [B, Q, out]``."""
        x = self.connector(x)
        return x if self.output_norm is None else self.output_norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._project(x)


class MLPConnector(Connector):
    pass


class SpatialPooling(Connector):
    def __init__(self, spec: dict, input_dim: int, output_dim: int, grid: list[int] | None) -> None:
        super().__init__(spec, input_dim, output_dim, grid)
        if not grid or len(grid) not in (2, 3):
            raise ConfigError("spatial_pooling needs an encoder with a 2D or 3D patch grid")
        self.grid = list(grid)
        self.pool = int(spec.get("pool_size", 2))
        self.grid_post = [g // self.pool for g in self.grid]

    def num_tokens(self, num_input_tokens: int) -> int:
        return math.prod(self.grid_post)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        if n != math.prod(self.grid):
            raise ConfigError(
                f"spatial_pooling expects {math.prod(self.grid)} patch tokens (grid {self.grid}), got {n}; "
                "use select_feature 'patch' for encoders with a CLS token"
            )
        cube = x.transpose(1, 2).reshape(b, d, *self.grid)
        pool = F.avg_pool3d if len(self.grid) == 3 else F.avg_pool2d
        cube = pool(cube, kernel_size=self.pool, stride=self.pool)
        return self._project(cube.flatten(2).transpose(1, 2))


class AttnPooling(Connector):
    def __init__(self, spec: dict, input_dim: int, output_dim: int, grid: list[int] | None) -> None:
        super().__init__(spec, input_dim, output_dim, grid)
        n_queries = spec.get("num_queries")
        if n_queries is None:  # MedM-VL HEAD: (image_size // patch_size) ** 2
            if not grid:
                raise ConfigError("attn_pooling needs num_queries when the encoder has no patch grid")
            n_queries = grid[-1] * grid[-2]
        self.n_queries = int(n_queries)
        self.query = nn.Parameter(torch.randn(self.n_queries, input_dim))
        self.attn = nn.MultiheadAttention(embed_dim=input_dim, num_heads=int(spec.get("num_heads", 8)),
                                          batch_first=True)

    def num_tokens(self, num_input_tokens: int) -> int:
        return self.n_queries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query.unsqueeze(0).repeat(x.shape[0], 1, 1)
        x, _ = self.attn(q, x, x)
        return self._project(x)


ConnectorBuilder = Callable[[dict, int, int, "list[int] | None"], Connector]
CONNECTORS: dict[str, ConnectorBuilder] = {}


def register_connector(name: str, builder: ConnectorBuilder) -> None:
    """Add a connector type; registering a name twice raises."""
    if name in CONNECTORS:
        raise RegistryError(f"connector {name!r} is already registered; pick another name")
    CONNECTORS[name] = builder


def build_connector(spec: dict, input_dim: int, output_dim: int, grid: list[int] | None) -> Connector:
    """Build the connector named by ``spec['type']``; unknown names raise ``RegistryError``."""
    name = spec.get("type")
    if name not in CONNECTORS:
        raise RegistryError(f"unknown connector type {name!r}; valid types: {sorted(CONNECTORS)}")
    return CONNECTORS[name](spec, input_dim, output_dim, grid)


for _name, _cls in (("mlp", MLPConnector), ("spatial_pooling", SpatialPooling), ("attn_pooling", AttnPooling)):
    register_connector(_name, _cls)
