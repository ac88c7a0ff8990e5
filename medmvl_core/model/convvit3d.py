"""A small hybrid 3D encoder: a convolutional stem, then ViT blocks over the stem's feature grid.

Why it exists: a plain ViT embeds each patch with one linear map, so a finding a few voxels wide
inside an 8x16x16 patch is a small change in a 2048-voxel sum and is hard to learn from a few
thousand CT volumes (the demo's phantom benchmark showed this: a from-scratch M3D-CLIP ViT maps
all phantoms to nearly the same tokens). Convolutions with max pooling keep a small bright or dark
spot visible however it sits in the patch (the "hybrid" ViT of Dosovitskiy et al. 2021, and early
convolutions in Xiao et al. 2021). The demo model uses it; released MedM-VL checkpoints never do.

Layout (config keys): ``img_size`` [D, H, W], ``in_channels``, optional ``pointwise_channels`` (1x1x1
convs with ReLU at full resolution — learned intensity bands, cheap — then a 2x2x2 max pool),
``stem_channels`` (one stage per
entry: 3x3x3 conv, GroupNorm, ReLU, 2x2x2 max pool), ``token_pool`` (a final conv with this kernel
and stride turns the stem grid into tokens of width ``hidden_size``), ``num_layers`` /
``num_heads`` / ``mlp_dim`` of the ViT blocks (M3D-CLIP's block), a CLS token first so
``select_feature: patch`` drops it as for the other 3D encoders. ``cls_pool: max`` replaces the CLS
token's last output by the channel-wise max over the patch tokens: a summary that says "this
finding is somewhere" without having to learn an attention that finds a one-token finding (which
neither a learned CLS token nor a small LLM learned within the demo's training budget).

``input_windows`` (optional, e.g. ``[[0.6, 0.886], [0.886, 1.0]]``): extra input channels, each the
input re-windowed to ``clamp((x - lo) / (hi - lo), 0, 1)`` — fixed, not learned. With a wide CT
window (HU [-1000, 400] scaled to 0-1, the demo's until session 9) a liver cyst differs from liver by
0.1 and a calcification from a nodule by 0.25; a narrow soft-tissue window and a "brighter than soft
tissue" window make those a 0.4-1.0 step that the first convolution sees at once, as a radiologist
switches windows (multi-window inputs are common practice in CT deep learning). The demo model now
windows its input to soft tissue in preprocessing instead (HU [-160, 240]), which measured better.

``dense_tokens`` (optional, the number of finding labels K): the encoder owns the dense classifier
of its stem grid (a 1x1x1 conv to K + 1 classes, background first), and each token gets, added
before the ViT blocks, a learned embedding of the per-label *maximum* of that classifier's
probabilities over the token's stem cells. Why: the stem classifies a finding's peak cell almost
perfectly, but a 15 mm calcification is 1 of a token's 32 cells and the strided conv that makes the
token blurs it into its neighbours (measured on the demo: calcification token recall 0.22 while the
stem's cell accuracy was 23/23); a max keeps a one-cell finding as strong as a large one. The
classifier is trained by ``medmvl-train encoder`` (its ``dense`` loss) and ships with the encoder.

``dense_summary: true`` (with ``dense_tokens``): the summary token (the first) also gets a learned
embedding of each label's maximum probability over the whole stem grid — a clean "which findings
does this volume hold" signal. Measured on the demo's validation phantoms: that maximum separates
volumes with and without a liver cyst perfectly (AUC 1.0) although at low values (median 0.37
against 0.19), which the per-token embedding, mixed into the token features, did not pass on to
the LLM.

``detections: true`` (with ``dense_tokens``): *detection tokens* follow the patch tokens, saying for
each finding label whether and where the stem classifier found it: at the stem cell where the
label's probability peaks, its probability and the box that a small box head (``box_head``: a
3x3x3 conv, ReLU, a 1x1x1 conv to 6 numbers per label) regresses there, as ``[z1, y1, x1, z2, y2,
x2]`` in 0-1 of the input (the box convention of the 3D find task) — a one-detection-per-label
detector in the CenterNet / FCOS manner (the phantoms never hold two findings of one kind). The
tokens are fixed, not learned: one per (label, coordinate, decimal digit — the first two,
``DETECTION_DIGITS``), each the one-hots of those three, the probability and its logit, the units
digit and the digit's value one-hot — the box as its text ``0.375`` reads, so that a language
model could write a box by copying digit by digit — scaled to
the patch tokens' mean length and zero-padded to ``hidden_size``. Why: a patch token here covers
80 x 84 x 84 mm, so the tokens say "a calcification is somewhere in here" but not where within the
token, which decides a 15-30 mm finding's box. The box head is trained by ``medmvl-train encoder``
(its ``det_box`` loss) and ships with the encoder. Measured on the demo (docs/history/demo-model-log.md):
the detections' boxes reach IoU 0.37-0.78 by kind, but the demo's 3-layer LLM did not learn to
copy them within its CPU step budget (trained on find questions alone, on tokens built from the
true boxes, it learned the copy after some 600 steps), so the demo does not use them.

``coord_features: true``: the last layer's tokens (and the normed output) get ``sum(grid)`` more
channels, fixed, not learned: for each patch token the one-hot of its grid index along each axis
(k, j, i), scaled so the three ones have a patch token's mean length; zeros for the summary and
detection tokens. The position embeddings already tell the ViT blocks where a token is, but after
them the position is mixed into the features, and the LLM has to learn to read it back — left
from right for "is there a nodule in the left lung?", and the place a region question's box
points to. This makes it a linear lookup. No weights are added, so a pretrained encoder takes the
flag without retraining (stage 2 trains the connector on the wider tokens).

``label_features: true`` (with ``dense_tokens``): likewise ``dense_tokens`` more channels, each
label's probability from the stem classifier — per patch token its maximum over the token's stem
cells (what ``dense_tokens`` embeds before the ViT blocks), on the summary token its maximum over
the volume — scaled by a patch token's mean length. Why: measured on the demo's test phantoms,
the shipped encoder's stem classifier names 47 of 48 calcifications right at their box, and at the
token holding a calcification's centre the calcification maximum is the largest in 32 of 32 (mean
0.89 against nodule 0.39); yet the LLM reading the ViT blocks' output called most of them nodules
or masses. After the blocks the probabilities are mixed into 128 learned features; here they are
read off directly.

``box_refs: true`` (with ``dense_tokens``): the box head of ``detections`` (trained alike by
``medmvl-train encoder``), but no detection tokens: the tokens the LLM reads are unchanged, and
:meth:`ConvViT3D.find_boxes` gives each label's box at its peak cell for the box reference tokens of
:mod:`medmvl_core.model.box_refs` (the LLM writes ``<|box:nodule|>``, the answer shows this box).
Why: the detections' boxes were good (IoU 0.4-0.8 by kind) but the demo's 3-layer LLM did not learn
to copy them digit by digit within its CPU budget; naming the label is one token it learns at once.

``forward(x) -> (normed output, [block outputs], stem features)``; the stem features (the grid after
``dense_stage`` stages) feed the dense pretraining head in ``training/encoder_pretrain.py``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medmvl_core.errors import ConfigError
from medmvl_core.model.vit3d import _Block

DETECTION_DIGITS = 2  # decimals of each box coordinate given as tokens (0.375 -> 3, 7); the boxes' text has 3


def detection_feature_size(n_labels: int) -> int:
    """Width of a detection token before zero-padding: label, coordinate and digit one-hots, p and
    logit(p), the units digit, a constant, the digit's value one-hot."""
    return n_labels + 6 + DETECTION_DIGITS + 2 + 2 + 10


