"""Full-size replicas on this machine: load, memory, time to first token and decode speed per
CPU mode, beside transformers ``generate`` on the same weights and the bandwidth floor.

Each mode runs in its own process (so its peak RSS is its own): ``load_checkpoint`` on the
replica folder as released, then through the worker's engine a cold question about a
512x512xD CT (read, preprocess, encode, prefill, first token), decode tokens/s, a cached
follow-up's first token, and ``model.llm.generate`` from the same prompt embeddings (the
reference). Greedy answers of each mode are compared token by token with the bf16 mode's.

    medmvl replica ct-chest-3b /data/ct-chest-3b                      # once, 6.4 GB
    python bench/bench_real_size.py --checkpoint /data/ct-chest-3b    # int8, bf16 (and fp32)
    python bench/bench_real_size.py --checkpoint DIR --user-path      # + medmvl ask / serve

Conventions: floor = copy bandwidth (read + write, as bench/gpu.py) / bytes of LLM weights read
per decoded token (decoder layers + LM head at the mode's storage size); tokens/s = new tokens /
time after the first token (EOS off). Not a test: minutes per mode on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: mode -> (dtype, quantize): torch dynamic int8 LLM (the worker's CPU default; its vision encoders
#: in bf16 where the CPU has bf16 units, as the worker does), weight-only int8 computing in bf16,
#: plain bf16 and float32
MODES = {"int8-bf16": ("bf16", "int8"), "int8": ("fp32", "int8"), "bf16": ("bf16", "none"), "fp32": ("fp32", "none")}
QUESTION = "Generate radiology report for the CT."
FOLLOW_UP = "Where is the nodule located and how large is it?"


def _rss() -> int:
    """Peak RSS of this process (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def llm_bytes_per_token(model) -> int:
    """Bytes of LLM weights one decode step reads: decoder layers, final norm and the LM head
    (int8 layers at their packed size); the input embedding is read one row per token."""
    import torch

    total = 0
    llm = model.llm
    for name, mod in llm.named_modules():
        if name.endswith("embed_tokens"):
            continue
        if hasattr(mod, "_packed_params") and callable(getattr(mod, "weight", None)):
            w = mod.weight()
            total += w.numel() + w.shape[0] * 8
        else:
            total += sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False))
            total += sum(b.numel() * b.element_size() for b in mod.buffers(recurse=False)
                         if b.dtype != torch.int64 and not name.endswith("rotary_emb"))
    return total


