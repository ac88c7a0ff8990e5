"""Dense encoder pretraining (training/encoder_pretrain.py) and the conv-stem 3D encoder (convvit3d)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from medmvl_core.errors import ConfigError, DataError

LABELS = ["nodule", "cyst"]
LOCS = ["right upper lobe", "liver"]


def _brute_coverage(box, shape, fine=8):
    """Fraction of each cell covered by ``box``, by counting sub-voxel centres (independent of _coverage)."""
    axes = [(np.arange(n * fine) + 0.5) / (n * fine) for n in shape]
    inside = [(a >= box[i]) & (a < box[i + 3]) for i, a in enumerate(axes)]
    m = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    d, h, w = shape
    return m.reshape(d, fine, h, fine, w, fine).mean(axis=(1, 3, 5))


def test_coverage_matches_counting():
    from training.encoder_pretrain import _coverage

    for box in ([0.1, 0.2, 0.3, 0.45, 0.5, 0.9], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5625, 0.53, 0.9]):
        got = _coverage(box, (8, 16, 16))
        assert np.abs(got - _brute_coverage(box, (8, 16, 16))).max() < 0.07  # 1/fine sampling error


def test_targets_put_a_small_box_in_its_token_only():
    from training.encoder_pretrain import make_targets

    # token grid 2x2x2 over a dense grid 4x4x4: the box lies inside token (1, 0, 1)
    box = [0.55, 0.05, 0.6, 0.7, 0.2, 0.9]
    rows = [{"image3d": "a.nii.gz", "boxes": [{"label": "cyst", "location": "liver", "box": box}]},
            {"image3d": "b.nii.gz", "boxes": []}]
    t = make_targets(rows, LABELS, LOCS, [4, 4, 4], [2, 2, 2])
    tok = 1 * 4 + 0 * 2 + 1
    assert t["loc"][0].tolist() == [2] * tok + [1] + [2] * (7 - tok)      # 2 = "no finding"
    assert t["kind"][0, tok] == 1 and (t["kind"][1] == 2).all()
    assert torch.allclose(t["box"][0, tok, 1], torch.tensor(box)) and t["box_mask"][0].sum() == 1
    assert torch.allclose(t["dense"].sum(1), torch.ones(2, 4, 4, 4))       # a distribution per cell
    assert t["global"][0].tolist() == [0, 0, 0, 1] and t["global"][1].sum() == 0


def test_relative_targets_teach_a_finding_smaller_than_a_cell():
    from training.encoder_pretrain import make_targets

    # 0.1 of a cell on each axis: 0.1% of its cell, far below min_cover of its token
    box = [0.05, 0.05, 0.05, 0.075, 0.075, 0.075]
    rows = [{"image3d": "a.nii.gz", "boxes": [{"label": "nodule", "location": "liver", "box": box},
                                              {"label": "cyst", "location": "liver", "box": [0, 0, 0, 1, 1, 1]}]}]
    absolute = make_targets(rows, LABELS, LOCS, [4, 4, 4], [2, 2, 2], relative=False)
    assert absolute["dense"][0, 1].max() < 0.01 and absolute["box_mask"][0, :, 0].sum() == 0
    rel = make_targets(rows, LABELS, LOCS, [4, 4, 4], [2, 2, 2])
    # the cell holding it is labelled nodule, shared with the cyst that covers everything
    assert torch.allclose(rel["dense"][0, 1:, 0, 0, 0], torch.tensor([0.5, 0.5]))
    assert rel["dense"][0, 1, 1:, 1:, 1:].sum() == 0 and torch.allclose(rel["dense"].sum(1), torch.ones(1, 4, 4, 4))
    assert rel["box_mask"][0, :, 0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]   # only its own token
    assert rel["box_mask"][0, :, 1].tolist() == [1] * 8


def test_box_file_errors(tmp_path):
    from training.encoder_pretrain import read_box_file

    with pytest.raises(DataError, match="does not exist"):
        read_box_file(tmp_path / "none.json", LABELS, LOCS)
    bad = {"unknown": {"label": "tumour", "location": "liver", "box": [0, 0, 0, 1, 1, 1]},
           "not in 0-1": {"label": "cyst", "location": "liver", "box": [0, 0, 0, 2, 1, 1]},
           "reversed": {"label": "cyst", "location": "liver", "box": [0.5, 0, 0, 0.4, 1, 1]}}
    for name, b in bad.items():
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps([{"image3d": "x.nii.gz", "boxes": [b]}]))
        with pytest.raises(DataError, match="tumour" if name == "unknown" else "is not \\[z1"):
            read_box_file(p, LABELS, LOCS)


def test_convvit3d_shapes_and_errors():
    from medmvl_core.model.convvit3d import ConvViT3D
    from medmvl_core.model.encoders import build_encoder

    cfg = {"img_size": [16, 32, 32], "stem_channels": [4, 8], "token_pool": [1, 2, 2], "hidden_size": 32,
           "mlp_dim": 64, "num_layers": 1, "num_heads": 2, "dense_stage": 1}
    enc = build_encoder({"type": "convvit3d", "select_layer": -1, "select_feature": "patch", "config": cfg})
    assert enc.patch_grid() == [4, 4, 4] and enc.num_tokens("patch") == 64 and enc.num_tokens("cls_patch") == 65
    out = enc(torch.randn(2, 1, 16, 32, 32), -1, "cls_patch")
    assert out.shape == (2, 65, 32)
    _, _, dense = enc.encoder.vision_encoder(torch.randn(1, 1, 16, 32, 32))
    assert dense.shape == (1, 4, 8, 16, 16)
    with pytest.raises(ConfigError, match="spatial size"):
        enc(torch.randn(1, 1, 16, 32, 16), -1, "patch")
    with pytest.raises(ConfigError, match="unknown keys"):
        ConvViT3D.from_config(cfg | {"patch_size": 4})
    with pytest.raises(ConfigError, match="divisible"):
        ConvViT3D.from_config(cfg | {"img_size": [16, 32, 36]})
    with pytest.raises(ConfigError, match="input_windows"):
        ConvViT3D.from_config(cfg | {"input_windows": [[0.9, 0.6]]})


def test_convvit3d_input_windows_are_fixed_rewindowed_channels():
    from medmvl_core.model.convvit3d import ConvViT3D

    cfg = {"img_size": [16, 32, 32], "stem_channels": [4, 8], "token_pool": [1, 2, 2], "hidden_size": 32,
           "mlp_dim": 64, "num_layers": 1, "num_heads": 2, "dense_stage": 1,
           "input_windows": [[0.6, 0.9], [0.9, 1.0]]}
    enc = ConvViT3D.from_config(cfg)
    assert enc.stem[0][0].in_channels == 3 and not any("win" in k for k in enc.state_dict())
    seen = {}
    enc.stem[0].register_forward_pre_hook(lambda m, i: seen.update(inp=i[0]))
    x = torch.tensor([0.0, 0.6, 0.75, 0.9, 0.95, 1.0]).view(1, 1, 6, 1, 1).expand(1, 1, 6, 32, 32)
    enc(torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 10)))
    got = seen["inp"][0, :, :6, 0, 0]
    assert torch.allclose(got[0], x[0, 0, :, 0, 0])                                   # the input itself
    assert torch.allclose(got[1], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 1.0]), atol=1e-6)  # soft tissue
    assert torch.allclose(got[2], torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 1.0]), atol=1e-6)  # brighter


def test_convvit3d_coord_features_append_each_tokens_grid_position():
    from medmvl_core.model.encoders import build_encoder

    cfg = {"img_size": [16, 32, 64], "stem_channels": [4, 8], "token_pool": [1, 2, 2], "hidden_size": 32,
           "mlp_dim": 64, "num_layers": 2, "num_heads": 2, "dense_stage": 1, "cls_pool": "max"}
    torch.manual_seed(0)
    plain = build_encoder({"type": "convvit3d", "config": cfg})
    enc = build_encoder({"type": "convvit3d", "config": cfg | {"coord_features": True}})
    enc.load_state_dict(plain.state_dict())  # no new weights: the same encoder, wider tokens
    assert plain.patch_grid() == [4, 4, 8] and plain.hidden_size == 32 and enc.hidden_size == 32 + 16
    x = torch.rand(2, 1, 16, 32, 64)
    with torch.no_grad():
        a, b = plain(x, -1, "cls_patch"), enc(x, -1, "cls_patch")
    assert b.shape == (2, 1 + 128, 48)
    assert torch.equal(b[..., :32], a)                      # the features themselves unchanged
    assert torch.equal(b[:, 0, 32:], torch.zeros(2, 16))    # the summary token has no position
    coords = b[:, 1:, 32:]
    scale = a[:, 1:].norm(dim=-1).mean(1) / 3 ** 0.5
    for n in (0, 1, 8, 37, 127):                            # token n is grid cell (k, j, i), i fastest
        k, j, i = n // 32, (n // 8) % 4, n % 8
        want = torch.zeros(16)
        want[[k, 4 + j, 8 + i]] = 1.0
        assert torch.allclose(coords[:, n], want * scale[:, None], atol=1e-5), n
    with pytest.raises(ConfigError, match="last layer"):
        enc(x, 0, "cls_patch")


TINY_DENSE = {"img_size": [16, 32, 32], "stem_channels": [4, 8], "token_pool": [1, 2, 2], "hidden_size": 32,
              "mlp_dim": 64, "num_layers": 1, "num_heads": 2, "dense_stage": 1, "dense_tokens": 3}


def _tiny_dense(**extra):
    """A seeded tiny ``convvit3d`` with a stem classifier (``TINY_DENSE`` | ``extra``), its config and an input."""
    from medmvl_core.model.convvit3d import ConvViT3D

    cfg = TINY_DENSE | extra
    torch.manual_seed(0)
    enc = ConvViT3D.from_config(cfg)
    return cfg, enc, torch.rand(2, 1, 16, 32, 32)


def _stem_probs(enc, stem):
    """The stem classifier's label probabilities [B, K, d, h, w], computed here from its 1x1x1 conv weights."""
    return torch.softmax(torch.einsum("bcdhw,kc->bkdhw", stem, enc.dense_head.weight[:, :, 0, 0, 0])
                         + enc.dense_head.bias.view(1, -1, 1, 1, 1), 1)[:, 1:]


