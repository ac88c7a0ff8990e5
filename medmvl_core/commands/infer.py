"""``medmvl infer``: batch inference on MedM-VL's inference JSON (resumable, data parallel).

One GPU / CPU: ``medmvl infer --checkpoint CKPT --data test.json --image3d-dir vols --output out.json``.
Several GPUs or nodes: ``accelerate launch --num_processes 4 -m medmvl_core.cli infer ...``
(each rank takes a shard; rank 0 merges the output in input order).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

NAME = "infer"
HELP = "batch inference on MedM-VL inference JSON (resumable; data parallel with accelerate launch)"
EXAMPLES = ("medmvl infer --checkpoint Resources/demo_model --data phantoms/test_tasks.json --image3d-dir phantoms "
            "--output pred.json --batch-size 16",)
DOCS = "docs/evaluation.md"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="our checkpoint folder or a MedM-VL one (HEAD or v1.0 schema)")
    parser.add_argument("--data", required=True, metavar="FILE.json",
                        help="MedM-VL inference JSON (a trailing gpt turn is kept as the reference 'answer')")
    parser.add_argument("--image-dir", metavar="D", help="folder the items' 'image' paths are relative to")
    parser.add_argument("--image3d-dir", metavar="D", help="folder the items' 'image3d' paths are relative to")
    parser.add_argument("--output", required=True, metavar="OUT.json",
                        help="output: the items with the generated gpt turn; re-running resumes")
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    parser.add_argument("--num-beams", type=int, default=1, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="0 = greedy (default; the papers' setting); > 0 samples")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N",
                        help="samples per generate call (batched by length, left padding)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 ... (default: the accelerate rank's device)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default float32 on CPU, bfloat16 on a GPU")
    parser.add_argument("--save-every", type=float, default=30.0, metavar="S",
                        help="seconds between incremental saves (default 30)")
    parser.add_argument("--seed", type=int, default=42, help="seed for sampling (MedM-VL uses 42)")
    parser.add_argument("--quantize", default="none", choices=["none", "8bit", "4bit"],
                        help="bitsandbytes 8-bit / 4-bit (NF4) LLM weights, as `medmvl serve --quantize` "
                             "(to measure what quantization costs in accuracy)")


def _validate(args: argparse.Namespace) -> None:
    from medmvl_core.errors import ConfigError

    problems = []
    if args.max_new_tokens < 1:
        problems.append("--max-new-tokens must be >= 1")
    if args.num_beams < 1:
        problems.append("--num-beams must be >= 1")
    if args.batch_size < 1:
        problems.append("--batch-size must be >= 1")
    if args.temperature < 0:
        problems.append("--temperature must be >= 0")
    if problems:
        raise ConfigError("; ".join(problems))


def make_generate_batch(model, proc, args: argparse.Namespace, device):
    """``fn(items) -> texts``: processor -> left-padded collate -> model.generate -> decode."""
    import torch

    from medmvl_core.evaluation.batch_infer import media_paths

    dtype = next(model.parameters()).dtype
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                      do_sample=args.temperature > 0, pad_token_id=proc.tokenizer.pad_token_id,
                      eos_token_id=proc.tokenizer.eos_token_id)
    if args.temperature > 0:
        gen_kwargs["temperature"] = args.temperature

    def generate_batch(items: list[dict]) -> list[str]:
        samples = []
        for it in items:
            imgs, vols = media_paths(it, args.image_dir, args.image3d_dir)
            samples.append(proc(it["conversations"], image=imgs or None, image3d=vols or None, mode="generate"))
        batch = proc.collate(samples, padding_side="left")
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        for k in ("images", "images3d"):
            if batch.get(k) is not None:
                inputs[k] = batch[k].to(device=device, dtype=dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, **gen_kwargs)
            texts = proc.batch_decode(out, skip_special_tokens=True)
            ref = "images" if getattr(model, "box_ref_kind", None) == "image" else "images3d"
            return model.resolve_box_refs(texts, inputs.get(ref))  # box reference tokens -> boxes

    return generate_batch


def run(args: argparse.Namespace) -> int:
    import torch
    from accelerate import PartialState
    from tqdm import tqdm

    from medmvl_core.data.datasets import read_json_list
    from medmvl_core.evaluation import batch_infer as bi
    from medmvl_core.model import load_checkpoint

    _validate(args)
    state = PartialState(cpu=(args.device == "cpu"))
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    device = torch.device(args.device) if args.device else state.device
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)

    items = bi.prepare_items(read_json_list(args.data, "--data", "pass MedM-VL inference JSON"))
    keys = bi.keys_with_counts(bi.item_key(it) for it in items)
    done = bi.load_done(out)
    pending = [i for i, k in enumerate(keys) if k not in done]
    state.wait_for_everyone()  # every rank has read the same state before anyone writes
    if main:
        logger.info("%d items, %d already answered, %d to generate on %d process(es)",
                    len(items), len(items) - len(pending), len(pending), world)
    if pending:
        bi.check_media([items[i] for i in pending], args.image_dir, args.image3d_dir)
        torch.manual_seed(args.seed)
        if args.quantize != "none":  # as the worker does: load on the CPU, quantize onto the device
            from medmvl_core.engine.quantize import quantize_model

            model, proc = load_checkpoint(args.checkpoint, device="cpu", dtype=args.dtype)
            model = quantize_model(model, args.quantize, device=device)
        else:
            model, proc = load_checkpoint(args.checkpoint, device=device, dtype=args.dtype)
        lengths = [0] * len(items)
        for i in pending:
            lengths[i] = len(proc.encode(items[i]["conversations"], mode="generate")["input_ids"])
        ordered = sorted(pending, key=lambda i: (-lengths[i], i))
        mine = bi.shard(ordered, rank, world)

        def on_save(new: dict) -> None:  # one process: keep OUT.json itself up to date
            bi.atomic_write_json(out, bi.merge(keys, {**done, **new}))

        t0 = time.perf_counter()
        bar = tqdm(total=len(mine), unit="sample", disable=not main, mininterval=1.0,
                   desc=f"infer (rank {rank}/{world})" if world > 1 else "infer", file=sys.stderr)
        try:
            bi.run_shard(items, keys, mine, make_generate_batch(model, proc, args, device), lengths,
                         args.batch_size, out, rank, world, save_every_s=args.save_every,
                         progress=bar, on_save=on_save if world == 1 else None)
        finally:
            bar.close()
        elapsed = time.perf_counter() - t0
        logger.info("rank %d: %d samples in %.1f s (%.2f samples/s)", rank, len(mine), elapsed,
                    len(mine) / elapsed if elapsed > 0 else 0.0)
    state.wait_for_everyone()
    if main:
        final = bi.merge(keys, bi.load_done(out))
        bi.atomic_write_json(out, final)
        for p in bi.part_files(out):
            p.unlink()
        print(f"wrote {out}: {len(final)}/{len(items)} items answered", file=sys.stderr)
    return 0
