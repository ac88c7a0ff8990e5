"""Data for large corpora: lazy JSON Lines index, per-rank shards (counted across ranks), the
on-disk preprocessed-tensor cache (atomic, keyed by file and spec, shared by loader workers)."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from medmvl_core.data.datasets import MedMVLDataset, load_records, mixture_plan, read_json_rows
from medmvl_core.data.streaming import JsonlIndex, PixelCache, shard
from medmvl_core.errors import DataError
from training.data import rank_micro_batches
from training.testing import INPUTS, REFERENCE, write_dataset


def test_jsonl_index_is_lazy_and_equals_the_rows(tmp_path):
    rows = [{"id": i, "conversations": [{"from": "human", "value": f"q{i} é"}]} for i in range(50)]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    idx = JsonlIndex(p)
    assert len(idx) == 50 and idx.offsets.dtype == np.int64  # 8 bytes per row held, not the rows
    assert idx[37] == rows[37] and idx[-1] == rows[-1] and list(idx) == rows and idx[2:4] == rows[2:4]
    assert read_json_rows(p) == rows
    p.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(DataError, match="row 1"):
        JsonlIndex(p)[1]
    with pytest.raises(IndexError):
        JsonlIndex(p)[2]


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (7, 2), (10, 3), (1000, 8)])
def test_shards_cover_every_item_exactly_once(n, world):
    counts = Counter(i for r in range(world) for i in shard(n, world, r))
    assert sorted(counts) == list(range(n)) and set(counts.values()) <= {1}
    sizes = [len(shard(n, world, r)) for r in range(world)]
    assert max(sizes) - min(sizes) <= 1 if n else sizes == [0] * world
    with pytest.raises(ValueError):
        shard(5, 2, 2)


@pytest.mark.parametrize("world,mb,accum", [(1, 1, 1), (2, 1, 2), (4, 2, 3), (3, 2, 1)])
def test_training_plan_counted_across_ranks(world, mb, accum):
    """Each optimizer step's global batch is split over the ranks with no item twice and none lost;
    only the tail of an epoch that cannot fill a global batch (fewer than G items) is left out."""
    order = [d * 1000 + i for d, i in mixture_plan([23, 9], [1.0, 2.0], epoch=1, seed=3)]
    g = mb * accum * world
    steps = len(order) // g
    seen = Counter(x for s in range(steps) for r in range(world)
                   for b in rank_micro_batches(order, s, mb, accum, world, r) for x in b)
    expected = Counter(order[:steps * g])
    assert seen == expected and len(order) - steps * g < g


def _dataset(tmp_path, cache):
    from medmvl_core.model import load_checkpoint

    _, proc = load_checkpoint(str(REFERENCE / "ct_chest_tiny"))
    data = write_dataset(tmp_path / "data", "image3d", n=4)
    recs = load_records(data, image3d_dir=INPUTS)
    return MedMVLDataset(recs, proc, pixel_cache=cache), proc


def test_pixel_cache_same_tensors_written_once_shared_by_workers(tmp_path):
    root = tmp_path / "cache"
    plain, proc = _dataset(tmp_path, None)
    cached, _ = _dataset(tmp_path, PixelCache(root))
    # two loader worker processes fill the cache for the 4 rows (2 distinct volumes)
    loader = torch.utils.data.DataLoader(cached, batch_size=None, num_workers=2)
    first = [s["images3d"] for s in loader]
    files = sorted(root.rglob("*.npy"))
    assert len(files) == 2 and not list(root.rglob("*.tmp"))
    for i in range(4):
        assert torch.equal(first[i], plain[i]["images3d"])
        assert torch.equal(cached[i]["images3d"], plain[i]["images3d"])
    assert cached.pixel_cache.hits == 4 and cached.pixel_cache.misses == 0  # this process: all from disk
    # another preprocessing spec gets its own entries
    spec = proc.preprocessing["image3d"]
    other = {**spec, "size": [s // 2 for s in spec["size"]]} if "size" in spec else {**spec, "x": 1}
    k1 = PixelCache.key_for(INPUTS / "ct_volume.npy", spec, "image3d")
    assert PixelCache.key_for(INPUTS / "ct_volume.npy", other, "image3d").split("/")[0] != k1.split("/")[0]


def test_pixel_cache_key_follows_the_file_and_survives_corruption(tmp_path):
    f = tmp_path / "v.npy"
    np.save(f, np.zeros((2, 2, 2), np.float32))
    cache = PixelCache(tmp_path / "c")
    k = cache.key_for(f, {"a": 1}, "image3d")
    assert cache.get(k) is None
    cache.put(k, np.ones((1, 2, 2, 2), np.float32))
    assert float(cache.get(k).sum()) == 8.0
    os.utime(f, ns=(0, 12345))  # the file changed: a new key, the old entry is not used
    assert cache.key_for(f, {"a": 1}, "image3d") != k
    entry = next((tmp_path / "c").rglob("*.npy"))
    entry.write_bytes(b"garbage")
    assert cache.get(k) is None  # unreadable entry: a miss (recomputed), not a crash


def test_recipe_with_pixel_cache_and_adapted_accumulation_trains_the_same(tmp_path):
    """The run config wiring: data.pixel_cache fills the cache and trains what an uncached run trains;
    train.global_batch + adapt_grad_accum gives the accumulation that one states explicitly."""
    from training.config import load_config
    from training.recipe import run
    from training.testing import CONFIGS, losses

    data = write_dataset(tmp_path / "data", "image", n=4)
    common = [f"data.datasets.0.path={data}", f"data.datasets.0.image_dir={INPUTS}", "data.datasets.0.ratio=1",
              "train.micro_batch_size=1", "train.max_steps=2", "log.progress_bar=false", "log.every=1",
              "log.loss_curve=false", "log.tensorboard=false", "train.save_final=false"]
    cfg = CONFIGS / "tiny_2d_lora_cpu.yaml"
    run(load_config(cfg, common + ["train.grad_accum=2", f"train.output_dir={tmp_path / 'plain'}"]))
    run(load_config(cfg, common + ["train.global_batch=2", "train.adapt_grad_accum=true", "data.pixel_cache=true",
                                   f"data.pixel_cache_dir={tmp_path / 'pc'}",
                                   f"train.output_dir={tmp_path / 'cached'}"]))
    assert len(list((tmp_path / "pc").rglob("*.npy"))) == 2  # two distinct X-rays
    assert losses(tmp_path / "cached") == losses(tmp_path / "plain")
