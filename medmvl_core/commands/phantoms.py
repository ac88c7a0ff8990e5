"""``medmvl phantoms``: generate the synthetic phantom benchmark (images + MedM-VL JSON)."""

from __future__ import annotations

import argparse
import json

NAME = "phantoms"
HELP = "generate synthetic CT / radiograph phantoms with reports, questions and boxes"
EXAMPLES = ("medmvl phantoms --out phantoms --splits test --n-test 1",)
DOCS = "docs/demo-model.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--n", type=int, default=800, help="number of training phantoms (default 800)")
    parser.add_argument("--n-val", type=int, default=None, help="validation phantoms (default n/10)")
    parser.add_argument("--n-test", type=int, default=200, help="test phantoms (default 200)")
    parser.add_argument("--splits", default="train,val,test",
                        help="comma-separated splits to write (default train,val,test)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; each split has its own stream")
    parser.add_argument("--kind", choices=["ct", "xray", "both"], default="ct",
                        help="CT volumes, 2D radiographs, or both (default ct)")
    parser.add_argument("--dicom", action="store_true", help="also write each CT as a DICOM series")
    parser.add_argument("--spec", default=None,
                        help="preprocessing spec JSON (file or inline) used to put boxes in the model's "
                             "input space; default: the demo spec (no cropping)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="also train a byte-level BPE tokenizer on the training text into DIR")
    parser.add_argument("--vocab-size", type=int, default=512, help="tokenizer vocabulary size (default 512)")
    parser.add_argument("--template", default="qwen2", help="chat template the tokenizer text is rendered with")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from medmvl_core.data.phantom_dataset import generate_dataset
    from medmvl_core.errors import DataError

    if args.n < 0 or args.n_test < 0 or (args.n_val is not None and args.n_val < 0):
        raise DataError("phantom counts must be >= 0")
    n_val = args.n_val if args.n_val is not None else max(1, args.n // 10)
    wanted = {"train": args.n, "val": n_val, "test": args.n_test}
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in wanted]
    if bad:
        raise DataError(f"unknown split(s) {bad} in --splits; use train, val, test")
    spec = None
    if args.spec:
        p = Path(args.spec)
        try:
            spec = json.loads(p.read_text() if p.is_file() else args.spec)
        except json.JSONDecodeError as exc:
            raise DataError(f"--spec is neither a JSON file nor inline JSON ({exc})") from None
    out = Path(args.out)
    manifest = generate_dataset(out, {s: wanted[s] for s in splits}, seed=args.seed, kind=args.kind,
                                dicom=args.dicom, spec=spec, progress=True)
    print(f"wrote {len(manifest['phantoms'])} phantoms to {out}")
    if args.tokenizer:
        from medmvl_core.data.phantom_tokenizer import train_phantom_tokenizer

        from medmvl_core.processing import get_template

        # The prompts exactly as the model sees them (system prompt and USER/ASSISTANT markers
        # included), so the template costs few tokens too. Only training text is used.
        template = get_template(args.template)
        rows = json.loads((out / "train.json").read_text()) if "train" in splits else []
        if not rows:
            raise DataError("--tokenizer needs the train split (add train to --splits and --n > 0)")
        texts = [template.render(e["conversations"]) for e in rows]
        train_phantom_tokenizer(texts, Path(args.tokenizer), vocab_size=args.vocab_size)
        print(f"wrote tokenizer to {args.tokenizer}")
    return 0
