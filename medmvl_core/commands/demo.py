"""``medmvl demo``: workers on the embedded demo models answer questions about unseen phantoms.

Without ``--checkpoint`` it runs both demo models, one after the other: ``Resources/demo_model`` on CT
phantoms and ``Resources/demo_model_2d`` on radiograph phantoms. For each it starts a local worker
through :class:`medmvl_core.client.WorkerLauncher`, generates phantoms from the test split (never seen
in training), and for each prints the model's report, answers, found box and region description with
the truth next to them, plus the timings the worker reports and the model that answered.
"""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "demo"
HELP = "run the demo: the embedded CT and radiograph models answer about unseen phantoms, truth alongside"
EXAMPLES = ("medmvl demo --n 1", "medmvl demo --kind xray --n 2")
DOCS = "docs/demo-model.md"

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "Resources" / "demo_model"
DEFAULT_CHECKPOINT_2D = DEFAULT_CHECKPOINT.parent / "demo_model_2d"
REBUILD_HINT = ("rebuild it with the commands in its model card (Resources/demo_model/README.md or "
                "Resources/demo_model_2d/README.md; medmvl phantoms + medmvl-train; docs/demo-model.md)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None,
                        help="model folder (default: both demo models, Resources/demo_model on CT phantoms "
                             "and Resources/demo_model_2d on radiograph phantoms)")
    parser.add_argument("--n", type=int, default=3, help="number of phantoms (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (test split; default 0)")
    parser.add_argument("--start", type=int, default=0, help="first test-split index (default 0)")
    parser.add_argument("--kind", choices=["auto", "ct", "xray"], default="auto",
                        help="phantom kind (default: what the checkpoint takes, CT first; without "
                             "--checkpoint: ct runs only the CT demo model, xray only the 2D one)")
    parser.add_argument("--device", default="auto", help="worker device (auto, cpu, cuda, cuda:1, ...)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the worker")


def _checkpoint_kinds(ckpt: Path) -> list[str]:
    """Which phantom kinds the checkpoint takes, from its config.json (no torch needed)."""
    from medmvl_core.client.model_kinds import read_model_kinds
    from medmvl_core.errors import CheckpointError

    if not (ckpt / "config.json").is_file():
        raise CheckpointError(f"no model at {ckpt} (config.json missing); {REBUILD_HINT}, "
                              "or pass --checkpoint DIR")
    kinds = read_model_kinds(ckpt).kinds
    return [name for name, kind in (("ct", "image3d"), ("xray", "image")) if kind in kinds] or ["ct"]


def _runs(args: argparse.Namespace) -> list[tuple[Path, str]]:
    """(checkpoint, phantom kind) pairs to demonstrate, checked before any worker starts."""
    from medmvl_core.errors import DataError

    if args.checkpoint is None:
        pairs = [(DEFAULT_CHECKPOINT, "ct"), (DEFAULT_CHECKPOINT_2D, "xray")]
        pairs = [p for p in pairs if args.kind in ("auto", p[1])]
    else:
        ckpt = Path(args.checkpoint)
        kinds = _checkpoint_kinds(ckpt)
        kind = kinds[0] if args.kind == "auto" else args.kind
        if kind not in kinds:
            raise DataError(f"the checkpoint at {ckpt} does not take {kind} inputs (it takes {kinds})")
        pairs = [(ckpt, kind)]
    for ckpt, kind in pairs:
        if kind not in _checkpoint_kinds(ckpt):
            raise DataError(f"the checkpoint at {ckpt} does not take {kind} inputs")
    return pairs


def run(args: argparse.Namespace) -> int:
    from medmvl_core.errors import DataError

    if args.n < 1 or args.start < 0:
        raise DataError("--n must be >= 1 and --start >= 0")
    for ckpt, kind in _runs(args):
        _demo_model(args, ckpt, kind)
    return 0


def _demo_model(args: argparse.Namespace, ckpt: Path, kind: str) -> None:
    """One worker on ``ckpt``, asked about ``args.n`` test phantoms of ``kind``."""
    import time

    from medmvl_core.client import WorkerLauncher
    from medmvl_core.data.phantoms import make_phantom

    what = "CT phantoms" if kind == "ct" else "radiograph phantoms"
    print(f"Starting a worker on {ckpt} ({what}) ...", flush=True)
    t0 = time.monotonic()
    launcher = WorkerLauncher(checkpoint=str(ckpt), device=args.device, start_timeout=args.timeout)
    client = launcher.start()
    try:
        health = client.health()
        print(f"worker ready in {time.monotonic() - t0:.1f} s: model {health.get('model')}, "
              f"device {health.get('device')}\n", flush=True)
        totals = {"closed": [0, 0], "region": [0, 0], "iou": []}
        for index in range(args.start, args.start + args.n):
            ph = make_phantom(kind, args.seed, "test", index)
            _demo_one(client, ph, totals)
        _print_summary(totals, args.n, str(health.get("model") or ckpt))
    finally:
        launcher.stop()


def _mark(ok: bool) -> str:
    return "OK " if ok else "XX "