def test_convvit3d_dense_tokens_add_each_tokens_max_label_probability():
    from medmvl_core.model.convvit3d import ConvViT3D

    cfg, enc, x = _tiny_dense()
    assert {"dense_head.weight", "dense_embed.weight"} <= set(enc.state_dict())
    seen = {}
    enc.blocks[0].register_forward_pre_hook(lambda m, i: seen.update(tokens=i[0].clone()))
    with torch.no_grad():
        enc.dense_head.weight.normal_(0, 3.0)  # make the probabilities differ between cells
        enc.dense_embed.weight.zero_()
        enc.dense_embed.bias.zero_()
        _, _, stem = enc(x)
        without = seen["tokens"]
        enc.dense_embed.weight[:3].copy_(torch.eye(3))  # channel i of each token = label i's probability
        enc(x)
    added = (seen["tokens"] - without)[:, 1:]  # drop the CLS token
    assert torch.allclose(added[..., 3:], torch.zeros(()), atol=1e-6)
    # independently: softmax over the stem grid [8, 16, 16], max over each token's 2 x 4 x 4 cells
    p = _stem_probs(enc, stem)
    want = p.reshape(2, 3, 4, 2, 4, 4, 4, 4).amax(dim=(3, 5, 7)).reshape(2, 3, 64).transpose(1, 2)
    assert torch.allclose(added[..., :3], want, atol=1e-5)
    assert want.max() > 0.9 and want.min() < 0.1  # a real spread: the check above could fail
    with pytest.raises(ConfigError, match="dense_tokens must be >= 0"):
        ConvViT3D.from_config(cfg | {"dense_tokens": -1})


