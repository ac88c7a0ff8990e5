"""GPU benchmark of the MedM-VL engine: decode speed vs the memory-bandwidth floor, time to first
token, memory per quantization mode and LoRA training throughput, printed as one table.

Real size (default on CUDA): MedM-VL-CT-Chest's architecture, Qwen2.5-3B + SigLIP-base-256 per
slice + attention pooling, built from the configs with random weights (no downloads), bf16.
``--small`` builds a tiny model of the same architecture (seconds on a CPU; used by the tests).

    python bench/gpu.py                       # CUDA, real size (< 8 min on an H100)
    python bench/gpu.py --device cpu --small  # CPU smoke run
    python bench/gpu.py --json out.json       # also write one JSON record (see below)

Every section runs on its own: one that fails becomes a row that says why and the others still
run; sections not started within ``--time-limit`` seconds are skipped with a row that says so.
The JSON record (rewritten after every row) holds the machine, each section's status and
seconds, the rows, and the issue's targets with this run's values (``bench/gpu_report.py``).

Conventions: copy bandwidth counts bytes read + written; decode floor = bandwidth / LLM weight
bytes (every decode step reads every weight once); tokens/s = new tokens (x batch) / wall time of
the whole generation (prefill included). Every "ours" row (batch 1, batch N, TTFT, memory) runs
the worker's own path: ``Engine.answer`` / ``Engine.answer_batch`` with the engine's decoder
(decode_mode "auto"; EOS off so answers have the requested length). MFU = (6·N_llm·T + 2·N_enc·T_enc) / step time / peak,
T = LLM tokens per step, T_enc = encoder patch tokens per step, peak = the card's dense bf16
peak (a measured matmul rate where the card is not known, e.g. on CPU).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_report import Report, guarded, machine, print_table, print_targets  # noqa: E402,F401 - needs the repository on sys.path

logger = logging.getLogger("bench.gpu")

ROOT = Path(__file__).resolve().parents[1]
#: The reference fixture's tokenizer: real prompts (template + question) without a download.
TOKENIZER = ROOT / "Testing" / "data" / "medmvl_reference" / "base" / "llm"

TINY_LLM = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 832,
            "max_position_embeddings": 4096, "tie_word_embeddings": True}
TINY_SIGLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
               "image_size": 32, "patch_size": 8, "num_channels": 3}
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
             "L4": 121e12, "RTX 4090": 165e12, "RTX 6000 Ada": 364e12}


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def _preset_config(name: str) -> dict:
    """The shipped preset's (vision) config dict: real sizes, no download."""
    from medmvl_core.model.presets import get_preset

    cfg = dict(get_preset(name)["config"])
    return dict(cfg["vision_config"]) if "vision_config" in cfg else cfg


def build_model(small: bool, device: torch.device, dtype: torch.dtype):
    """MedM-VL-CT-Chest architecture with random weights -> (model, preprocessing spec)."""
    from medmvl_core.imaging.spec import default_spec
    from medmvl_core.model import MedMVLConfig, MedMVLForConditionalGeneration

    llm = dict(TINY_LLM) if small else _preset_config("Qwen/Qwen2.5-3B-Instruct")
    llm.setdefault("model_type", "qwen2")
    vis = dict(TINY_SIGLIP) if small else _preset_config("google/siglip-base-patch16-256-multilingual")
    spec = default_spec("siglip_slices", int(vis["image_size"]), depth=4 if small else 32)
    cfg = MedMVLConfig(llm_config=llm,
                       encoder_image={"type": "siglip", "select_layer": -1, "select_feature": "cls_patch",
                                      "config": vis, "attn_implementation": "sdpa"},
                       connector_image={"type": "attn_pooling", "name": "mlp2x_gelu", "num_heads": 8},
                       preprocessing={"image3d": spec}, llm_attn_implementation="sdpa")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MedMVLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval(), spec


def nbytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def copy_bandwidth(device: torch.device, small: bool) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    n = (16 << 20) if small else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    clock, reps = Clock(device), 3 if small else 20
    dst.copy_(src)
    t0 = clock.now()
    for _ in range(reps):
        dst.copy_(src)
    dt = clock.now() - t0
    del src, dst
    return 2 * n * reps / dt