def run_mode(args) -> int:
    """Child process: one mode, rows as JSON on the last stdout line."""
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from bench.gpu import reference_generate, synthetic_ct
    from medmvl_core.engine import Engine
    from medmvl_core.imaging import read_image
    from medmvl_core.model import load_checkpoint
    from medmvl_core.worker.loading import cpu_has_bf16_units, resolve_dtype

    dtype_name, quant = MODES[args.mode]
    out: dict = {"mode": args.mode}
    rss0 = _rss()
    t0, c0 = time.perf_counter(), time.process_time()
    # "int8" as the worker's CPU default (worker/loading.py load_model): bf16 vision where the CPU has bf16 units
    vision = torch.bfloat16 if args.mode == "int8" and cpu_has_bf16_units() else None
    model, proc = load_checkpoint(args.checkpoint, dtype=resolve_dtype(dtype_name, "cpu"), quantize=quant,
                                  vision_dtype=vision)
    out["vision_dtype"] = str(next(model.encoder_image.parameters()).dtype) if model.encoder_image is not None else ""
    out.update(load_s=time.perf_counter() - t0, load_cpu_s=time.process_time() - c0, rss_before_load=rss0,
               peak_rss_load=_rss())
    packed = sum(m.weight().numel() + m.weight().shape[0] * 8 for m in model.modules()
                 if hasattr(m, "_packed_params") and callable(getattr(m, "weight", None)))
    wo = sum(b.numel() * b.element_size() for m in model.modules() if type(m).__name__ == "Int8WeightOnlyLinear"
             for b in m.buffers(recurse=False))
    # parameters() counts a tied head once (weight_bytes would count it per module)
    out["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters()) + packed + wo
    out["llm_bytes_per_token"] = llm_bytes_per_token(model)
    eng = Engine(model, proc, max_new_tokens_limit=max(64, args.new_tokens))
    eng.eos_ids = set()  # fixed-length answers: fair token counts
    # as the worker does before it reports ready (worker/loading.py load_engine)
    out["warmup_s"] = eng.warmup() if args.warmup else 0.0
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_ct((args.slices, 512, 512), Path(tmp))
        t0 = time.perf_counter()
        vol = read_image(path)
        out["read_s"] = time.perf_counter() - t0
    s = eng.create_session(vol)
    t0, c0 = time.perf_counter(), time.process_time()
    first = eng.answer(question=QUESTION, session=s, max_new_tokens=args.new_tokens)
    total = time.perf_counter() - t0
    t = first.timings
    out.update(preprocess_s=t["preprocess_s"], encode_s=t["encode_s"], prefill_s=t["prefill_s"],
               prefill_tokens=t["prefill_tokens"], ttft_s=t["ttft_s"], answer_s=total,
               answer_cpu_s=time.process_time() - c0, tokens=first.token_ids)
    n = len(first.token_ids)
    # the engine's own decode clock (tokens after the first); the answer's wall time minus the
    # TTFT also holds the session bookkeeping after the last token
    out["decode_tok_s"] = (n - 1) / max(t.get("decode_s") or (total - t["ttft_s"]), 1e-9)
    out["timings"] = {k: v for k, v in t.items() if isinstance(v, (int, float))}
    t0 = time.perf_counter()
    follow = eng.answer(question=FOLLOW_UP, session=s, max_new_tokens=2)
    out.update(followup_ttft_s=follow.timings["ttft_s"], followup_prefill_tokens=follow.timings["prefill_tokens"],
               followup_tokens=follow.token_ids)
    # the reference: transformers generate from the same prompt embeddings (encoder output cached)
    entry = eng.prepare(vol)
    ids = eng.encode_prompt(eng.conversation([], QUESTION))
    with torch.inference_mode():
        emb = model.embed_inputs(torch.tensor([ids]), entry.embeds)
        t0, c0 = time.perf_counter(), time.process_time()
        reference_generate(model, emb, 1)
        ref_first, ref_first_cpu = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        gen = reference_generate(model, emb, args.new_tokens)
        ref_total, ref_cpu = time.perf_counter() - t0, time.process_time() - c0
    out["ref_decode_cpu_s_per_token"] = (ref_cpu - ref_first_cpu) / max(args.new_tokens - 1, 1)
    out["ref_decode_tok_s"] = (args.new_tokens - 1) / max(ref_total - ref_first, 1e-9)
    out["ref_tokens"] = gen[0].tolist()
    out["peak_rss"] = _rss()
    print(json.dumps(out), flush=True)
    return 0


def _bandwidth() -> float:
    import torch

    from bench.gpu import copy_bandwidth

    torch.set_num_threads(2)
    return copy_bandwidth(torch.device("cpu"), small=False)


def user_path(checkpoint: str, slices: int, rows: list) -> None:
    """`medmvl ask` on a 512x512xD CT DICOM series made from a phantom, then the same through
    `medmvl serve` + the client, timed end to end (worker start and model load included)."""
    import numpy as np
    import SimpleITK as sitk

    from medmvl_core.data.phantoms import make_ct_phantom, write_dicom_series

    with tempfile.TemporaryDirectory() as tmp:
        ph = make_ct_phantom(0, "test", 0)
        arr = ph.array
        zoom = [slices / arr.shape[0], 512 / arr.shape[1], 512 / arr.shape[2]]
        idx = [np.minimum((np.arange(n) / z).astype(int), s - 1) for n, z, s in
               zip((slices, 512, 512), zoom, arr.shape)]
        big = np.round(arr[np.ix_(*idx)]).astype(np.int16)  # nearest-neighbour upsampling
        img = sitk.GetImageFromArray(big)
        img.SetSpacing(tuple(float(s) / z for s, z in zip(ph.spacing, zoom[::-1])))
        folder = Path(tmp) / "ct_dicom"
        write_dicom_series(img, folder, series_description="bench")
        cmd = [sys.executable, "-m", "medmvl_core.cli", "ask", "--checkpoint", checkpoint, "--device", "cpu",
               "--image", str(folder), "--question", QUESTION, "--max-new-tokens", "8", "--json"]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        dt = time.perf_counter() - t0
        note = "ok" if res.returncode == 0 else f"failed: {res.stderr.strip().splitlines()[-1:]}"
        rows.append(("user path: medmvl ask (worker start + load + answer)", dt, "s",
                     f"{slices}x512x512 DICOM series, --device cpu (quantize auto), 8 tokens; {note}"))
        if res.returncode == 0:
            try:
                ans = json.loads(res.stdout)
                rows.append(("user path: ask timings", ans.get("timings", {}).get("ttft_s", float("nan")), "s",
                             f"TTFT inside the worker; timings {json.dumps(ans.get('timings', {}))[:300]}"))
            except json.JSONDecodeError:
                pass


def demo_agreement(n_phantoms: int, rows: list, max_new_tokens: int = 48) -> None:
    """Greedy answers of the demo model (Resources/demo_model) on ``n_phantoms`` test phantoms x
    every phantom task, in fp32 and int8, compared token by token with bf16 (and fp32)."""
    import numpy as np
    import torch

    from medmvl_core.data.phantom_dataset import format_box_3d, model_box_fn
    from medmvl_core.data.phantom_tasks import make_tasks
    from medmvl_core.data.phantoms import make_ct_phantom
    from medmvl_core.imaging import Volume
    from medmvl_core.model import load_checkpoint

    demo = ROOT / "Resources" / "demo_model"
    models = {"bf16": load_checkpoint(demo, dtype=torch.bfloat16), "fp32": load_checkpoint(demo, dtype=torch.float32),
              "int8": load_checkpoint(demo, quantize="int8"),
              "int8-bf16": load_checkpoint(demo, dtype=torch.bfloat16, quantize="int8")}
    answers: dict[str, list[list[int]]] = {k: [] for k in models}
    for index in range(n_phantoms):
        ph = make_ct_phantom(0, "test", index)
        vol = Volume(array=ph.array, spacing=ph.spacing, origin=ph.origin,
                     direction=np.asarray(ph.direction).reshape(3, 3), modality="CT", source="phantom")
        tasks = make_tasks(ph, np.random.default_rng(index), model_box_fn(ph, None), format_box_3d)
        for task in tasks:
            for name, (model, proc) in models.items():
                smp = proc([{"from": "human", "value": "<image3d>\n" + task["question"]}], image3d=vol, mode="generate")
                with torch.inference_mode():
                    out = model.generate(input_ids=smp["input_ids"][None], attention_mask=smp["attention_mask"][None],
                                         images3d=smp["images3d"],
                                         max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=proc.tokenizer.pad_token_id,
                                         eos_token_id=proc.tokenizer.eos_token_id)
                answers[name].append(out[0].tolist())
    n = len(answers["bf16"])
    for name, ref in (("int8", "bf16"), ("int8-bf16", "bf16"), ("fp32", "bf16"), ("int8", "fp32"), ("int8-bf16", "fp32")):
        same = sum(a == b for a, b in zip(answers[name], answers[ref]))
        rows.append((f"demo model: {name} answers identical to {ref}", 100 * same / n, "%",
                     f"{same}/{n} greedy answers (<= {max_new_tokens} tokens) on {n_phantoms} test phantoms x every task"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="replica folder (medmvl replica ct-chest-3b DIR)")
    ap.add_argument("--modes", default="int8,int8-bf16,bf16", help="comma-separated of int8, int8-bf16, bf16, fp32")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--slices", type=int, default=300, help="CT depth D of the 512x512xD test volume")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="ask the first question without the worker's warm-up (first-call kernel creation included)")
    ap.add_argument("--user-path", action="store_true", help="also time medmvl ask on a DICOM series")
    ap.add_argument("--demo-agreement", type=int, default=0, metavar="N",
                    help="also compare greedy answers of the demo model (bf16 / fp32 / int8) on N phantoms")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--_mode", dest="mode", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mode:
        return run_mode(args)
    from bench.gpu import machine, print_table

    import torch

    info = machine(torch.device("cpu"))
    info["load_average"] = os.getloadavg()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    bw = _bandwidth()
    rows: list = [("copy bandwidth", bw / 1e9, "GB/s", "1 GiB copy, read + write")]
    results = {}
    for mode in [m for m in args.modes.split(",") if m and args.checkpoint]:
        if mode not in MODES:
            ap.error(f"unknown mode {mode!r}; use {sorted(MODES)}")
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, __file__, "--checkpoint", args.checkpoint, "--_mode", mode,
                              "--new-tokens", str(args.new_tokens), "--slices", str(args.slices),
                              "--threads", str(args.threads)] + ([] if args.warmup else ["--no-warmup"]),
                             capture_output=True, text=True, cwd=ROOT)
        last = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        if res.returncode != 0 or not last:
            rows.append((f"{mode}", float("nan"), "", f"failed: {res.stderr.strip()[-300:]}"))
            continue
        r = json.loads(last[-1])
        results[mode] = r
        floor = bw / r["llm_bytes_per_token"]
        rows += [
            (f"{mode}: load", r["load_s"], "s", f"cpu {r['load_cpu_s']:.1f} s; weights {r['weights_bytes'] / 1e9:.2f} GB; "
             f"peak RSS during load {r['peak_rss_load'] / 1e9:.2f} GB = {r['peak_rss_load'] / r['weights_bytes']:.2f}x weights "
             f"(process before loading: {r['rss_before_load'] / 1e9:.2f} GB); then the worker's warm-up {r['warmup_s']:.1f} s"),
            (f"{mode}: cold TTFT", r["read_s"] + r["ttft_s"], "s",
             f"{args.slices}x512x512 CT: read {r['read_s']:.2f} s, preprocess {r['preprocess_s']:.2f} s, encode "
             f"{r['encode_s']:.1f} s ({r['vision_dtype'].replace('torch.', '')}), prefill {r['prefill_tokens']:.0f} tokens "
             f"{r['prefill_s']:.1f} s"),
            (f"{mode}: decode", r["decode_tok_s"], "tokens/s",
             f"{100 * r['decode_tok_s'] / floor:.0f}% of the floor {floor:.2f} tokens/s "
             f"({r['llm_bytes_per_token'] / 1e9:.2f} GB read per token); {r['decode_tok_s'] / r['ref_decode_tok_s']:.2f}x generate; "
             f"answer CPU {r['answer_cpu_s']:.0f} s"),
            (f"{mode}: reference generate", r["ref_decode_tok_s"], "tokens/s",
             f"transformers generate, same weights; {r['ref_decode_cpu_s_per_token']:.2f} CPU s per token"),
            (f"{mode}: follow-up TTFT", r["followup_ttft_s"], "s", f"{r['followup_prefill_tokens']:.0f} new tokens prefilled"),
            (f"{mode}: peak RSS", r["peak_rss"] / 1e9, "GB", f"whole run; child wall {time.perf_counter() - t0:.0f} s"),
        ]
    if "bf16" in results:
        base = results["bf16"]["tokens"]
        for mode, r in results.items():
            if mode != "bf16":
                same = sum(a == b for a, b in zip(r["tokens"], base))
                prefix = next((i for i, (a, b) in enumerate(zip(r["tokens"], base)) if a != b), len(base))
                rows.append((f"{mode}: greedy agreement with bf16", 100 * same / len(base), "%",
                             f"same token at {same}/{len(base)} positions; identical prefix {prefix} tokens"))
    if "bf16" in results:
        ref = results["bf16"]["ref_decode_tok_s"]
        for mode, r in results.items():
            rows.append((f"{mode}: decode vs bf16 generate", r["decode_tok_s"] / ref, "x",
                         f"against transformers generate on the released bf16 weights ({ref:.2f} tokens/s), "
                         "how the original code runs on a CPU"))
    if args.user_path and args.checkpoint:
        user_path(args.checkpoint, min(args.slices, 200), rows)
    if args.demo_agreement:
        demo_agreement(args.demo_agreement, rows)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": [list(r) for r in rows], "raw": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
