"""Follow-up time-to-first-token and batched throughput of the engine (CPU, one run).

1. Follow-up TTFT: the reference path re-reads nothing but re-preprocesses the volume,
   re-encodes it and re-prefills the whole multi-turn prompt for every question, as MedM-VL's
   inference does; the cached path (our engine's sessions) reuses the encoder output and the KV
   cache and prefills only the new question. Target: >= 3x.
2. Batch of N questions about N volumes: ``Engine.answer_batch`` (one batched prefill, shared
   decode steps) vs the same questions one by one, and vs transformers ``generate`` at batch N
   on the same prompt embeddings. Target: batch aggregate tokens/s >= ``generate``'s, tokens
   equal one by one. Runs alternate and the medians are reported (wall and CPU time: on a
   shared machine the CPU time is the steadier figure).

    .venv/bin/python bench/bench_followup.py [--checkpoint DIR] [--volume FILE] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine_info import cpu_name  # noqa: E402 - needs the repository on sys.path

REF = ROOT / "Testing" / "data" / "medmvl_reference"

HISTORY = ["Generate radiology report for the CT.", "Is there a nodule in the left lung?"]
FOLLOW_UP = "Where is it located and how large is it?"


def machine() -> str:
    import torch
    return f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="small",
                    help="a model folder, or 'small' (default): the fixture CT-Chest architecture "
                         "scaled up (LLM hidden 512 x 4 layers, SigLIP 64 px / patch 8 per slice, "
                         "attention pooling), random weights")
    ap.add_argument("--volume", default=str(REF / "inputs" / "ct_volume.npy"))
    ap.add_argument("--upsample", type=int, default=3,
                    help="repeat the volume's voxels this many times per axis (a clinical-size "
                         "array for the preprocessing the reference path repeats; default 3)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: stable timings on a shared machine)")
    ap.add_argument("--batch", type=int, default=8, help="concurrent questions for the batch run")
    ap.add_argument("--batch-tokens", type=int, default=32)
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    from medmvl_core.engine import Engine
    from medmvl_core.imaging import read_image
    from medmvl_core.model import load_checkpoint

    if args.checkpoint == "small":
        model, proc = small_model()
    else:
        model, proc = load_checkpoint(args.checkpoint)
    vol = read_image(args.volume)
    if args.upsample > 1:
        import dataclasses
        import numpy as np
        arr = vol.array
        for ax in range(3):
            arr = np.repeat(arr, args.upsample, axis=ax)
        vol = dataclasses.replace(vol, array=arr, spacing=tuple(s / args.upsample for s in vol.spacing))
    cached, ref = Engine(model, proc), Engine(model, proc, use_cache=False)
    session = cached.create_session(vol)
    for q in HISTORY:  # builds the conversation and its KV cache
        cached.answer(question=q, session=session, max_new_tokens=16)
    history = list(session.turns)
    base_kv = session.kv_ids

    fast, slow, same = [], [], True
    for _ in range(args.repeats + 1):  # the first round warms up
        s = cached.create_session(vol, volume_id=session.volume_id)
        s.turns, s.past, s.kv_ids = list(history), None, []
        # restore the cache state after the history (copy of the session's KV)
        s.past = _copy_cache(session.past)
        s.kv_ids = list(base_kv)
        a = cached.answer(question=FOLLOW_UP, session=s, max_new_tokens=1)
        r_s = ref.create_session(vol)
        r_s.turns = list(history)
        b = ref.answer(question=FOLLOW_UP, session=r_s, max_new_tokens=1)
        same &= a.token_ids == b.token_ids
        fast.append(a.timings["ttft_s"])
        slow.append(b.timings["ttft_s"])
    fast, slow = fast[1:], slow[1:]
    f, sl = statistics.median(fast), statistics.median(slow)
    print(f"machine: {machine()}")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: {Path(args.checkpoint).name} ({params:.1f} M parameters); volume {tuple(vol.array.shape)}; "
          f"history {len(HISTORY)} turns; prompt {len(base_kv)} cached tokens")
    print(f"reference follow-up TTFT (re-preprocess + re-encode + re-prefill): {sl * 1000:.1f} ms")
    print(f"cached follow-up TTFT (session KV + encoder cache):              {f * 1000:.1f} ms")
    print(f"ratio: {sl / f:.1f}x (target >= 3x); first tokens equal: {same}")
    same_batch = bench_batch(cached, vol, args.batch, args.batch_tokens, args.repeats)
    return 0 if same and same_batch else 1


def bench_batch(engine, vol, n: int, tokens: int, repeats: int = 5) -> bool:
    """Aggregate tokens/s of ``n`` questions about ``n`` volumes: one by one, ``answer_batch``,
    and transformers ``generate`` at batch ``n`` on the same prompt embeddings (medians of
    ``repeats`` alternating runs after a warm-up). True when all three give the same tokens."""
    import dataclasses

    import torch

    from medmvl_core.engine import Request
    vols = [dataclasses.replace(vol, array=vol.array + i) for i in range(n)]  # n distinct images
    entries = [engine.prepare(v) for v in vols]  # encoder outputs cached: every run is prefill + decode
    ids = engine.encode_prompt(engine.conversation([], FOLLOW_UP))
    with torch.inference_mode():
        x = torch.tensor([ids], device=engine.device)
        embeds = torch.cat([engine.model.embed_inputs(x, e.embeds) for e in entries])
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    llm = getattr(engine.model, "llm", engine.model)

    def reqs():
        return [Request(session=engine.create_session(v), question=FOLLOW_UP, max_new_tokens=tokens)
                for v in vols]

    def one_by_one():
        return [engine.answer(session=r.session, question=r.question, max_new_tokens=tokens).token_ids
                for r in reqs()]

    def batched():
        return [a.token_ids for a in engine.answer_batch(reqs())]

    def generate():
        with torch.inference_mode():
            out = llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=tokens,
                               min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        return out.tolist()

    runs = {"one by one": one_by_one, "answer_batch": batched, "generate": generate}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    got: dict[str, list] = {}
    engine.eos_ids, saved = set(), engine.eos_ids   # fixed-length answers for a fair count
    try:
        for k, fn in runs.items():   # warm-up
            got[k] = fn()
        for _ in range(repeats):
            for k, fn in runs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[k].append((time.perf_counter() - t0, time.process_time() - c0))
    finally:
        engine.eos_ids = saved
        for sid in list(engine.sessions):
            engine.delete_session(sid)
    same = got["one by one"] == got["answer_batch"] == got["generate"]
    total = n * tokens
    print(f"{n} questions x {tokens} tokens ({len(ids)}-token prompts), aggregate tokens/s over {repeats} "
          f"runs, median (best) of wall | CPU time:")
    rate = {}
    for k, ts in times.items():
        wall, cpu = [t for t, _ in ts], [c for _, c in ts]
        rate[k] = (total / statistics.median(wall), total / statistics.median(cpu), total / min(cpu))
        print(f"  {k:<13} {rate[k][0]:6.0f} ({total / min(wall):.0f}) | {rate[k][1]:6.0f} ({rate[k][2]:.0f})")
    r = {k: v / g for k, v, g in zip(("wall", "CPU", "best CPU"), rate["answer_batch"], rate["generate"])}
    print("answer_batch / generate: " + ", ".join(f"{v:.2f}x {k}" for k, v in r.items())
          + f" (target >= 1); tokens equal (one by one, batch, generate): {same}")
    return same


def small_model():
    """The fixture CT-Chest config scaled up; random weights (seed 0)."""
    import copy
    import torch
    from medmvl_core.model import MedMVLConfig, MedMVLForConditionalGeneration, load_checkpoint
    from medmvl_core.model.loader import make_processor
    tiny, tiny_proc = load_checkpoint(REF / "ct_chest_tiny")
    d = copy.deepcopy(tiny.config.to_dict())
    d["llm_config"].update(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2,
                           layer_types=["full_attention"] * 4, max_window_layers=4)
    d["encoder_image"]["config"].update(hidden_size=128, intermediate_size=512, image_size=64,
                                        num_hidden_layers=4, patch_size=8)
    for spec in d["preprocessing"].values():
        spec["normalize"]["image_size"] = 64
    d["preprocessing"]["image3d"]["size"] = [32, 64, 64]
    keep = {k: d[k] for k in ("llm_config", "encoder_image", "encoder_image3d", "connector_image",
                              "connector_image3d", "template", "preprocessing", "padding_side",
                              "max_length") if k in d}
    keep["max_length"] = 2048
    keep["llm_config"]["max_position_embeddings"] = 2048
    torch.manual_seed(0)
    model = MedMVLForConditionalGeneration(MedMVLConfig(**keep)).eval()
    return model, make_processor(model, tiny_proc.tokenizer)


def _copy_cache(past):
    import copy
    return copy.deepcopy(past)


if __name__ == "__main__":
    sys.exit(main())
