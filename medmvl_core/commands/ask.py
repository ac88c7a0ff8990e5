"""`medmvl ask`: ask a question about an image through a worker (started here if needed)."""

from __future__ import annotations

import argparse

NAME = "ask"
HELP = "ask a question about an image or volume (starts a local worker, or uses --url)"
EXAMPLES = ("medmvl ask --checkpoint Resources/demo_model --image phantoms/images/ct-test-00000.nii.gz "
            "--question \"Is there a cyst in the liver?\"",
            "medmvl ask --checkpoint Resources/demo_model_2d --image chest.png --task find --question nodule",
            "medmvl ask --url http://127.0.0.1:8765 --token-file ~/.medmvl-token --image ct.nrrd --task report --json")
DOCS = "docs/api.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="model folder: start a local worker for this question")
    src.add_argument("--url", help="a running worker, e.g. http://127.0.0.1:8765")
    parser.add_argument("--token", help="the worker's token (with --url)")
    parser.add_argument("--token-file", help="file holding the worker's token (with --url)")
    parser.add_argument("--image", required=True,
                        help="image or volume file: DICOM folder or file (CT series, single-slice CT, CR, DX), "
                             "NIfTI, NRRD, MHA, npy, PNG, JPEG; its kind (2D or 3D) must be one the model takes")
    parser.add_argument("--question", default=None, help="the question (or the thing to find)")
    parser.add_argument("--task", default="ask",
                        choices=["ask", "report", "describe", "find", "crop_ask"])
    parser.add_argument("--roi", type=float, nargs="+", default=None,
                        help="voxel box k1 j1 i1 k2 j2 i2 (2D: j1 i1 j2 i2), end exclusive")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=None, help="seconds for the answer")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (text, boxes, timings) instead of streaming")
    parser.add_argument("--device", default="auto", help="with --checkpoint: auto | cuda | cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    parser.add_argument("--quantize", choices=["auto", "none", "int8", "8bit", "4bit"], default="auto",
                        help="auto (default): torch dynamic int8 on a CPU, none on a GPU; int8: CPU only; "
                             "8bit/4bit: bitsandbytes")
    parser.add_argument("--python", default=None,
                        help="with --checkpoint: interpreter for the worker (default: this one)")


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from medmvl_core.client import WorkerClient, WorkerLauncher
    from medmvl_core.client.model_kinds import ModelKinds, WrongInputKindError, check_input_kind, kind_problem
    from medmvl_core.errors import ConfigError
    from medmvl_core.imaging import read_image

    if args.task in ("ask", "crop_ask", "find") and not (args.question or "").strip():
        raise ConfigError(f"--task {args.task} needs --question TEXT")
    if args.task in ("describe", "crop_ask") and not args.roi:
        raise ConfigError(f"--task {args.task} needs --roi k1 j1 i1 k2 j2 i2 (voxels)")
    if args.roi and len(args.roi) not in (4, 6):
        raise ConfigError("--roi takes 6 numbers (k1 j1 i1 k2 j2 i2) or 4 for a 2D image")
    vol = read_image(args.image)
    launcher = None
    if args.checkpoint:
        # the checkpoint's input kinds come from its config.json: a wrong kind is refused before a worker starts
        check_input_kind(args.checkpoint, vol.array.shape)
        launcher = WorkerLauncher(python=args.python or sys.executable, checkpoint=args.checkpoint,
                                  device=args.device, dtype=args.dtype, quantize=args.quantize)
        client = launcher.start()
    else:
        token = args.token
        if token is None and args.token_file:
            token = Path(args.token_file).read_text().strip()
        if not token:
            raise ConfigError("--url needs --token or --token-file")
        client = WorkerClient(args.url, token)
        kinds = tuple(client.health().get("kinds") or ())
        problem = kind_problem(ModelKinds(args.url, kinds), vol.array.shape) if kinds else None
        if problem:
            raise WrongInputKindError(problem)
    try:
        vid = client.upload_volume(vol.array, vol.spacing, vol.origin, vol.direction,
                                   modality=vol.modality or "CT")
        sid = client.create_session(vid)
        stream = None if args.json else (lambda piece: print(piece, end="", flush=True))
        ans = client.ask(sid, task=args.task, question=args.question, box=args.roi,
                         on_token=stream, max_new_tokens=args.max_new_tokens,
                         do_sample=args.sample, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed, timeout=args.timeout)
        client.delete_session(sid)
        model = str(client.health().get("model") or args.checkpoint or args.url)
    finally:
        if launcher is not None:
            launcher.close()
    if args.json:
        print(json.dumps({"text": ans.text, "boxes": ans.boxes, "timings": ans.timings,
                          "num_tokens": ans.num_tokens, "finish_reason": ans.finish_reason,
                          "task": ans.task, "question": ans.prompt_question, "model": model}, indent=1))
    else:
        print()
        for b in ans.boxes:
            print(f"box: voxel {b['voxel']}  LPS mm {[round(v, 1) for v in b['physical_lps']]}")
        print(f"(answered by model {model})")
    return 0
