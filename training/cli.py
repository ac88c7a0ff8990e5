"""``medmvl-train``: train (default), ``encoder`` (dense encoder pretraining), ``validate`` a data file,
``merge`` a LoRA adapter.

    medmvl-train --config training/configs/NAME.yaml [key=value ...] [--resume [DIR]]
    medmvl-train encoder --config training/configs/demo_encoder.yaml [key=value ...]
    medmvl-train validate --data FILE.json [--image-dir D] [--image3d-dir D] [--checkpoint CKPT]
    medmvl-train merge --adapter DIR --out DIR [--base CKPT]

Multi-GPU / multi-node: run the same command under ``accelerate launch --config_file
training/accelerate/<setup>.yaml -m training.cli ...`` or ``torchrun ... -m training.cli ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from medmvl_core.errors import MedMVLError

logger = logging.getLogger(__name__)

EXAMPLES = {
    "train": ("medmvl-train --config training/configs/demo_lora.yaml train.max_steps=20",
              "medmvl-train --config CONFIG.yaml --resume"),
    "encoder": ("medmvl-train encoder --config training/configs/demo_encoder.yaml train.steps=200",),
    "validate": ("medmvl-train validate --data data/train.json --image3d-dir data/volumes",),
    "merge": ("medmvl-train merge --adapter runs/demo_lora/final --out runs/demo_lora/merged",),
}
DOCS = "docs/training.md"


def _epilog(name: str) -> str:
    """Examples, the other subcommands (the default ``train`` lists them all) and the docs page."""
    ex = EXAMPLES[name]
    lines = ["examples:" if len(ex) > 1 else "example:"] + [f"  {e}" for e in ex]
    if name == "train":
        lines += ["", "commands (medmvl-train COMMAND -h):",
                  "  (none)    train: pretrain or finetune a model from a YAML config (this help)"]
        lines += [f"  {n:<9} {COMMANDS[n][0]().description.splitlines()[0]}" for n in COMMANDS if n != "train"]
    lines += ["", f"documentation: {DOCS}"]
    return "\n".join(lines)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A subcommand's parser with the options every subcommand shares (``-v``)."""
    name = prog.split()[1] if " " in prog else "train"
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=_epilog(name),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    return p


def _train_parser() -> argparse.ArgumentParser:
    p = _parser("medmvl-train", "Train MedM-VL models from a YAML config: pretrain, finetune (full, LoRA, QLoRA).")
    p.add_argument("--config", required=True, help="YAML config (see training/configs/README.md)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=2e-5")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="DIR",
                   help="continue a stopped run: from its latest checkpoint in train.output_dir (no value) "
                        "or from a given checkpoints/step-N folder. Not the same as model.init_from.")
    p.add_argument("--dry-run", action="store_true", help="load and validate config and data, build the model, stop")
    return p


def _validate_parser() -> argparse.ArgumentParser:
    p = _parser("medmvl-train validate", "Check a MedM-VL JSON data file and print a summary.")
    p.add_argument("--data", required=True, help="MedM-VL JSON file")
    p.add_argument("--image-dir", default=None, help="folder that 'image' paths are relative to")
    p.add_argument("--image3d-dir", default=None, help="folder that 'image3d' paths are relative to")
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint (or tokenizer-bearing model folder) to encode every row with: "
                        "checks template/labels and lengths with image tokens")
    p.add_argument("--max-length", type=int, default=None, help="token limit (default: the checkpoint's)")
    p.add_argument("--read-images", action="store_true", help="also read every image/volume file")
    p.add_argument("--inference", action="store_true", help="rows need no answer (inference data)")
    p.add_argument("--max-listed", type=int, default=20, help="problems to list")
    return p


def _encoder_parser() -> argparse.ArgumentParser:
    p = _parser("medmvl-train encoder", "Pretrain a 3D vision encoder (convvit3d) on labelled boxes.\n\n"
                                        "Dense and per-token targets; writes an encoder folder for "
                                        "model.encoder_image3d.path.")
    p.add_argument("--config", required=True, help="YAML config with kind: encoder_pretrain "
                                                    "(e.g. training/configs/demo_encoder.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=200")
    return p


def run_encoder(args: argparse.Namespace) -> int:
    from training.encoder_pretrain import run_encoder_pretrain

    result = run_encoder_pretrain(args.config, args.overrides)
    print(f"done: {result['steps']} steps in {result['seconds']} s, held-out {result.get('eval')}, "
          f"encoder {result['final_dir']}")
    return 0


def _merge_parser() -> argparse.ArgumentParser:
    p = _parser("medmvl-train merge", "Merge a LoRA/QLoRA adapter into its base and write a full checkpoint.")
    p.add_argument("--adapter", required=True, help="adapter folder written by training (OUTPUT/final)")
    p.add_argument("--out", required=True, help="output folder for the merged checkpoint")
    p.add_argument("--base", default=None, help="base checkpoint (default: the one recorded in the adapter)")
    return p


def _setup_logging(verbose: int) -> None:
    import os

    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose + 1, 2)]
    if os.environ.get("RANK", "0") != "0" and verbose < 2:  # other processes of a launch: warnings only
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def run_validate(args: argparse.Namespace) -> int:
    from medmvl_core.data.validate import validate_data

    processor, max_length = None, args.max_length
    if args.checkpoint:
        from pathlib import Path

        if (Path(args.checkpoint) / "processor_config.json").is_file():  # our format: no need to load weights
            from medmvl_core.processing import MedMVLProcessor

            processor = MedMVLProcessor.from_pretrained(args.checkpoint)
        else:  # a MedM-VL folder: the loader derives the processor settings
            from medmvl_core.model import load_checkpoint

            _, processor = load_checkpoint(args.checkpoint)
        if max_length is None:
            max_length = getattr(processor, "max_length", None)
    rep = validate_data(args.data, args.image_dir, args.image3d_dir, processor=processor, max_length=max_length,
                        read_images=args.read_images, require_answer=not args.inference)
    print(rep.summary(max_listed=args.max_listed))
    return 0 if rep.ok else 1


def run_merge(args: argparse.Namespace) -> int:
    from training.merge import merge_adapter

    out = merge_adapter(args.adapter, args.out, base=args.base)
    print(f"merged checkpoint written to {out}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.recipe import run

    cfg = load_config(args.config, args.overrides)
    result = run(cfg, resume=args.resume, dry_run=args.dry_run)
    if result is not None and result.get("final_dir"):
        print(f"done: {result['steps']} steps, final loss {result.get('final_loss')}, output {result['final_dir']}")
    return 0


COMMANDS = {"train": (_train_parser, run_train), "encoder": (_encoder_parser, run_encoder), "validate": (_validate_parser, run_validate),
            "merge": (_merge_parser, run_merge)}
SUBCOMMANDS = tuple(COMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medmvl-train`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv and argv[0] in SUBCOMMANDS else "train"
    if argv and argv[0] in SUBCOMMANDS:
        argv = argv[1:]
    make_parser, run_command = COMMANDS[cmd]
    args = make_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return run_command(args)
    except MedMVLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