def _demo_one(client, ph, totals: dict) -> None:
    """Ask the report, the questions, a find and a describe about one phantom; print with truth."""
    import numpy as np

    from medmvl_core.data.phantom_dataset import format_box_2d, format_box_3d, model_box_fn
    from medmvl_core.data.phantom_tasks import (KIND_TEXT, make_tasks, parse_choice, parse_kind, parse_report,
                                                parse_yes_no, report_text)
    from medmvl_core.evaluation.phantom_metrics import box_iou

    is_ct = ph.modality == "CT"
    array = ph.array if is_ct else ph.array[None]
    direction = np.asarray(ph.direction).reshape(3, 3) if is_ct else np.eye(3)
    spacing = ph.spacing if is_ct else (*ph.spacing, 1.0)
    origin = ph.origin if is_ct else (*ph.origin, 0.0)
    vid = client.upload_volume(array.astype(np.float32), spacing=spacing, origin=origin, direction=direction,
                               modality="CT" if is_ct else "XR")

    def ask(task: str, question: str | None = None, box=None, n: int = 48):
        # One session per question: each is a single first turn, as in the benchmark items;
        # the worker keeps the encoded volume (content hash), so only the text is new work.
        sid = client.create_session(vid)
        try:
            return client.ask(sid, task=task, question=question, box=box, max_new_tokens=n)
        finally:
            client.delete_session(sid)

    truth = ", ".join(f"{f.kind} ({f.location})" for f in ph.findings) or "no findings"
    print("=" * 100)
    print(f"{ph.id}: {ph.modality} {list(ph.array.shape)} spacing {list(ph.spacing)} mm — truth: {truth}")
    print("=" * 100)
    ans = ask("report", n=112)
    ref = {(f.kind, f.location) for f in ph.findings}
    got = parse_report(ans.text)
    print(f"REPORT  {_mark(got == ref)}{_timing(ans)}\n  model: {ans.text}\n  truth: {report_text(ph.findings)}")
    rng = np.random.default_rng(ph.index)
    box_fn = model_box_fn(ph, None)
    tasks = make_tasks(ph, rng, box_fn, format_box_3d if is_ct else format_box_2d)
    for t in tasks:
        if t["task"] in ("closed", "choice", "open"):
            a = ask("ask", t["question"], n=16)
            if t["task"] == "closed":
                ok = parse_yes_no(a.text) == t["truth"]["yes"]
            elif t["task"] == "choice":
                ok = parse_choice(a.text) == t["truth"]["letter"]
            else:
                ok = a.text.strip().lower() == t["answer"].lower()
            if t["task"] != "open":
                totals["closed"][0] += ok
                totals["closed"][1] += 1
            print(f"Q {t['question']}\n  {_mark(ok)}model: {a.text.strip():<40} truth: {t['answer']}{_timing(a)}")
    for f in ph.findings[:1] or []:
        a = ask("find", KIND_TEXT[f.kind], n=48)
        true_box = box_fn(f.box)
        got_box = a.boxes[0]["model"] if a.boxes else None
        iou = box_iou(got_box, true_box) if got_box else 0.0
        totals["iou"].append(iou)
        print(f"FIND {KIND_TEXT[f.kind]}  {_mark(iou >= 0.5)}IoU {iou:.2f}{_timing(a)}\n"
              f"  model: {got_box if got_box else a.text!r}\n  truth: {true_box}"
              + (f"   (voxels {a.boxes[0]['voxel']} vs {list(f.box)})" if a.boxes else ""))
    region_box = ph.findings[0].box if ph.findings else ph.normal_box
    region_kind = ph.findings[0].kind if ph.findings else "normal"
    # the worker takes voxel boxes: (k1, j1, i1, k2, j2, i2) on a volume, (j1, i1, j2, i2) on a 2D image
    vbox = region_box
    a = ask("describe", box=list(vbox), n=24)
    ok = parse_kind(a.text) == region_kind
    totals["region"][0] += ok
    totals["region"][1] += 1
    where = f"{ph.findings[0].kind} in the {ph.findings[0].location}" if ph.findings else "normal lung"
    print(f"DESCRIBE voxel box {list(vbox)}\n  {_mark(ok)}model: {a.text.strip():<40} truth: {where}{_timing(a)}")
    print()


def _timing(ans) -> str:
    t = ans.timings or {}
    keys = [k for k in ("encode_s", "prefill_s", "decode_s", "total_s") if k in t]
    if not keys:
        keys = sorted(t)[:4]
    parts = [f"{k}={float(t[k]):.2f}" for k in keys if isinstance(t.get(k), (int, float))]
    return f"   [{', '.join(parts)}; {ans.num_tokens} tokens]" if parts else f"   [{ans.num_tokens} tokens]"


def _print_summary(totals: dict, n: int, model: str = "") -> None:
    c, r, ious = totals["closed"], totals["region"], totals["iou"]
    if model:
        print(f"Answers above by model {model}")
    print(f"Summary over {n} unseen phantoms: closed questions {c[0]}/{c[1]}, region descriptions "
          f"{r[0]}/{r[1]}, find mean IoU {sum(ious) / len(ious):.2f}" if ious else
          f"Summary over {n} unseen phantoms: closed questions {c[0]}/{c[1]}, region descriptions {r[0]}/{r[1]}")
    print("Benchmark numbers on 200 test phantoms: see the model cards, Resources/demo_model/README.md (CT) "
          "and Resources/demo_model_2d/README.md (radiographs)\n")
