"""Progress, throughput and logging: samples/s, tokens/s, model-FLOPs utilization (MFU).

FLOP convention (the one issue 10 measures the reference with): per optimizer step,
``6 * N_llm * T_llm`` for the LLM (forward + backward, N = all LLM parameters, a tied embedding
counted once, T = real (unpadded) tokens the LLM processed, image tokens included) plus, for
each vision encoder, ``2 * N_enc * T_enc`` when frozen (forward only) or ``6 * N_enc * T_enc``
when trained (T_enc = patch tokens the encoder processed: slices x patches for a CT through a 2D
encoder; images served from the encoder cache are not encoded and count 0). Connectors are
ignored (well under 1%). MFU = achieved FLOP/s / (peak FLOP/s per device x devices).
Check against issue 10's reference: 19.9 samples/s x 556 tokens with Qwen2.5-3B (3.09e9) and
SigLIP-base (9.3e7 x 32 x 256 patch tokens per sample) = 2.35e14 FLOP/s = 24% of 989 TFLOP/s.
The peak comes from ``log.peak_tflops`` or, on a CUDA device, from the table below (dense bf16).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s (no sparsity) by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS_BF16 = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "A800": 312.0, "H800": 989.0,
                    "L40S": 362.0, "L40": 181.0, "A6000": 155.0, "A10": 125.0, "4090": 165.0, "3090": 71.0,
                    "V100": 125.0, "T4": 65.0}


def peak_tflops_for_device(name: Optional[str]) -> Optional[float]:
    """Peak dense bf16 TFLOP/s for a CUDA device name, or None when unknown (CPU)."""
    if not name:
        return None
    for key in sorted(PEAK_TFLOPS_BF16, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS_BF16[key]
    return None


def step_flops(n_llm: int, llm_tokens: int, encoders: list[tuple[int, int, bool]]) -> float:
    """Model FLOPs of one step: 6*N*T for the LLM + (2 or 6)*N*T per encoder ``(N, T, trained)``."""
    total = 6.0 * n_llm * llm_tokens
    for n_enc, t_enc, trained in encoders:
        total += (6.0 if trained else 2.0) * n_enc * t_enc
    return total


@dataclass
class ThroughputMeter:
    """Accumulates samples, tokens and FLOPs between log points; rates are per wall-clock second."""

    world_size: int = 1
    peak_tflops: Optional[float] = None
    _t0: float = field(default_factory=lambda: time.perf_counter())
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0

    def update(self, samples: int, tokens: int, flops: float) -> None:
        self.samples += samples
        self.tokens += tokens
        self.flops += flops

    def rates(self) -> dict:
        """samples_per_s, tokens_per_s, tflops (achieved, all devices) and mfu (None without a peak); resets."""
        dt = max(time.perf_counter() - self._t0, 1e-9)
        out = {"samples_per_s": self.samples / dt, "tokens_per_s": self.tokens / dt,
               "tflops": self.flops / dt / 1e12, "mfu": None}
        if self.peak_tflops:
            out["mfu"] = out["tflops"] / (self.peak_tflops * self.world_size)
        self._t0 = time.perf_counter()
        self.samples = self.tokens = 0
        self.flops = 0.0
        return out


class RunLogger:
    """Console lines, a tqdm progress bar, TensorBoard scalars and ``metrics.jsonl`` (main process only)."""

    def __init__(self, output_dir: Path, total_steps: int, initial_step: int = 0, *, tensorboard: bool = True,
                 progress_bar: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.history: list[dict] = []
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.output_dir / "tensorboard"))
            except ImportError:
                logger.warning("tensorboard is not installed; TensorBoard logging is off (pip install tensorboard)")
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict, *, prefix: str = "train") -> None:
        """Record metrics of ``step`` (None values are skipped)."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None and not isinstance(v, str)}
        rec = {"step": step, "split": prefix, **clean}
        self.history.append(rec)
        self._jsonl.write(json.dumps(rec) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, step)
        text = " ".join(_fmt(k, v) for k, v in clean.items())
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.write(f"[{prefix}] step {step}: {text}")
        else:
            logger.info("[%s] step %d: %s", prefix, step, text)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._jsonl.close()


def _fmt(k: str, v: float) -> str:
    if k in ("lr",):
        return f"{k}={v:.3e}"
    if k == "mfu":
        return f"mfu={100 * v:.1f}%"
    if abs(v) >= 100 or v == int(v):
        return f"{k}={v:.1f}"
    return f"{k}={v:.4f}"


def read_history(output_dir: Path) -> list[dict]:
    """All records of ``metrics.jsonl`` (a resumed run appends to it)."""
    p = Path(output_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def write_loss_curve(output_dir: Path, history: Optional[list[dict]] = None) -> Optional[Path]:
    """Plot train (and eval) loss against step to ``output_dir/loss_curve.png``. Returns the path."""
    history = read_history(output_dir) if history is None else history
    pts = {}
    for rec in history:  # the latest record of a step wins (a resumed run re-logs nothing twice anyway)
        if "loss" in rec and math.isfinite(rec["loss"]):
            pts[(rec["split"], rec["step"])] = rec["loss"]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for split in sorted({s for s, _ in pts}):
        xs = sorted(st for s, st in pts if s == split)
        ax.plot(xs, [pts[(split, x)] for x in xs], marker="." if len(xs) < 50 else None, label=split)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(output_dir) / "loss_curve.png"
    fig.savefig(out)
    plt.close(fig)
    return out