def test_convvit3d_dense_summary_adds_each_labels_volume_maximum_to_the_summary_token():
    from medmvl_core.model.convvit3d import ConvViT3D

    cfg, enc, x = _tiny_dense(cls_pool="max", dense_summary=True)
    with torch.no_grad():
        enc.dense_head.weight.normal_(0, 3.0)
        enc.dense_summary.weight.zero_()
        enc.dense_summary.bias.zero_()
        _, without, stem = enc(x)
        enc.dense_summary.weight[:3].copy_(torch.eye(3))
        _, with_, _ = enc(x)
    added = with_[-1] - without[-1]
    assert torch.allclose(added[:, 1:], torch.zeros(()))  # the patch tokens are untouched
    p = _stem_probs(enc, stem)
    assert torch.allclose(added[:, 0, :3], p.flatten(2).amax(-1), atol=1e-5)
    assert torch.allclose(added[:, 0, 3:], torch.zeros(()))
    with pytest.raises(ConfigError, match="dense_summary needs dense_tokens"):
        ConvViT3D.from_config(cfg | {"dense_tokens": 0})


def test_convvit3d_label_features_append_each_tokens_label_maxima_and_the_volumes():
    from medmvl_core.model.convvit3d import ConvViT3D

    cfg, plain, x = _tiny_dense(cls_pool="max")
    enc = ConvViT3D.from_config(cfg | {"label_features": True, "coord_features": True})
    with torch.no_grad():
        plain.dense_head.weight.normal_(0, 3.0)
        enc.load_state_dict(plain.state_dict())
        _, a, stem = plain(x)
        out, b, _ = enc(x)
    assert enc.output_size == 32 + 12 + 3 and b[-1].shape == out.shape == (2, 65, 47)
    assert torch.equal(b[-1][..., :32], a[-1]) and torch.equal(b[-1][..., 32:], out[..., 32:])
    got = b[-1][..., 44:] / a[-1][:, 1:].norm(dim=-1).mean(1)[:, None, None]
    p = _stem_probs(enc, stem)  # independently: max over each token's 2 x 4 x 4 stem cells
    want = p.reshape(2, 3, 4, 2, 4, 4, 4, 4).amax(dim=(3, 5, 7)).reshape(2, 3, 64).transpose(1, 2)
    assert torch.allclose(got[:, 1:], want, atol=1e-5) and want.max() > 0.9 and want.min() < 0.1
    assert torch.allclose(got[:, 0], p.flatten(2).amax(-1), atol=1e-5)  # the summary: the volume's maxima
    with pytest.raises(ConfigError, match="label_features needs dense_tokens"):
        ConvViT3D.from_config(cfg | {"dense_tokens": 0, "label_features": True})
    from medmvl_core.model.encoders import build_encoder

    two = build_encoder({"type": "convvit3d", "config": cfg | {"label_features": True, "num_layers": 2}})
    with pytest.raises(ConfigError, match="label_features gives those at the last layer only"):
        two(x, 0, "cls_patch")


