"""``medmvl-train encoder``: supervised dense pretraining of a 3D vision encoder from labelled boxes.

MedM-VL starts from pretrained encoders (M3D-CLIP, MedM-CLIP); a model trained here from scratch
(the demo) needs one too. Language-model loss alone does not teach a from-scratch 3D encoder to see
small findings in a few thousand volumes (measured: the tokens of every phantom end up nearly the
same), so this stage teaches it directly, from boxes:

- a dense head on the stem grid (``dense_stage`` of ``convvit3d``) predicts, per cell, which label's
  box covers it (soft cross-entropy, labelled cells weighted ``fg_weight``);
- per token (the features the connector sees): the same at the token's sub-cells, the label and
  location of the finding covering it most, and that finding's box (L1, only where it covers the token);
- on the CLS token: which (label, location) pairs the volume holds (multi-label) and each present
  label's box, so a model that uses ``select_feature: cls_patch`` gets a summary token as well;
- with ``convvit3d`` ``detections``: the encoder's box head, at every stem cell a finding covers, that
  finding's box (L1 over the 6 coordinates, weighted by the cell's target share, ``det_box_weight``);
  the detection tokens report the box at each label's peak cell.

The heads are dropped at the end; ``OUTPUT/final`` is an encoder folder (``config.json`` +
``model.safetensors``) that a run config uses as ``model.encoder_image3d.path``.

Box file (``medmvl phantoms`` writes ``<split>_boxes.json``)::

    [{"id": "...", "image3d": "images/x.nii.gz",
      "boxes": [{"label": "nodule", "location": "right upper lobe", "box": [z1, y1, x1, z2, y2, x2]}]}]

with boxes in 0-1 of the preprocessed model input (the box format of the model). A 2D encoder
(``img_size`` [1, H, W], a ``kind: image`` preprocessing spec) reads rows that name an ``image``
instead, with boxes ``[0, y1, x1, 1, y2, x2]`` (the radiograph demo model).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from safetensors.torch import save_file
from torch.nn import functional as F

from medmvl_core.errors import ConfigError, DataError
from training.config import _build, read_yaml_config, resolve_config_path

logger = logging.getLogger(__name__)


@dataclass
class EncoderSection:
    type: str = "convvit3d"
    config: dict = field(default_factory=dict)


@dataclass
class PretrainData:
    path: str = ""                   # box file for training
    image3d_dir: Optional[str] = None
    eval_path: Optional[str] = None  # box file for held-out metrics (optional)
    labels: list = field(default_factory=list)      # finding labels, in a fixed order
    locations: list = field(default_factory=list)   # location names, in a fixed order (may be empty)


@dataclass
class PretrainTrain:
    output_dir: str = "runs/encoder"
    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 30
    max_grad_norm: float = 5.0
    fg_weight: float = 10.0
    class_balance: bool = False      # dense/cell weights per label: sqrt(background share / label share), 1-100
    relative_targets: bool = True    # small findings label their best cells/tokens (see make_targets)
    prior: float = 0.0               # >0: heads start predicting background/absent with this probability
    noise_std: float = 0.01          # Gaussian noise added to the normalised input (augmentation)
    log_every: int = 50
    eval_every: int = 250
    threads: int = 0                 # torch threads; 0 = torch's default
    det_box_weight: float = 2.0      # weight of the detection box loss (convvit3d detections only)


@dataclass
class PretrainConfig:
    name: str = "encoder"
    kind: str = "encoder_pretrain"
    seed: int = 0
    encoder: EncoderSection = field(default_factory=EncoderSection)
    preprocessing: dict = field(default_factory=dict)
    data: PretrainData = field(default_factory=PretrainData)
    train: PretrainTrain = field(default_factory=PretrainTrain)
    base_dir: Optional[str] = None

    def resolve_path(self, p: Optional[str]) -> Optional[Path]:
        return resolve_config_path(p, self.base_dir)


def load_pretrain_config(path: str | Path, overrides: list[str] | None = None) -> PretrainConfig:
    raw, base_dir = read_yaml_config(path, overrides)
    problems: list[str] = []
    cfg = _build(PretrainConfig, raw, "", problems)
    cfg.base_dir = base_dir
    if cfg.kind != "encoder_pretrain":
        problems.append(f"kind: {cfg.kind!r} is not 'encoder_pretrain'")
    if cfg.encoder.type != "convvit3d":
        problems.append(f"encoder.type: {cfg.encoder.type!r}; dense pretraining supports 'convvit3d'")
    if not cfg.data.path:
        problems.append("data.path: required (a box file, see training/encoder_pretrain.py)")
    if not cfg.data.labels:
        problems.append("data.labels: list the finding labels")
    if not cfg.preprocessing:
        problems.append("preprocessing: required (the image3d spec the model will use)")
    t = cfg.train
    for name in ("steps", "batch_size"):
        if getattr(t, name) <= 0:
            problems.append(f"train.{name}: must be > 0")
    if t.lr <= 0:
        problems.append("train.lr: must be > 0")
    if not 0 <= t.prior < 1:
        problems.append(f"train.prior: must be in [0, 1), got {t.prior}")
    if not (t.noise_std >= 0 and math.isfinite(t.noise_std)):
        problems.append(f"train.noise_std: must be a finite number >= 0, got {t.noise_std}")
    if not (t.det_box_weight >= 0 and math.isfinite(t.det_box_weight)):
        problems.append(f"train.det_box_weight: must be a finite number >= 0, got {t.det_box_weight}")
    if problems:
        raise ConfigError("invalid encoder pretraining config:\n  " + "\n  ".join(problems))
    return cfg


# ------------------------------------------------------------------------------------------- data
def read_box_file(path: Path, labels: list[str], locations: list[str]) -> list[dict]:
    """Rows of a box file, checked: every label/location known, boxes of 6 ordered values in 0-1."""
    if not path.is_file():
        raise DataError(f"box file {path} does not exist (medmvl phantoms writes <split>_boxes.json)")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"box file {path} is not valid JSON: {exc}") from exc
    if not isinstance(rows, list) or not rows:
        raise DataError(f"box file {path} must hold a non-empty list of rows")
    for n, row in enumerate(rows):
        where = f"{path.name} row {n}"
        if not isinstance(row, dict) or not ("image3d" in row or "image" in row) \
                or not isinstance(row.get("boxes", []), list):
            raise DataError(f"{where}: needs 'image3d' or 'image' (a path) and 'boxes' (a list)")
        for b in row.get("boxes", []):
            if b.get("label") not in labels:
                raise DataError(f"{where}: label {b.get('label')!r} is not in data.labels {labels}")
            if locations and b.get("location") not in locations:
                raise DataError(f"{where}: location {b.get('location')!r} is not in data.locations")
            box = b.get("box")
            if (not isinstance(box, list) or len(box) != 6 or not all(isinstance(v, (int, float)) for v in box)
                    or any(not 0 <= v <= 1 for v in box) or any(box[i] >= box[i + 3] for i in range(3))):
                raise DataError(f"{where}: box {box!r} is not [z1, y1, x1, z2, y2, x2] in 0-1 with z1 < z2 ...")
    return rows


def _coverage(box: list[float], shape: tuple[int, int, int]) -> np.ndarray:
    """Fraction of each cell of a grid of ``shape`` (over the unit cube) that ``box`` covers."""
    cov = []
    for a, n in enumerate(shape):
        edges = np.arange(n + 1) / n
        lo, hi = edges[:-1], edges[1:]
        cov.append(np.clip(np.minimum(hi, box[a + 3]) - np.maximum(lo, box[a]), 0, None) * n)
    return np.einsum("a,b,c->abc", *cov).astype(np.float32)


def make_targets(rows: list[dict], labels: list[str], locations: list[str], dense_grid: list[int],
                 token_grid: list[int], min_cover: float = 0.05, relative: bool = True) -> dict[str, torch.Tensor]:
    """Dense and per-token targets for every row (see the module docstring).

    ``relative`` (default): a finding's cell targets are its coverage divided by its largest cell
    coverage, and it labels every token it covers at least half as much as its best token (as well
    as every token it covers more than ``min_cover``). Without it a finding smaller than a cell or a
    token (a 15 mm calcification covers ~15% of one stem cell and ~0.5% of one token) is a minority
    of every cell's soft label and labels no token at all, so it is never taught as "present".
    """
    n, k = len(rows), len(labels)
    ntok = math.prod(token_grid)
    sub = [d // t for d, t in zip(dense_grid, token_grid)]
    dense = torch.zeros(n, k + 1, *dense_grid)
    box = torch.zeros(n, ntok, k, 6)
    box_mask = torch.zeros(n, ntok, k)
    loc = torch.full((n, ntok), len(locations), dtype=torch.long)
    kind = torch.full((n, ntok), k, dtype=torch.long)
    glob = torch.zeros(n, k * max(len(locations), 1))
    gbox, gbox_mask = torch.zeros(n, k, 6), torch.zeros(n, k)
    for i, row in enumerate(rows):
        best = torch.zeros(ntok)
        for b in row.get("boxes", []):
            li = labels.index(b["label"])
            glob[i, li * max(len(locations), 1) + (locations.index(b["location"]) if locations else 0)] = 1
            gbox[i, li] = torch.tensor(b["box"], dtype=torch.float32)
            gbox_mask[i, li] = 1
            c = torch.from_numpy(_coverage(b["box"], tuple(dense_grid)))
            tok = c.reshape(token_grid[0], sub[0], token_grid[1], sub[1], token_grid[2], sub[2])
            tok = tok.permute(0, 2, 4, 1, 3, 5).reshape(ntok, -1).mean(1)
            hit = tok > min_cover
            if relative:
                c = c / c.max().clamp(min=1e-8)
                hit |= tok >= 0.5 * tok.max()
            dense[i, li + 1] = torch.maximum(dense[i, li + 1], c)
            box[i, hit, li] = torch.tensor(b["box"], dtype=torch.float32)
            box_mask[i, hit, li] = 1
            upd = hit & (tok > best)
            if locations:
                loc[i, upd] = locations.index(b["location"])
            kind[i, upd] = li
            best = torch.maximum(best, tok)
        fg = dense[i, 1:].sum(0)
        dense[i, 1:] /= fg.clamp(min=1.0)  # overlapping findings share a cell
        dense[i, 0] = (1 - fg).clamp(min=0)
    return {"dense": dense, "box": box, "box_mask": box_mask, "loc": loc, "kind": kind, "global": glob,
            "global_box": gbox, "global_box_mask": gbox_mask}


def load_volumes(rows: list[dict], image_dir: Optional[Path], spec: dict, what: str) -> torch.Tensor:
    """Every row's preprocessed volume, [N, C, D, H, W] float32, with progress in the log."""
    from medmvl_core.imaging import preprocess

    out = None
    t0 = time.time()
    for n, row in enumerate(rows):
        p = Path(row.get("image3d") or row["image"])
        if not p.is_absolute() and image_dir is not None:
            p = image_dir / p
        x, _ = preprocess(str(p), spec)
        if np.ndim(x) == 3:  # a 2D image [C, H, W] (spec kind "image") is a one-slice volume here
            x = np.asarray(x)[:, None]
        if out is None:
            out = torch.empty((len(rows), *x.shape), dtype=torch.float32)
        out[n] = torch.from_numpy(np.asarray(x, dtype=np.float32))
        if (n + 1) % 200 == 0 or n + 1 == len(rows):
            logger.info("%s: preprocessed %d/%d volumes (%.0f s)", what, n + 1, len(rows), time.time() - t0)
    return out