def matmul_peak(device: torch.device, dtype: torch.dtype, small: bool) -> float:
    """Measured dense matmul FLOP/s (the MFU peak where the card's datasheet peak is unknown)."""
    n = 256 if small else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    clock, reps = Clock(device), 3 if small else 20
    a @ b
    t0 = clock.now()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (clock.now() - t0)


def synthetic_ct(shape: tuple[int, int, int], folder: Path) -> Path:
    """A 'chest' phantom ([k, j, i] HU) written as an uncompressed .nrrd (SimpleITK), or, where
    SimpleITK is not installed, as a single-frame DICOM series (pydicom) -> the file or folder."""
    d, h, w = shape
    z, y, x = np.ogrid[:d, :h, :w]
    body = ((y - h / 2) / (0.42 * h)) ** 2 + ((x - w / 2) / (0.45 * w)) ** 2 <= 1
    arr = np.full(shape, -1000, dtype=np.int16)
    arr[np.broadcast_to(body, shape)] = 40
    lungs = (((y - h / 2) / (0.3 * h)) ** 2 + ((np.abs(x - w / 2) - 0.2 * w) / (0.15 * w)) ** 2 <= 1)
    arr[np.broadcast_to(lungs & body, shape)] = -850
    try:
        import SimpleITK as sitk
    except ImportError:
        from medmvl_core.imaging.testing import write_ct_series

        path = folder / "ct_dicom"
        write_ct_series(path, arr.astype(np.float32), spacing=(0.7, 0.7, 1.0), shuffle_names=False)
        return path
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.7, 1.0))
    path = folder / "ct.nrrd"
    sitk.WriteImage(img, str(path), False)
    return path


QUESTION = "Generate radiology report for the CT."
FOLLOW_UP = "Where is the nodule located and how large is it?"


def make_engine(model, n_new: int, compile_decode: bool = False):
    """The worker's engine over ``model`` (decode_mode "auto": CUDA graphs on CUDA, the plain
    DynamicCache path on the CPU), with the fixture tokenizer (no download). EOS is switched off
    so every answer has exactly the requested length (fair token counts)."""
    from transformers import AutoTokenizer

    from medmvl_core.engine import Engine
    from medmvl_core.model.loader import make_processor

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    eng = Engine(model, make_processor(model, tok), max_new_tokens_limit=max(2048, n_new),
                 compile_decode=compile_decode)
    eng.eos_ids = set()
    return eng


def _decode_note(eng, answer) -> str:
    path = answer.timings.get("decode_path", "?")
    why = eng.fast_path.fallback_reason
    fb = f" (fallback: {why})" if why else ""
    return f"Engine path {path}{fb}"


def _volumes(n: int, seed: int = 0) -> list:
    """``n`` distinct small 'CT' arrays (resampled to the model's input size by preprocessing)."""
    from medmvl_core.imaging import Volume

    rng = np.random.default_rng(seed)
    return [Volume(rng.integers(-1000, 1000, (32, 64, 64)).astype(np.int16), modality="CT")
            for _ in range(n)]


def reference_generate(model, embeds: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return model.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)