def test_convvit3d_detection_tokens_give_each_labels_peak_probability_and_the_box_there():
    from medmvl_core.model.convvit3d import DETECTION_DIGITS, ConvViT3D, detection_feature_size
    from medmvl_core.model.encoders import ConvViT3DEncoder

    assert DETECTION_DIGITS == 2  # the layout below: tenths and hundredths of each coordinate
    cfg, enc, x = _tiny_dense(cls_pool="max", detections=True)
    with torch.no_grad():
        enc.dense_head.weight.normal_(0, 3.0)
        enc.box_head[-1].weight.normal_(0, 2.0)  # boxes spread over the volume
        out, hidden, stem = enc(x)
        parts = enc.forward_parts(x)
    n = 3 * 6 * 2
    assert enc.num_detections == n and hidden[-1].shape == out.shape == (2, 1 + 64 + n, 32)
    det = hidden[-1][:, -n:].view(2, 3, 6, 2, 32)  # label-major, then coordinate, then digit
    # as long as the patch tokens on average
    assert torch.allclose(det.norm(dim=-1), hidden[-1][:, 1:65].norm(dim=-1).mean(1).view(2, 1, 1, 1).expand(2, 3, 6, 2))
    unit = det / det.norm(dim=-1, keepdim=True)
    # independently: each label's peak over the stem grid [8, 16, 16] and the box head's box at that cell
    p = _stem_probs(enc, stem)
    r = enc.box_head(stem).view(2, 3, 6, 8, 16, 16)
    texts = []
    for b in range(2):
        for k in range(3):
            peak = torch.argmax(p[b, k])
            d, rest = divmod(int(peak), 16 * 16)
            h, w = divmod(rest, 16)
            centre = torch.tensor([(d + 0.5) / 8, (h + 0.5) / 16, (w + 0.5) / 16] * 2)
            size = torch.tensor([1 / 8, 1 / 16, 1 / 16] * 2)
            box = (centre + size * r[b, k, :, d, h, w]).clamp(0, 1)
            box = torch.cat((torch.minimum(box[:3], box[3:]), torch.maximum(box[:3], box[3:])))
            assert torch.allclose(parts["detections"][0][b, k], p[b, k].max())
            assert torch.allclose(parts["detections"][1][b, k], box, atol=1e-6)
            tok = unit[b, k].reshape(12, 32)                                          # coordinate-major
            one = tok[:, k]                                                           # a one-hot entry's size
            assert (tok[:, :3] > 0).sum() == 12 and (tok[:, :3].argmax(-1) == k).all()   # which label
            assert torch.equal(tok[:, 3:9].argmax(-1), torch.arange(6).repeat_interleave(2))  # which coordinate
            assert torch.equal(tok[:, 9:11].argmax(-1), torch.arange(2).repeat(6))     # which digit
            assert torch.allclose(tok[:, 11] / one, p[b, k].max().expand(12), atol=1e-5)  # its peak probability
            digits = tok[:, 15:25].argmax(-1).view(6, 2)                               # the box, as "0.375" reads
            units = (tok[::2, 13] > 0).int()
            text = ["%d.%d%d" % (u, d0, d1) for u, (d0, d1) in zip(units.tolist(), digits.tolist())]
            assert text == [f"{v:.3f}"[:4] for v in box.tolist()], (text, box)
            texts += text
    assert len(set(texts)) > 10  # the boxes differ: the digit check could fail
    assert (hidden[-1][:, -n:, detection_feature_size(3):] == 0).all()             # zero-padded
    assert p.flatten(2).amax(-1).min() < 0.9 < p.flatten(2).amax(-1).max()          # peaks differ: could fail
    # the wrapper counts them and refuses a layer that has none
    spec = {"config": cfg, "select_layer": -1, "select_feature": "cls_patch"}
    wrapped = ConvViT3DEncoder(spec)
    assert wrapped.num_tokens("cls_patch") == 65 + n and wrapped.num_tokens("patch") == 64 + n
    assert wrapped(x, -1, "patch").shape == (2, 64 + n, 32)
    with pytest.raises(ConfigError, match="detections, coord_features or label_features gives those at the last layer only"):
        ConvViT3DEncoder(spec | {"config": cfg | {"num_layers": 2}})(x, -2, "patch")
    with pytest.raises(ConfigError, match="detections / box_refs need dense_tokens"):
        ConvViT3D.from_config(cfg | {"dense_tokens": 0})
    with pytest.raises(ConfigError, match="hidden_size >= 25"):
        ConvViT3D.from_config(cfg | {"hidden_size": 24})


