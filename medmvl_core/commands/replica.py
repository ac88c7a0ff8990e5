"""``medmvl replica RECIPE OUT``: write a released MedM-VL checkpoint's layout with random weights.

Example: ``medmvl replica ct-chest-3b /data/replicas/ct-chest-3b`` (6.4 GB, about a minute), or
``medmvl replica ct-3b /tmp/ct3b-tiny --scale tiny`` (a few MB, for tests).
"""

from __future__ import annotations

import argparse

NAME = "replica"
HELP = "write a full-size (or tiny) replica of a released MedM-VL checkpoint with random weights"
EXAMPLES = ("medmvl replica ct-chest-3b ./ct-chest-3b-replica",
            "medmvl replica ct-3b /tmp/ct3b-tiny --scale tiny")
DOCS = "docs/full-size-models.md"


#: recipe -> released model (kept here, not imported, so `medmvl --help` never loads torch;
#: a test checks it against medmvl_core.model.replica.RECIPES)
RECIPE_NAMES = {"2d-3b": "MedM-VL-2D-3B-en", "ct-3b": "MedM-VL-CT-3B-en", "ct-chest-3b": "MedM-VL-CT-Chest-3B-en"}
SCALES = ("full", "tiny")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", choices=sorted(RECIPE_NAMES),
                        help="; ".join(f"{k}: {v}" for k, v in sorted(RECIPE_NAMES.items())))
    parser.add_argument("out", help="output folder (created; must be empty or absent)")
    parser.add_argument("--scale", choices=SCALES, default="full",
                        help="full: the released sizes (bf16, ~6.4-7 GB); tiny: same layout, tiny sizes")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")


def run(args: argparse.Namespace) -> int:
    import time

    from medmvl_core.model.replica import write_replica

    t0 = time.perf_counter()
    info = write_replica(args.recipe, args.out, scale=args.scale, seed=args.seed)
    print(f"wrote {info['folder']}: {info['name']} replica ({info['scale']}), {info['tensors']} tensors, "
          f"{info['total_size'] / 1e9:.3f} GB bf16 in {len(info['shards'])} file(s), "
          f"{time.perf_counter() - t0:.1f} s. Random weights: for measuring, not for reading images.")
    return 0
