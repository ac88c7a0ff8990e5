"""``medmvl convert SRC DST``: write a checkpoint (MedM-VL HEAD / v1.0 or ours) in our self-contained format."""

from __future__ import annotations

import argparse

NAME = "convert"
HELP = "convert a MedM-VL checkpoint folder into the self-contained medmvl format (offline)"
EXAMPLES = ("medmvl convert ~/models/MedM-VL-CT-Chest-3B-en ~/models/ct-chest-medmvl --dtype bfloat16",)
DOCS = "docs/models.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint folder (MedM-VL HEAD or v1.0 schema, or medmvl)")
    parser.add_argument("dst", help="output folder (created; must be empty or absent)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="store the weights in this dtype (default: float32)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors shard; bigger models get an index (default 5GB)")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    import torch

    from medmvl_core.errors import CheckpointError
    from medmvl_core.model.loader import load_model_and_tokenizer, make_processor, save_checkpoint

    dst = Path(args.dst)
    if Path(args.src).resolve() == dst.resolve():
        raise CheckpointError("SRC and DST must differ: convert writes a new folder and never overwrites the source")
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"{dst} exists and is not empty; give a new folder")
    t0 = time.perf_counter()
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float32
    model, tokenizer = load_model_and_tokenizer(args.src, device="cpu", dtype=dtype)
    processor = make_processor(model, tokenizer)
    save_checkpoint(model, processor, dst, max_shard_size=args.max_shard_size)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {dst} ({n / 1e6:.1f} M parameters, {args.dtype or 'float32'}) in {time.perf_counter() - t0:.1f} s")
    return 0