def test_dense_tokens_share_the_pretraining_dense_head_and_must_count_the_labels(tmp_path):
    from training.encoder_pretrain import DensePretrainer, load_pretrain_config

    path = _phantom_set(tmp_path)
    with pytest.raises(ConfigError, match="dense_tokens is 3 but data.labels has 5"):
        DensePretrainer(load_pretrain_config(path, ["encoder.config.dense_tokens=3"]))
    pre = DensePretrainer(load_pretrain_config(path, ["encoder.config.dense_tokens=5", "train.prior=0.9"]))
    assert pre.heads.dense is pre.encoder.dense_head  # the loss trains the classifier the tokens use
    assert torch.allclose(pre.encoder.dense_head(torch.zeros(1, pre.encoder.dense_channels, 1, 1, 1)).softmax(1)[0, 0],
                          torch.tensor(0.9))


def test_box_rows_match_the_task_boxes(tmp_path):
    from medmvl_core.data.phantom_dataset import generate_dataset

    generate_dataset(tmp_path, {"train": 4}, seed=3, kind="both")
    rows = json.loads((tmp_path / "train_boxes.json").read_text())
    tasks = json.loads((tmp_path / "train_tasks.json").read_text())
    ct = [r for r in rows if r["id"].startswith("ct")]
    xr = [r for r in rows if r["id"].startswith("xr")]
    assert len(ct) == 4 and all(r["image3d"].endswith(".nii.gz") for r in ct)
    assert len(xr) == 4 and all(r["image"].endswith(".png") for r in xr)   # radiographs: the 2D demo's stage 1
    finds = [(t["phantom"], t["truth"]["kind"], t["truth"]["box"]) for t in tasks if t["task"] == "find"]
    by_id = {r["id"]: r for r in rows}
    assert {p[:2] for p, _, _ in finds} == {"ct", "xr"}
    for pid, kind, box in finds:
        match = [b for b in by_id[pid]["boxes"] if b["label"] == kind]
        if pid.startswith("ct"):
            assert np.allclose(match[0]["box"], box, atol=6e-4)
        else:  # [0, y1, x1, 1, y2, x2] in 0-1 against the task's {<x1><y1><x2><y2>} in 0-100 (rounded)
            z1, y1, x1, z2, y2, x2 = match[0]["box"]
            assert (z1, z2) == (0, 1)
            assert np.allclose([x1 * 100, y1 * 100, x2 * 100, y2 * 100], box, atol=0.51)