def bench_decode(eng, n_new: int, batch: int, rows: list, device) -> None:
    """transformers ``generate`` at batch 1 and ``batch`` vs the worker's path on the same prompts:
    ``Engine.answer`` (batch 1) and ``Engine.answer_batch`` (``batch`` questions about
    ``batch`` volumes sharing their decode steps). Encoder outputs are cached first, so every row
    times prefill + decode, as ``generate`` from embeddings does."""
    from medmvl_core.engine import Request

    model, clock = eng.model, Clock(device)
    vols = _volumes(batch)
    entries = [eng.prepare(v) for v in vols]
    ids = eng.encode_prompt(eng.conversation([], QUESTION))
    with torch.inference_mode():
        x = torch.tensor([ids], device=device)
        embB = torch.cat([model.embed_inputs(x, e.embeds) for e in entries])  # distinct rows, same length
        for b, emb in ((1, embB[:1]), (batch, embB)):
            reference_generate(model, emb, 2)  # warm-up
            t0 = clock.now()
            reference_generate(model, emb, n_new)
            dt = clock.now() - t0
            rows.append((f"reference generate b{b}", b * n_new / dt, "tokens/s",
                         f"transformers generate, dynamic cache, {emb.shape[1]}-token prompt"))
    eng.answer(vols[0], QUESTION, max_new_tokens=n_new)  # warm-up (captures the decode graph)
    t0 = clock.now()
    one = eng.answer(vols[0], QUESTION, max_new_tokens=n_new)
    dt = clock.now() - t0
    rows.append(("ours b1", len(one.token_ids) / dt, "tokens/s", _decode_note(eng, one)))
    step_ms = _replay_ms(eng, clock)
    if step_ms is not None:
        rows.append(("decode step alone b1", step_ms, "ms",
                     f"the captured/compiled step replayed alone ({1e3 / step_ms:.0f} steps/s; the rest of "
                     f"'ours b1' is host work per token and the prefill)"))

    def reqs() -> list:
        return [Request(volume=v, question=QUESTION, max_new_tokens=n_new) for v in vols]

    eng.answer_batch(reqs())  # warm-up / capture at this batch size
    t0 = clock.now()
    res = eng.answer_batch(reqs())
    dt = clock.now() - t0
    bad = [r for r in res if isinstance(r, BaseException)]
    if bad:
        raise bad[0]
    rows.append((f"ours b{batch}", sum(len(r.token_ids) for r in res) / dt, "tokens/s",
                 _decode_note(eng, res[0]) + ", one forward per step for all rows"))
    logger.info("batch row 0 equals the batch-1 answer: %s", res[0].token_ids == one.token_ids)


def _replay_ms(eng, clock, reps: int = 50) -> float | None:
    """Milliseconds per replay of the engine's captured (or compiled) batch-1 decode step, with no
    host work between replays; None where the step is eager (CPU, fallback)."""
    runner = eng.fast_path.captured_step()
    if runner is None:
        return None
    with torch.inference_mode():
        runner()
        t0 = clock.now()
        for _ in range(reps):
            runner()
        return (clock.now() - t0) / reps * 1e3


