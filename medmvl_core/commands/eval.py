"""``medmvl eval``: score MedM-VL inference output on a paper benchmark (METRICS.md)."""

from __future__ import annotations

import argparse
import json
import sys

NAME = "eval"
HELP = "score predictions (medmvl infer output) on m3d-*, unimed-* or phantoms benchmarks"
EXAMPLES = ("medmvl eval --predictions pred.json --benchmark phantoms",
            "medmvl eval --predictions out.json --benchmark m3d-vqa-closed --strict --report rep/")
DOCS = "docs/evaluation.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", required=True, metavar="OUT.json",
                        help="MedM-VL inference output: input items + generated gpt turn, "
                             "reference answer in 'answer'")
    parser.add_argument("--benchmark", required=True, metavar="NAME",
                        help="benchmark name, e.g. m3d-vqa-open (an unknown name lists them all)")
    parser.add_argument("--references", metavar="FILE.json",
                        help="separate ground-truth items aligned with --predictions (for old "
                             "outputs that are a list of strings)")
    parser.add_argument("--strict", action="store_true",
                        help="exit non-zero if any metric was skipped (use for paper numbers)")
    parser.add_argument("--bertscore-model", metavar="DIR",
                        help="local BERTScore model folder (roberta-large for the paper number); "
                             "else $MEDMVL_BERTSCORE_MODEL, else the HF cache; never downloads")
    parser.add_argument("--bertscore-layers", type=int, metavar="N",
                        help="BERTScore layer (default 17 for roberta-large)")
    parser.add_argument("--nltk-data", metavar="DIR", help="folder with corpora/wordnet (METEOR)")
    parser.add_argument("--iou-mode", choices=["m3d", "standard"], default="m3d",
                        help="3D IoU for m3d-rec: M3D's enclosing-box variant (default) or standard")
    parser.add_argument("--device", default=None, help="device for BERTScore (cpu, cuda)")
    parser.add_argument("--report", metavar="DIR",
                        help="write metrics.json, samples.json, metrics.md and PNG charts here")
    parser.add_argument("--json", action="store_true", help="print the metrics JSON to stdout")


def run(args: argparse.Namespace) -> int:
    from medmvl_core.evaluation import EvalOptions, evaluate
    from medmvl_core.evaluation.report import markdown_table, write_report

    opts = EvalOptions(strict=args.strict, bertscore_model=args.bertscore_model,
                       bertscore_layers=args.bertscore_layers, nltk_data=args.nltk_data,
                       iou_mode=args.iou_mode, device=args.device)
    result = evaluate(args.predictions, args.benchmark, opts, references=args.references)
    groups: dict[tuple, list[str]] = {}  # one warning line per distinct cause
    for key in result.skipped_metrics():
        m = result.metrics[key]
        groups.setdefault((m["reason"], m["fix"]), []).append(key)
    for (reason, fix), keys in groups.items():
        print(f"warning: {', '.join(keys)} skipped: {reason}; fix: {fix}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_json(include_samples=False), indent=2, ensure_ascii=False))
    else:
        print(markdown_table(result), end="")
    if args.report:
        paths = write_report(result, args.report)
        print(f"report written: {', '.join(str(p) for p in paths)}", file=sys.stderr)
    if args.strict and result.skipped_metrics():
        print(f"error: --strict: {len(result.skipped_metrics())} metric(s) skipped: "
              f"{', '.join(result.skipped_metrics())}", file=sys.stderr)
        return 3
    return 0