def _phantom_set(tmp_path, **encoder):
    from medmvl_core.data.phantom_dataset import generate_dataset

    generate_dataset(tmp_path / "ph", {"train": 6, "val": 2}, seed=1)
    cfg = {"kind": "encoder_pretrain", "seed": 0,
           "encoder": {"type": "convvit3d", "config": {"img_size": [16, 32, 32], "stem_channels": [4, 8],
                                                       "token_pool": [1, 2, 2], "hidden_size": 32, "mlp_dim": 64,
                                                       "num_layers": 1, "num_heads": 2, "dense_stage": 1} | encoder},
           "preprocessing": {"kind": "volume", "hu_window": [-1000, 400], "crop_foreground": False,
                             "size": [16, 32, 32], "orientation": "LPS", "cast_uint8": False, "channels": 1,
                             "normalize": {"type": "minmax"}},
           "data": {"path": str(tmp_path / "ph" / "train_boxes.json"), "eval_path": str(tmp_path / "ph" / "val_boxes.json"),
                    "labels": ["nodule", "mass", "calcification", "cyst", "effusion"],
                    "locations": ["right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe",
                                  "left lower lobe", "liver", "right pleural space", "left pleural space"]},
           "train": {"output_dir": str(tmp_path / "enc"), "steps": 30, "batch_size": 4, "lr": 3e-3,
                     "log_every": 10, "eval_every": 0}}
    p = tmp_path / "enc.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_pretrain_run_lowers_the_loss_and_the_folder_loads_as_an_encoder(tmp_path, capsys):
    from safetensors.torch import load_file

    from training.cli import main

    cfg = _phantom_set(tmp_path, dense_tokens=5)  # the demo encoder's layout: its stem classifier ships with it
    assert main(["encoder", "--config", str(cfg)]) == 0
    assert "held-out" in capsys.readouterr().out
    hist = json.loads((tmp_path / "enc" / "history.json").read_text())
    first, last = np.mean([h["loss"] for h in hist[:5]]), np.mean([h["loss"] for h in hist[-5:]])
    assert last < 0.7 * first, (first, last)
    assert "finding_f1" in hist[-1]["eval"]
    assert {"dense.weight", "cells.weight"} <= set(load_file(str(tmp_path / "enc" / "heads.safetensors")))
    final = tmp_path / "enc" / "final"
    saved = load_file(str(final / "model.safetensors"))
    assert "vision_encoder.dense_head.weight" in saved and "vision_encoder.dense_embed.weight" in saved

    from training.build import build_from_parts
    from training.config import load_config

    run = {"model": {"llm": {"config": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
                                        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                        "vocab_size": 300}},
                     "tokenizer": str(tmp_path / "tok"),
                     "encoder_image3d": {"type": "convvit3d", "path": str(final),
                                         "options": {"select_feature": "cls_patch"}},
                     "connector_image3d": {"type": "mlp"}},
           "data": {"datasets": [{"path": str(tmp_path / "ph" / "train.json")}]}}
    from medmvl_core.data.phantom_tokenizer import train_phantom_tokenizer

    train_phantom_tokenizer(["Findings: a cyst is seen in the liver."] * 4, tmp_path / "tok", vocab_size=280)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    model, _ = build_from_parts(load_config(tmp_path / "run.yaml"))
    got = model.encoder_image3d.encoder.state_dict()
    assert set(got) == set(saved)
    assert all(torch.equal(got[k], saved[k]) for k in saved)