# ------------------------------------------------------------------------------------------ model
class DenseHeads(nn.Module):
    """Training-only heads over the encoder's stem grid and tokens."""

    def __init__(self, dense_channels: int, hidden: int, n_labels: int, n_locations: int, sub_cells: int,
                 prior: float = 0.0):
        super().__init__()
        self.k, self.sub = n_labels, sub_cells
        self.dense = nn.Conv3d(dense_channels, n_labels + 1, 1)
        self.norm = nn.LayerNorm(hidden)
        self.cells = nn.Linear(hidden, sub_cells * (n_labels + 1))
        self.box = nn.Linear(hidden, n_labels * 6)
        self.loc = nn.Linear(hidden, n_locations + 1)
        self.glob = nn.Linear(hidden, n_labels * max(n_locations, 1))
        self.glob_box = nn.Linear(hidden, n_labels * 6)
        if prior:  # start from "background / absent" with probability ``prior`` (RetinaNet's prior init)
            with torch.no_grad():
                b = math.log(prior * n_labels / (1 - prior))
                self.dense.bias.zero_()
                self.dense.bias[0] = b
                self.cells.bias.view(sub_cells, n_labels + 1).zero_()
                self.cells.bias.view(sub_cells, n_labels + 1)[:, 0] = b
                self.loc.bias.zero_()
                self.loc.bias[-1] = math.log(prior * max(n_locations, 1) / (1 - prior))
                self.glob.bias.fill_(-math.log(prior / (1 - prior)))

    def forward(self, dense: torch.Tensor, tokens: torch.Tensor, dense_logits: Optional[torch.Tensor] = None):
        """``dense_logits``: the stem classifier's output when the encoder computed it (``dense_tokens``)."""
        h = self.norm(tokens)
        cls, h = h[:, 0], h[:, 1:]
        b, t, _ = h.shape
        return (self.dense(dense) if dense_logits is None else dense_logits, self.cells(h).view(b, t, self.sub, self.k + 1),
                self.box(h).view(b, t, self.k, 6), self.loc(h), self.glob(cls), self.glob_box(cls).view(b, self.k, 6))