def detection_features(probs: torch.Tensor, boxes: torch.Tensor, scale: torch.Tensor, width: int) -> torch.Tensor:
    """Fixed detection-token features, one token per (label, box coordinate, decimal digit).

    ``probs`` [B, K], ``boxes`` [B, K, 6] in 0-1, ``scale`` [B] -> [B, K * 6 * DETECTION_DIGITS, width],
    label-major, then coordinate, then digit. Each token holds one decimal digit of one coordinate as
    the box text writes it (``0.375``), so that a language model writes a box by copying: for each
    digit it writes, it attends to the token of that label, coordinate and digit and reads its value.
    """
    b, k = probs.shape
    n = 6 * DETECTION_DIGITS
    dev, dt = probs.device, probs.dtype
    label = torch.eye(k, dtype=dt, device=dev).repeat_interleave(n, 0)                       # [K*n, K]
    coord = torch.eye(6, dtype=dt, device=dev).repeat_interleave(DETECTION_DIGITS, 0).repeat(k, 1)
    digit = torch.eye(DETECTION_DIGITS, dtype=dt, device=dev).repeat(6 * k, 1)
    p = probs.clamp(1e-4, 1 - 1e-4)
    pres = torch.stack((probs, (p.log() - (1 - p).log()) / 4), -1).repeat_interleave(n, 1)   # [B, K*n, 2]
    milli = (boxes.clamp(0, 1) * 1000).round().long()                                       # [B, K, 6], 0..1000
    units = (milli // 1000).unsqueeze(-1).expand(-1, -1, -1, DETECTION_DIGITS)
    power = 10 ** (2 - torch.arange(DETECTION_DIGITS, device=dev))                           # 100, 10, ...
    value = milli.unsqueeze(-1) // power % 10                                                # [B, K, 6, digits]
    f = torch.cat((label.expand(b, -1, -1), coord.expand(b, -1, -1), digit.expand(b, -1, -1), pres,
                   units.reshape(b, -1, 1).to(dt), torch.ones(b, k * n, 1, dtype=dt, device=dev),
                   nn.functional.one_hot(value.reshape(b, -1), 10).to(dt)), -1)
    f = f * (scale.view(b, 1, 1) / f.norm(dim=-1, keepdim=True))
    return nn.functional.pad(f, (0, width - f.shape[-1]))


def _ints(v, n: int, what: str) -> list[int]:
    v = [int(v)] * n if isinstance(v, int) else [int(x) for x in v]
    if len(v) != n:
        raise ConfigError(f"convvit3d {what} must have {n} values, got {v}")
    return v


class ConvViT3D(nn.Module):
    """Input [B, C, D, H, W] -> (normed [B, 1+N, C'], list of [B, 1+N, C'], stem grid [B, c, d, h, w]).

    With ``img_size`` [1, H, W] it is a 2D encoder (the radiograph demo model): it also takes [B, C, H, W],
    the depth axis is never pooled, and its boxes are ``[0, y1, x1, 1, y2, x2]`` (z spans the one slice)."""

    def __init__(self, img_size, in_channels: int = 1, stem_channels=(16, 32, 64), token_pool=(1, 2, 2),
                 hidden_size: int = 128, mlp_dim: int = 256, num_layers: int = 2, num_heads: int = 4,
                 dense_stage: int = 2, groups: int = 4, pointwise_channels=(), cls_pool: str = "token",
                 input_windows=(), dense_tokens: int = 0, dense_summary: bool = False,
                 detections: bool = False, coord_features: bool = False, label_features: bool = False,
                 box_refs: bool = False) -> None:
        super().__init__()
        windows = [tuple(float(v) for v in w) for w in input_windows]
        if any(len(w) != 2 or not w[0] < w[1] for w in windows):
            raise ConfigError(f"convvit3d input_windows must be [lo, hi] pairs with lo < hi, got {input_windows}")
        self.input_windows = windows
        if windows:
            self.register_buffer("_win_lo", torch.tensor([w[0] for w in windows]).view(1, -1, 1, 1, 1), persistent=False)
            self.register_buffer("_win_width", torch.tensor([w[1] - w[0] for w in windows]).view(1, -1, 1, 1, 1),
                                 persistent=False)
        img = _ints(img_size, 3, "img_size")
        pool = _ints(token_pool, 3, "token_pool")
        chans = [int(c) for c in stem_channels]
        if not chans:
            raise ConfigError("convvit3d stem_channels must list at least one stage")
        if hidden_size % num_heads:
            raise ConfigError(f"convvit3d hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if any(c % groups for c in chans):
            raise ConfigError(f"convvit3d stem_channels {chans} must be multiples of {groups} (GroupNorm groups)")
        if not 1 <= dense_stage <= len(chans):
            raise ConfigError(f"convvit3d dense_stage must be between 1 and {len(chans)}, got {dense_stage}")
        pw = [int(c) for c in pointwise_channels]
        # An axis of size 1 (img_size [1, H, W]: a 2D image as a one-slice volume) is never pooled, so
        # the same encoder reads radiographs; the 3x3x3 convolutions then see only their middle plane.
        self._pool_kernel = tuple(1 if s == 1 else 2 for s in img)
        levels = len(chans) + (1 if pw else 0)
        grid = []
        for s, p in zip(img, pool):
            down = 1 if s == 1 else 2 ** levels
            if s % (down * p):
                raise ConfigError(f"convvit3d img_size {img} must be divisible by 2**len(stem_channels) * "
                                  f"token_pool = {down} * {pool} (an axis of size 1 is not pooled)")
            grid.append(s // down // p)
        if cls_pool not in ("token", "max"):
            raise ConfigError(f"convvit3d cls_pool must be 'token' or 'max', got {cls_pool!r}")
        self.cls_pool = cls_pool
        self.img_size, self.grid, self.hidden_size, self.dense_stage = img, grid, hidden_size, dense_stage
        self.dense_channels = chans[dense_stage - 1]
        self.dense_grid = [1 if m == 1 else m // 2 ** (dense_stage + (1 if pw else 0)) for m in img]  # the stem grid
        stages, prev = [], in_channels * (1 + len(windows))  # the input, then each window of it
        if pw:  # per-voxel intensity features ("learned HU bands") at full resolution, then a 2x2x2 max pool
            layers = []
            for c in pw:
                layers += [nn.Conv3d(prev, c, 1), nn.ReLU()]
                prev = c
            self.pointwise = nn.Sequential(*layers, nn.MaxPool3d(self._pool_kernel))
        else:
            self.pointwise = nn.Identity()
        for c in chans:
            stages.append(nn.Sequential(nn.Conv3d(prev, c, 3, padding=1), nn.GroupNorm(groups, c), nn.ReLU(),
                                        nn.MaxPool3d(self._pool_kernel)))
            prev = c
        self.stem = nn.ModuleList(stages)
        self.to_tokens = nn.Conv3d(prev, hidden_size, kernel_size=pool, stride=pool)
        self.dense_tokens = int(dense_tokens)
        if self.dense_tokens < 0:
            raise ConfigError(f"convvit3d dense_tokens must be >= 0 (the number of finding labels), got {dense_tokens}")
        if self.dense_tokens:
            self.dense_head = nn.Conv3d(self.dense_channels, self.dense_tokens + 1, 1)
            self.dense_embed = nn.Linear(self.dense_tokens, hidden_size)
            self._dense_pool = [d // g for d, g in zip(self.dense_grid, grid)]  # stem cells per token, per axis
        if dense_summary and not self.dense_tokens:
            raise ConfigError("convvit3d dense_summary needs dense_tokens (the stem classifier it summarizes)")
        self.dense_summary = nn.Linear(self.dense_tokens, hidden_size) if dense_summary else None
        self.detections = bool(detections)
        self.box_refs = bool(box_refs)
        if self.detections and self.box_refs:
            raise ConfigError("convvit3d takes detections (detection tokens) or box_refs (boxes the LLM refers to), "
                              "not both")
        if self.detections or self.box_refs:
            if not self.dense_tokens:
                raise ConfigError("convvit3d detections / box_refs need dense_tokens (the stem classifier whose peaks "
                                  "they report)")
            need = detection_feature_size(self.dense_tokens)
            if self.detections and hidden_size < need:
                raise ConfigError(f"convvit3d detections need hidden_size >= {need} for {self.dense_tokens} labels, "
                                  f"got {hidden_size}")
            c = self.dense_channels
            self.box_head = nn.Sequential(nn.Conv3d(c, c, 3, padding=1), nn.ReLU(), nn.Conv3d(c, 6 * self.dense_tokens, 1))
            axes = [(torch.arange(n, dtype=torch.float32) + 0.5) / n for n in self.dense_grid]
            centre = torch.stack(torch.meshgrid(*axes, indexing="ij"))                     # [3, d, h, w]
            self.register_buffer("_cell_centre", centre.repeat(2, 1, 1, 1).unsqueeze(0), persistent=False)
            size = torch.tensor([1.0 / n for n in self.dense_grid] * 2).view(1, 6, 1, 1, 1)
            self.register_buffer("_cell_size", size, persistent=False)
        self.label_features = bool(label_features)
        if self.label_features and not self.dense_tokens:
            raise ConfigError("convvit3d label_features needs dense_tokens (the stem classifier whose probabilities it shows)")
        self.coord_features = bool(coord_features)
        if self.coord_features:  # per patch token, the one-hot of its grid index along each axis
            idx = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij")).flatten(1).T
            onehot = torch.cat([nn.functional.one_hot(idx[:, a], n) for a, n in enumerate(grid)], 1).float()
            self.register_buffer("_coords", onehot, persistent=False)                     # [N, sum(grid)]
        self.position_embeddings = nn.Parameter(torch.zeros(1, math.prod(grid), hidden_size))
        nn.init.trunc_normal_(self.position_embeddings, std=0.02)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.blocks = nn.ModuleList([_Block(hidden_size, mlp_dim, num_heads, 0.0, False) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(hidden_size)

    @classmethod
    def from_config(cls, cfg: dict) -> "ConvViT3D":
        known = {"img_size", "in_channels", "stem_channels", "token_pool", "hidden_size", "mlp_dim", "num_layers",
                 "num_heads", "dense_stage", "groups", "pointwise_channels", "cls_pool", "input_windows", "dense_tokens",
                 "dense_summary", "detections", "coord_features", "label_features", "box_refs", "model_type"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"convvit3d config has unknown keys {unknown}; valid: {sorted(known - {'model_type'})}")
        if "img_size" not in cfg:
            raise ConfigError("convvit3d config needs img_size [D, H, W]")
        return cls(**{k: v for k, v in cfg.items() if k != "model_type"})

    @property
    def output_size(self) -> int:
        """Width of the last layer's tokens: ``hidden_size``, plus sum(grid) with ``coord_features``, plus
        ``dense_tokens`` with ``label_features``."""
        return (self.hidden_size + (sum(self.grid) if self.coord_features else 0)
                + (self.dense_tokens if self.label_features else 0))

    @property
    def num_detections(self) -> int:
        """Detection tokens after the patch tokens: 6 * DETECTION_DIGITS per label (0 without ``detections``)."""
        return 6 * DETECTION_DIGITS * self.dense_tokens if self.detections else 0

    def box_map(self, dense: torch.Tensor) -> torch.Tensor:
        """Every stem cell's box for every label: [B, K, 6, d, h, w], 0-1 input coordinates."""
        b = dense.shape[0]
        r = self.box_head(dense).view(b, self.dense_tokens, 6, *dense.shape[2:])
        return self._cell_centre.unsqueeze(1) + self._cell_size.unsqueeze(1) * r

    @property
    def has_box_head(self) -> bool:
        """Whether the encoder has the box head (``detections`` or ``box_refs``)."""
        return self.detections or self.box_refs

    @torch.no_grad()
    def find_boxes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per label, the stem classifier's peak probability [B, K] and the box head's box there [B, K, 6]
        (``[z1, y1, x1, z2, y2, x2]`` in 0-1 of the input) — what a ``box_refs`` reference token stands for.
        Runs the stem only (not the ViT blocks)."""
        if not self.has_box_head:
            raise ConfigError("this convvit3d encoder has no box head (needs detections or box_refs)")
        x = self._stem_input(x)
        for stage in self.stem[:self.dense_stage]:
            x = stage(x)
        p = self.dense_head(x).softmax(1)[:, 1:]
        return self.detect(p, self.box_map(x))

    def _stem_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input checked, with its re-windowed channels (window-major) and the pointwise layers:
        what the first stem stage takes."""
        if x.dim() == 4 and self.img_size[0] == 1:  # a 2D image [B, C, H, W]: the one-slice volume it is
            x = x.unsqueeze(2)
        if list(x.shape[2:]) != self.img_size:
            raise ConfigError(f"convvit3d expects input of spatial size {self.img_size}, got {list(x.shape[2:])}")
        if self.input_windows:  # each input channel, then each channel re-windowed
            w = ((x.unsqueeze(1) - self._win_lo.unsqueeze(2)) / self._win_width.unsqueeze(2)).clamp(0, 1)
            x = torch.cat((x, w.flatten(1, 2)), dim=1)
        return self.pointwise(x)

    def detect(self, probs: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per label, the peak probability [B, K] and the box at the peak cell [B, K, 6] (clamped to 0-1,
        ordered); ``probs`` [B, K, d, h, w] from the stem classifier, ``boxes`` from :meth:`box_map`."""
        peak, idx = probs.flatten(2).max(-1)
        box = boxes.flatten(3).gather(3, idx[:, :, None, None].expand(-1, -1, 6, 1)).squeeze(3).clamp(0, 1)
        lo, hi = torch.minimum(box[..., :3], box[..., 3:]), torch.maximum(box[..., :3], box[..., 3:])
        return peak, torch.cat((lo, hi), -1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        parts = self.forward_parts(x)
        return parts["output"], parts["hidden_states"], parts["dense"]

    def forward_parts(self, x: torch.Tensor) -> dict:
        """``forward`` and what the pretraining losses need from it, computed once: ``output``,
        ``hidden_states``, ``dense`` (stem features), ``dense_logits`` (the stem classifier's, with
        ``dense_tokens``), ``box_map`` and ``detections`` (the per-label peak probability and box that the
        detection tokens show, with ``detections``); absent parts are None."""
        dense = logits = boxes = found = None
        x = self._stem_input(x)
        for n, stage in enumerate(self.stem, 1):
            x = stage(x)
            if n == self.dense_stage:
                dense = x
        x = self.to_tokens(x).flatten(2).transpose(1, 2) + self.position_embeddings
        if self.dense_tokens:  # per token, each label's highest probability over its stem cells
            logits = self.dense_head(dense)
            p = logits.softmax(1)[:, 1:]
            token_max = nn.functional.max_pool3d(p, self._dense_pool, self._dense_pool).flatten(2).transpose(1, 2)
            x = x + self.dense_embed(token_max)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        hidden_states = []
        for blk in self.blocks:
            x = blk(x)
            hidden_states.append(x)
        if self.cls_pool == "max":  # the first token becomes the channel-wise max over the patch tokens
            x = torch.cat((x[:, 1:].amax(1, keepdim=True), x[:, 1:]), dim=1)
            hidden_states[-1] = x
        if self.dense_summary is not None:  # the summary token: each label's highest probability anywhere
            x = torch.cat((x[:, :1] + self.dense_summary(p.amax(dim=(2, 3, 4))).unsqueeze(1), x[:, 1:]), dim=1)
            hidden_states[-1] = x
        if self.detections or self.output_size != self.hidden_size:
            # fixed features are scaled to a patch token's mean length, so the connector weighs them alike
            scale = x[:, 1:].norm(dim=-1).mean(1).detach()
        if self.has_box_head:
            boxes = self.box_map(dense)
            found = peak, box = self.detect(p, boxes)
        if self.detections:  # fixed-feature tokens: each label's peak probability and box, digit by digit
            x = torch.cat((x, detection_features(peak, box, scale, self.hidden_size).to(x.dtype)), dim=1)
            hidden_states[-1] = x
        out = self.norm(x)
        extra = []
        if self.coord_features:  # the last layer's tokens carry their grid position, explicitly
            c = x.new_zeros(x.shape[0], x.shape[1], self._coords.shape[1])
            c[:, 1:1 + self._coords.shape[0]] = self._coords.to(x.dtype) * (scale / math.sqrt(3))[:, None, None]
            extra.append(c)
        if self.label_features:  # ... and each label's probability: the token's maximum, the volume's
            c = x.new_zeros(x.shape[0], x.shape[1], self.dense_tokens)
            c[:, 0] = p.amax(dim=(2, 3, 4)).to(x.dtype)
            c[:, 1:1 + token_max.shape[1]] = token_max.to(x.dtype)
            extra.append(c * scale[:, None, None])
        if extra:
            hidden_states[-1] = torch.cat((x, *extra), dim=-1)
            out = torch.cat((out, *extra), dim=-1)
        return {"output": out, "hidden_states": hidden_states, "dense": dense, "dense_logits": logits,
                "box_map": boxes, "detections": found}