def test_coord_and_label_features_leave_pretraining_unchanged(tmp_path):
    from safetensors.torch import load_file

    from training.cli import main

    out = {}
    for name, extra in (("plain", {}), ("flags", {"coord_features": True, "label_features": True})):
        d = tmp_path / name
        d.mkdir()
        cfg = _phantom_set(d, dense_tokens=5, **extra)
        assert main(["encoder", "--config", str(cfg), "train.steps=8", "train.eval_every=0"]) == 0
        out[name] = (load_file(str(d / "enc" / "final" / "model.safetensors")),
                     json.loads((d / "enc" / "final" / "config.json").read_text()))
    (a, ca), (b, cb) = out["plain"], out["flags"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # the same weights
    assert cb["coord_features"] is True and cb["label_features"] is True and "label_features" not in ca


def test_pretraining_with_detections_trains_the_box_head_and_reports_detection_metrics(tmp_path):
    from safetensors.torch import load_file

    from training.encoder_pretrain import DensePretrainer, load_pretrain_config, load_volumes, read_box_file

    cfg = load_pretrain_config(_phantom_set(tmp_path, dense_tokens=5, detections=True),
                               ["train.steps=120", "train.eval_every=120"])
    pre = DensePretrainer(cfg)
    rows = read_box_file(cfg.resolve_path(cfg.data.path), pre.labels, pre.locations)
    x = load_volumes(rows, cfg.resolve_path(cfg.data.path).parent, cfg.preprocessing, "train")
    t = pre.targets(rows)
    with torch.no_grad():
        before = float(pre.losses(x, t)["det_box"])
    summary = pre.run()
    with torch.no_grad():
        after = float(pre.losses(x, t)["det_box"])
    assert after < 0.8 * before, (before, after)  # measured 1.22 -> 0.86
    ev = summary["eval"]
    for name in pre.labels:
        assert f"det_auc_{name}" in ev and f"det_iou_{name}" in ev
    present = [v for k, v in ev.items() if k.startswith("det_iou_") and v == v]
    assert present and all(0.0 <= v <= 1.0 for v in present)
    saved = load_file(str(tmp_path / "enc" / "final" / "model.safetensors"))
    assert any(k.startswith("vision_encoder.box_head.") for k in saved)  # the box head ships with the encoder


def test_auc_against_counting():
    from training.encoder_pretrain import _auc

    score = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.3])
    pos = torch.tensor([True, False, True, False, False])
    # positives 0.9 and 0.5 against negatives 0.1, 0.5, 0.3: 3 + (2 + 0.5) wins out of 6 pairs
    assert _auc(score, pos) == pytest.approx(5.5 / 6)
    assert _auc(score, torch.zeros(5, dtype=torch.bool)) != _auc(score, torch.zeros(5, dtype=torch.bool))  # nan