def _auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` (ties count half); nan without both classes."""
    pos, neg = score[positive], score[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def _soft_ce(logits: torch.Tensor, target: torch.Tensor, dim: int, weight: torch.Tensor) -> torch.Tensor:
    shape = [1] * logits.dim()
    shape[dim] = -1
    return -(target * F.log_softmax(logits, dim) * weight.view(shape)).sum(dim).mean()


class DensePretrainer:
    def __init__(self, cfg: PretrainConfig):
        from medmvl_core.model.convvit3d import ConvViT3D

        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.encoder = ConvViT3D.from_config(cfg.encoder.config)
        enc = self.encoder
        self.labels = [str(x) for x in cfg.data.labels]
        self.locations = [str(x) for x in cfg.data.locations]
        self.token_grid = list(enc.grid)
        self.dense_grid = list(enc.dense_grid)
        self.sub = [d // t for d, t in zip(self.dense_grid, self.token_grid)]
        if enc.dense_tokens and enc.dense_tokens != len(self.labels):
            raise ConfigError(f"encoder.config.dense_tokens is {enc.dense_tokens} but data.labels has "
                              f"{len(self.labels)} labels; they must agree (dense_tokens counts the labels)")
        self.heads = DenseHeads(enc.dense_channels, enc.hidden_size, len(self.labels), len(self.locations),
                                math.prod(self.sub), cfg.train.prior)
        if enc.dense_tokens:  # the encoder's own stem classifier is the dense head (it ships with the encoder)
            if cfg.train.prior:
                with torch.no_grad():
                    enc.dense_head.bias.copy_(self.heads.dense.bias)
            self.heads.dense = enc.dense_head
        self.weight = torch.tensor([1.0] + [cfg.train.fg_weight] * len(self.labels))
        self.global_pos_weight = torch.tensor(cfg.train.fg_weight)
        self.loc_weight = torch.tensor([cfg.train.fg_weight / 2] * len(self.locations) + [1.0])

    def targets(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return make_targets(rows, self.labels, self.locations, self.dense_grid, self.token_grid,
                            relative=self.cfg.train.relative_targets)

    def losses(self, x: torch.Tensor, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        enc = self.encoder
        parts = enc.forward_parts(x)  # the stem classifier and the box head run once, inside the encoder
        dense, hidden = parts["dense"], parts["hidden_states"]
        ntok = math.prod(self.token_grid)
        # the summary and patch tokens, without the detection tokens or the fixed coord/label channels
        pd, pc, pb, pl, pg, pgb = self.heads(dense, hidden[-1][:, :1 + ntok, :enc.hidden_size], parts["dense_logits"])
        b = x.shape[0]
        k1 = len(self.labels) + 1
        tg, sub = self.token_grid, self.sub
        cells = t["dense"].reshape(b, k1, tg[0], sub[0], tg[1], sub[1], tg[2], sub[2])
        cells = cells.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, math.prod(tg), math.prod(sub), k1)
        bm = t["box_mask"]
        out = {"dense": _soft_ce(pd, t["dense"], 1, self.weight), "cells": _soft_ce(pc, cells, 3, self.weight),
               "box": ((pb - t["box"]).abs().sum(-1) * bm).sum() / bm.sum().clamp(min=1),
               "global": F.binary_cross_entropy_with_logits(pg, t["global"], pos_weight=self.global_pos_weight)}
        gm = t["global_box_mask"]
        out["global_box"] = ((pgb - t["global_box"]).abs().sum(-1) * gm).sum() / gm.sum().clamp(min=1)
        if self.locations:
            out["loc"] = F.cross_entropy(pl.reshape(-1, pl.shape[-1]), t["loc"].reshape(-1), weight=self.loc_weight)
        det = (torch.zeros(b, 0), torch.zeros(b, 0, 6))
        if enc.has_box_head:
            boxes = parts["box_map"]                                            # [B, K, 6, d, h, w]
            w = t["dense"][:, 1:] * gm[:, :, None, None, None]                  # cells each present finding covers
            err = (boxes - t["global_box"][:, :, :, None, None, None]).abs().sum(2)
            out["det_box"] = self.cfg.train.det_box_weight * (err * w).sum() / w.sum().clamp(min=1e-6)
            det = parts["detections"]
        out["_pred"] = (pb, pl, pg, pgb, pc, *det)
        return out

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, t: dict[str, torch.Tensor], batch: int = 25) -> dict[str, float]:
        """Token-level location recall/precision and mean box error (0-1 units) on held-out volumes."""
        self.encoder.eval()
        preds = [self.losses(x[i:i + batch], {k: v[i:i + batch] for k, v in t.items()})["_pred"]
                 for i in range(0, len(x), batch)]
        self.encoder.train()
        pb, pl, pg, pgb, pc, dp, db = (torch.cat(z) for z in zip(*preds))
        pg = pg > 0
        g = t["global"] > 0.5
        none = len(self.locations)
        pred, loc = pl.argmax(-1), t["loc"]
        fg = loc < none
        bm = t["box_mask"]
        tp = float((pg & g).sum())
        gm = t["global_box_mask"]
        res = {"box_error": float(((pb - t["box"]).abs().mean(-1) * bm).sum() / bm.sum().clamp(min=1)),
               "summary_box_error": float(((pgb - t["global_box"]).abs().mean(-1) * gm).sum()
                                          / gm.sum().clamp(min=1)),
               "finding_f1": 2 * tp / max(float(pg.sum() + g.sum()), 1.0),
               "volume_exact": float((pg == g).all(1).float().mean())}
        k, nl = len(self.labels), max(len(self.locations), 1)
        flags = pc.argmax(-1)  # [N, tokens, sub-cells]: 0 = background, i + 1 = label i
        for i, name in enumerate(self.labels):  # per label: found anywhere vs present anywhere
            pi, gi = pg[:, i * nl:(i + 1) * nl].any(1), g[:, i * nl:(i + 1) * nl].any(1)
            res[f"recall_{name}"] = float((pi & gi).sum() / gi.sum().clamp(min=1))
            # the tokens: a present label is seen when a token it mostly covers has a sub-cell labelled i
            on = t["kind"] == i
            present = on.any(1)
            seen = ((flags == i + 1).any(-1) & on).any(1)
            res[f"token_recall_{name}"] = float((seen & present).sum() / present.sum().clamp(min=1))
        if self.encoder.has_box_head:  # the detection tokens: presence (peak probability) and box at the peak
            from medmvl_core.evaluation.phantom_metrics import box_iou

            for i, name in enumerate(self.labels):
                present = gm[:, i] > 0.5
                res[f"det_auc_{name}"] = _auc(dp[:, i], present)
                ious = [box_iou(db[n, i].tolist(), t["global_box"][n, i].tolist()) for n in torch.nonzero(present)[:, 0]]
                res[f"det_iou_{name}"] = float(np.mean(ious)) if ious else float("nan")
        if self.locations:
            res["location_recall"] = float((pred[fg] == loc[fg]).float().mean()) if fg.any() else float("nan")
            flagged = pred < none
            res["finding_precision"] = float((flagged & fg).sum() / flagged.sum().clamp(min=1))
        return res

    def run(self) -> dict[str, Any]:
        cfg, tr = self.cfg, self.cfg.train
        if tr.threads > 0:
            torch.set_num_threads(tr.threads)
        data = cfg.data
        rows = read_box_file(cfg.resolve_path(data.path), self.labels, self.locations)
        img_dir = cfg.resolve_path(data.image3d_dir) if data.image3d_dir else cfg.resolve_path(data.path).parent
        x = load_volumes(rows, img_dir, cfg.preprocessing, "train")
        if list(x.shape[2:]) != self.encoder.img_size:
            raise ConfigError(f"preprocessing makes volumes of size {list(x.shape[2:])} but encoder.config.img_size "
                              f"is {self.encoder.img_size}; make them agree")
        t = self.targets(rows)
        if tr.class_balance:
            share = t["dense"].mean(dim=(0, 2, 3, 4)).clamp(min=1e-8)
            self.weight = (share[0] / share).sqrt().clamp(1.0, 100.0)
            self.weight[0] = 1.0
            logger.info("class weights %s", dict(zip(["background"] + self.labels, self.weight.tolist())))
        ev = None
        if data.eval_path:
            erows = read_box_file(cfg.resolve_path(data.eval_path), self.labels, self.locations)
            ev = (load_volumes(erows, img_dir, cfg.preprocessing, "eval"), self.targets(erows))
        params = list(dict.fromkeys([*self.encoder.parameters(), *self.heads.parameters()]))  # dense head may be shared
        opt = torch.optim.AdamW(params, lr=tr.lr, weight_decay=tr.weight_decay)
        steps = tr.steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(tr.warmup_steps, 1)) * 0.5 * (1 + math.cos(math.pi * s / steps)))
        gen = torch.Generator().manual_seed(cfg.seed)
        out = Path(cfg.resolve_path(tr.output_dir))
        out.mkdir(parents=True, exist_ok=True)
        history, t0 = [], time.time()
        logger.info("encoder pretraining: %d volumes, %d steps of %d, %d encoder parameters", len(x), steps,
                    tr.batch_size, sum(p.numel() for p in self.encoder.parameters()))
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(x), (tr.batch_size,), generator=gen)
            xb = x[idx]
            if tr.noise_std > 0:
                xb = xb + tr.noise_std * torch.randn(xb.shape, generator=gen)
            parts = self.losses(xb, {k: v[idx] for k, v in t.items()})
            loss = sum(v for k, v in parts.items() if not k.startswith("_"))
            if not torch.isfinite(loss):
                raise DataError(f"encoder pretraining: the loss is {loss.item()} at step {step}; lower train.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(nn.utils.clip_grad_norm_(params, tr.max_grad_norm))
            opt.step()
            sched.step()
            rec = {"step": step, "loss": round(float(loss.detach()), 5), "grad_norm": round(gnorm, 3),
                   "elapsed_s": round(time.time() - t0, 1)}
            if step % tr.log_every == 0 or step == steps:
                logger.info("step %d/%d loss %.4f grad_norm %.2f (%s) %.0f s", step, steps, rec["loss"], gnorm,
                            " ".join(f"{k} {float(v.detach()):.3f}" for k, v in parts.items() if not k.startswith("_")),
                            time.time() - t0)
            if ev is not None and (step == steps or (tr.eval_every and step % tr.eval_every == 0)):
                rec["eval"] = self.evaluate(*ev)
                logger.info("step %d eval %s", step, json.dumps(rec["eval"]))
            history.append(rec)
        final = self.save(out / "final")
        # the training heads, beside final/, for inspecting what the encoder learned
        save_file({k: v.detach().contiguous() for k, v in self.heads.state_dict().items()}, str(out / "heads.safetensors"))
        summary = {"steps": steps, "seconds": round(time.time() - t0, 1), "final_loss": history[-1]["loss"],
                   "eval": history[-1].get("eval"), "final_dir": str(final)}
        (out / "history.json").write_text(json.dumps(history))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def save(self, folder: Path) -> Path:
        """An encoder folder: ``config.json`` (the convvit3d config) + ``model.safetensors``."""
        folder.mkdir(parents=True, exist_ok=True)
        sd = {f"vision_encoder.{k}": v.detach().contiguous() for k, v in self.encoder.state_dict().items()}
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        conf = dict(self.cfg.encoder.config)
        conf["model_type"] = "convvit3d"
        (folder / "config.json").write_text(json.dumps(conf, indent=1))
        (folder / "pretrain_config.json").write_text(json.dumps(
            {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "base_dir"}, indent=1, default=str))
        return folder


def run_encoder_pretrain(config: str, overrides: list[str] | None = None) -> dict:
    cfg = load_pretrain_config(config, overrides)
    return DensePretrainer(cfg).run()