def bench_profile(model, rows: list, device, steps: int = 5) -> None:
    """Where a decode step's GPU time goes: the eager static-cache step (the kernels a captured
    graph replays) under torch.profiler -> kernel count per step and the top kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    from medmvl_core.engine.fast_decode import FastDecoder

    fast = FastDecoder(model, mode="static")
    hidden = model.llm.get_input_embeddings().weight.shape[-1]
    with torch.inference_mode():
        fast.prefill(torch.randn(1, 297, hidden, device=device) * 0.02, max_new_tokens=64)
        for _ in range(3):
            fast.step(1)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                fast.step(1)
            if device.type == "cuda":
                torch.cuda.synchronize()
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    kern = [e for e in prof.key_averages() if device.type != "cuda" or getattr(e, "device_type", None) is not None
            and str(e.device_type).endswith("CUDA")]
    total_us = sum(getattr(e, attr) for e in kern)
    count = sum(e.count for e in kern) / steps
    rows.append(("profile: kernel time per step", total_us / steps / 1e3, "ms",
                 f"eager static-cache step, {count:.0f} kernels per step"))
    for e in sorted(kern, key=lambda e: -getattr(e, attr))[:12]:
        rows.append((f"profile: {e.key[:70]}", getattr(e, attr) / steps / 1e3, "ms",
                     f"{e.count / steps:.0f} per step"))


def bench_ttft(eng, small: bool, n_new: int, rows: list, device) -> None:
    """Cold TTFT (read a CT file, preprocess, encode, prefill, first token) and follow-up TTFT
    (the session's KV cache reused) through ``Engine.answer``, the worker's path."""
    from medmvl_core.imaging import read_image

    clock = Clock(device)
    shape = (40, 64, 64) if small else (300, 512, 512)
    # warm-up on another volume: kernels, allocator pools and the decode graph are ready
    warm = eng.create_session(_volumes(1, seed=1)[0])
    eng.answer(question=QUESTION, session=warm, max_new_tokens=n_new)
    eng.answer(question=FOLLOW_UP, session=warm, max_new_tokens=n_new)
    eng.delete_session(warm.id)
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_ct(shape, Path(tmp))
        t0 = clock.now()
        vol = read_image(path)
        t_read = clock.now() - t0
        fmt = "DICOM series" if path.is_dir() else path.suffix.lstrip(".")
    s = eng.create_session(vol)
    first = eng.answer(question=QUESTION, session=s, max_new_tokens=n_new)
    t = first.timings
    rows.append(("cold TTFT", (t_read + t["ttft_s"]) * 1e3, "ms",
                 f"{'x'.join(map(str, shape[::-1]))} CT ({fmt}): read {t_read * 1e3:.0f} ms, preprocess "
                 f"{t['preprocess_s'] * 1e3:.0f} ms, encode {t['encode_s'] * 1e3:.0f} ms, prefill "
                 f"{t['prefill_tokens']:.0f} tokens {t['prefill_s'] * 1e3:.0f} ms"))
    follow = eng.answer(question=FOLLOW_UP, session=s, max_new_tokens=n_new)
    t = follow.timings
    rows.append(("follow-up TTFT", t["ttft_s"] * 1e3, "ms",
                 f"{t['prefill_tokens']:.0f} new tokens prefilled ({t.get('prefill_path', 'plain')} path), "
                 f"{t['cached_tokens']:.0f} reused from the KV cache (session)"))
    eng.delete_session(s.id)
    eng.images.clear()


def bench_memory(rows: list, build, modes: list[str], n_new: int, device) -> None:
    for mode in modes:
        guarded(rows, f"memory {mode}", _memory_one, build, mode, n_new, rows, device)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _memory_one(build, mode: str, n_new: int, rows: list, device) -> None:
    """Build the model, quantize it, answer with ``n_new`` tokens through the engine: peak memory
    and decode speed of ``mode``."""
    from medmvl_core.engine.quantize import quantize_model, weight_bytes

    clock = Clock(device)
    model = quantize_model(build(), mode)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    eng = make_engine(model, n_new)
    vol = _volumes(1, seed=2)[0]
    eng.answer(vol, QUESTION, max_new_tokens=n_new)  # warm-up / capture (encoder output cached)
    t0 = clock.now()
    ans = eng.answer(vol, QUESTION, max_new_tokens=n_new)
    tps = len(ans.token_ids) / (clock.now() - t0)
    if device.type == "cuda":
        peak, what = torch.cuda.max_memory_allocated(), "peak GPU memory during decode"
    else:
        peak, what = weight_bytes(model), "weights + buffers"
    rows.append((f"memory {mode}", peak / 1e6, "MB", f"{what}; decode {tps:.1f} tokens/s ({_decode_note(eng, ans)})"))


def bench_train(model, small: bool, peak: float, peak_src: str, rows: list, device, dtype) -> None:
    from peft import LoraConfig, get_peft_model

    clock = Clock(device)
    batch, seq, steps = (2, 48, 2) if small else (8, 556, 4)
    r = 8 if small else 128
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model.llm = get_peft_model(model.llm, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05,
                                                     target_modules=targets))
    for p in model.encoder_image.parameters():
        p.requires_grad_(False)
    for p in model.connector_image.parameters():
        p.requires_grad_(True)
    model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.llm.enable_input_require_grads()
    model.train()
    n_img = model.num_image_tokens("image3d")
    vocab = model.config.llm_config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    ids[:, 4:4 + n_img] = -201
    labels = ids.masked_fill(ids < 0, -100)
    size = model.config.preprocessing["image3d"]["size"]
    images3d = torch.randn(batch, 3, *size, device=device, dtype=dtype)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, images3d=images3d)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    t0 = clock.now()
    for _ in range(steps):
        step()
    dt = (clock.now() - t0) / steps
    n_llm = sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" not in n)
    n_enc = sum(p.numel() for p in model.encoder_image.parameters())
    enc_tokens = batch * size[0] * model.encoder_image.num_patches()
    flops = 6 * n_llm * batch * seq + 2 * n_enc * enc_tokens
    rows.append(("train LoRA samples/s", batch / dt, "samples/s",
                 f"r={r}, batch {batch} x {seq} tokens, encoder frozen, connector trained, grad checkpointing"))
    rows.append(("train LoRA MFU", 100 * flops / dt / peak, "%", f"of {peak / 1e12:.3g} TFLOP/s ({peak_src})"))
    model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny model (CPU smoke run, seconds)")
    ap.add_argument("--new-tokens", type=int, default=None, help="answer length (default 128; 8 with --small)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--modes", default="none,8bit,4bit", help="quantization modes to measure")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--sections", default="ttft,decode,train,memory",
                    help="which sections to run (comma-separated: ttft, decode, train, memory; also "
                         "profile: the decode step's kernels under torch.profiler)")
    ap.add_argument("--compile-decode", action="store_true",
                    help="decode with torch.compile (reduce-overhead) instead of a plain CUDA-graph capture")
    ap.add_argument("--json", type=Path, default=None, help="also write rows + machine to this file")
    ap.add_argument("--verbose", action="store_true", help="log INFO (fast-path mode choices, fallbacks)")
    ap.add_argument("--time-limit", type=float, default=360.0,
                    help="seconds after which sections not yet started are skipped, each with a row "
                         "that says so (default 360: with the section then running and the start, "
                         "the run stays within 8 minutes)")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    unknown = sections - {"ttft", "decode", "train", "memory", "profile"}
    if unknown:
        ap.error(f"unknown section(s) {sorted(unknown)}; choose from ttft, decode, train, memory, profile")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible; use --device cpu --small", file=sys.stderr)
        return 2
    if args.device == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2 if args.small else os.cpu_count() or 1))
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n_new = args.new_tokens or (8 if args.small else 128)
    torch.manual_seed(0)
    info = machine(device)
    info["model"] = "small (--small: targets do not apply)" if args.small else "real size (Qwen2.5-3B + SigLIP)"
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    rows = Report(info, args.json, args.time_limit)
    bw = rows.section("copy bandwidth", copy_bandwidth, device, args.small)
    if bw is not None:
        rows.append(("copy bandwidth", bw / 1e9, "GB/s", "device-to-device copy, read + write"))
    built = rows.section("build model", build_model, args.small, device, dtype)
    model = built[0] if built else None
    wanted = [s for s in ("ttft", "decode", "profile") if s in sections]
    if not args.skip_train and "train" in sections:
        wanted.append("train")
    if model is None:
        for sec in wanted:
            rows.skip(sec, "the model could not be built (see the 'build model' row)")
    else:
        llm_bytes = nbytes(model.llm)
        if bw is not None:
            rows.append(("decode floor b1", bw / llm_bytes, "tokens/s",
                         f"{llm_bytes / 1e9:.3g} GB of LLM weights per token"))
        eng = rows.section("engine", make_engine, model, n_new, args.compile_decode)
        for sec in ("ttft", "decode", "profile"):
            if sec in wanted and eng is None:
                rows.skip(sec, "the engine could not be built (see the 'engine' row)")
        if eng is not None:
            if "ttft" in wanted:
                rows.section("ttft", bench_ttft, eng, args.small, n_new, rows, device)
            if "decode" in wanted:
                rows.section("decode", bench_decode, eng, n_new, args.batch, rows, device)
            if "profile" in wanted:
                rows.section("profile", bench_profile, model, rows, device)
        del eng
        if "train" in wanted:
            rows.section("train", _train_section, model, args.small, info, rows, device, dtype)
    del model, built
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    modes = [m for m in args.modes.split(",") if m] if "memory" in sections else []
    bench_memory(rows, lambda: build_model(args.small, device, dtype)[0], modes, min(n_new, 32), device)
    rows.write(complete=True)
    print_table(rows)
    print_targets(rows)
    return 0


def _train_section(model, small: bool, info: dict, rows: list, device, dtype) -> None:
    name = info.get("gpu", "")
    known = [v for k, v in BF16_PEAK.items() if k in name]
    if device.type == "cuda" and known:
        peak, src = known[0], f"{name} dense bf16 datasheet peak"
    else:
        peak, src = matmul_peak(device, dtype, small), f"measured {dtype} matmul on {device.type}"
    bench_train(model, small, peak, src, rows, device, dtype)


if __name__ == "__main__":
    sys.exit(main())