def test_bad_pretrain_configs(tmp_path):
    from training.encoder_pretrain import load_pretrain_config

    cfg = _phantom_set(tmp_path)
    with pytest.raises(ConfigError, match="unknown key"):
        load_pretrain_config(cfg, ["train.epochs=3"])
    with pytest.raises(ConfigError, match="supports 'convvit3d'"):
        load_pretrain_config(cfg, ["encoder.type=m3dclip"])
    with pytest.raises(ConfigError, match="train.det_box_weight: must be a finite number >= 0"):
        load_pretrain_config(cfg, ["train.det_box_weight=-1"])
    with pytest.raises(ConfigError, match="preprocessing makes volumes"):
        from training.encoder_pretrain import DensePretrainer

        DensePretrainer(load_pretrain_config(cfg, ["preprocessing.size=[16,32,64]"])).run()


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    from training.encoder_pretrain import DensePretrainer, load_pretrain_config

    path = _phantom_set(tmp_path)
    with pytest.raises(ConfigError, match="noise_std: must be a finite number"):
        load_pretrain_config(path, ["train.noise_std=.nan"])
    cfg = load_pretrain_config(path, ["train.lr=1e30", "train.warmup_steps=1", "train.steps=5"])
    with pytest.raises(DataError, match=r"loss is (nan|inf) at step [2-5]; lower train.lr"):
        DensePretrainer(cfg).run()
    assert not (tmp_path / "enc" / "final").exists()


def test_prior_init_starts_the_heads_at_background(tmp_path):
    from training.encoder_pretrain import DenseHeads, load_pretrain_config

    heads = DenseHeads(8, 32, n_labels=5, n_locations=8, sub_cells=4, prior=0.95)
    cells = heads.cells(torch.zeros(32)).view(4, 6).softmax(-1)
    assert torch.allclose(cells[:, 0], torch.full((4,), 0.95)) and torch.allclose(cells[:, 1:], torch.full((4, 5), 0.01))
    assert torch.allclose(heads.dense(torch.zeros(1, 8, 1, 1, 1)).softmax(1)[0, 0], torch.tensor(0.95))
    assert torch.allclose(heads.loc(torch.zeros(32)).softmax(-1)[-1], torch.tensor(0.95))
    assert torch.allclose(torch.sigmoid(heads.glob(torch.zeros(32))), torch.full((40,), 0.05))
    plain = DenseHeads(8, 32, n_labels=5, n_locations=8, sub_cells=4)
    assert plain.cells(torch.zeros(32)).view(4, 6).softmax(-1)[0, 0] < 0.5
    cfg = _phantom_set(tmp_path)
    with pytest.raises(ConfigError, match="train.prior"):
        load_pretrain_config(cfg, ["train.prior=1.0"])
