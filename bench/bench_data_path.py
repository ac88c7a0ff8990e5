"""Benchmark: is training limited by data or by compute? Samples/s of the data path alone vs the
model step, on the tiny CT recipe (the reference fixture's CT-Chest model: SigLIP per slice,
attention pooling, a 2-layer Qwen2; full finetuning), with CT volumes of a realistic size.

Data path: MedMVLDataset + collate through a DataLoader (read the .npy, HU window, resize to the
encoder's 32x256x256... as the checkpoint's preprocessing spec says), without the pixel cache,
with it cold (first epoch: preprocess + write) and warm (memory-mapped reads), with 0 and 2
loader workers. Model step: forward + backward + AdamW of the recipe (medmvl-train's own loop).

    python bench/bench_data_path.py [--volumes 16] [--shape 128 256 256] [--steps 6] [--out FILE.json]

Prints a table and the machine; every figure is wall time on this machine (CPU only when no GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine_info import cpu_name  # noqa: E402 - needs the repository on sys.path


def make_volumes(folder: Path, n: int, shape: tuple) -> Path:
    """``n`` synthetic int16 CT volumes (HU-like noise + a body ellipse) and a MedM-VL JSON over them."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    d, h, w = shape
    zz, yy, xx = np.ogrid[:d, :h, :w]
    body = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2 < 1
    rows = []
    for i in range(n):
        f = folder / f"vol_{i}.npy"
        if not f.is_file():
            vol = np.where(body, 40, -1000).astype(np.int16) + rng.integers(-30, 30, shape, dtype=np.int16)
            np.save(f, vol)
        rows.append({"id": f"v{i}", "image3d": f.name, "conversations": [
            {"from": "human", "value": "<image3d>\nIs there any pleural effusion?"},
            {"from": "gpt",
             "value": "No, there is no pleural effusion." if i % 2 else "Yes, a small one on the right."}]})
    data = folder / "data.json"
    data.write_text(json.dumps(rows))
    return data


def data_rate(dataset, collate, batch: int, workers: int) -> float:
    """Samples/s of one pass over the dataset through a DataLoader."""
    import torch

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, collate_fn=collate, num_workers=workers)
    t0 = time.perf_counter()
    n = sum(int(b["n_samples"]) for b in loader)
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=16)
    ap.add_argument("--shape", type=int, nargs=3, default=[128, 256, 256], help="D H W of each stored volume")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps timed for the model step")
    ap.add_argument("--cache", default=None, help="folder for the volumes (default: a temporary one)")
    ap.add_argument("--out", default=None, help="also write the results as JSON")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from medmvl_core.data.streaming import PixelCache
    from training.config import load_config
    from training.data import KeyedCollator
    from training.recipe import Recipe

    tmp = Path(args.cache or tempfile.mkdtemp(prefix="medmvl_bench_data_"))
    data = make_volumes(tmp / "volumes", args.volumes, tuple(args.shape))
    ref = REPO / "Testing" / "data" / "medmvl_reference"
    overrides = [f"model.init_from={ref / 'ct_chest_tiny'}", "tune.llm=full", "tune.encoder_image=full",
                 "tune.connector_image=full", f"data.datasets.0.path={data}",
                 f"data.datasets.0.image3d_dir={tmp / 'volumes'}", "data.datasets.0.ratio=1",
                 f"train.micro_batch_size={args.batch}", "train.max_steps=1", "train.save_final=false",
                 "train.save_every=0", "train.merge_at_end=false", f"train.output_dir={tmp / 'run'}",
                 "log.progress_bar=false",
                 "log.tensorboard=false", "log.loss_curve=false", "log.every=1", "train.precision=fp32"]
    cfg = load_config(REPO / "training" / "configs" / "tiny_ct_finetune_lora_cpu.yaml", overrides)
    recipe = Recipe(cfg)
    recipe.setup()
    collate = KeyedCollator(recipe.data_proc)
    ds = recipe.dataset
    results = {"volumes": args.volumes, "stored_shape": args.shape, "batch": args.batch,
               "model_input_shape": list(ds[0]["images3d"].shape[1:])}
    results["data_no_cache_w0"] = data_rate(ds, collate, args.batch, 0)
    results["data_no_cache_w2"] = data_rate(ds, collate, args.batch, 2)
    ds.pixel_cache = PixelCache(tmp / "pixel_cache")
    results["data_cache_cold_w0"] = data_rate(ds, collate, args.batch, 0)
    results["data_cache_warm_w0"] = data_rate(ds, collate, args.batch, 0)
    results["data_cache_warm_w2"] = data_rate(ds, collate, args.batch, 2)
    ds.pixel_cache = None
    # model step alone: batches made beforehand, then forward + backward + AdamW step, as the recipe does
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, collate_fn=collate)
    batches = [b for _, b in zip(range(args.steps + 1), iter(lambda: next(iter(loader)), None))]
    recipe.step_module.train()
    recipe._enc_tokens = {}

    def step(b):
        scale = 1.0 / max(float((b["labels"][:, 1:] != -100).sum()), 1.0)
        recipe._micro_step(b, scale, sync=True)
        recipe.optimizer.step()
        recipe.optimizer.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up
    t0, cpu0 = time.perf_counter(), time.process_time()
    for b in batches[1:]:
        step(b)
    wall = time.perf_counter() - t0
    results["model_step_samples_per_s"] = args.steps * args.batch / wall
    results["model_step_cpu_s_per_sample"] = (time.process_time() - cpu0) / (args.steps * args.batch)
    results["machine"] = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
                         f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}, " \
                         f"{platform.system()}"
    for k, v in results.items():
        print(f"{k:36s} {v:.2f}" if isinstance(v, float) else f"{k:36s} {v}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
