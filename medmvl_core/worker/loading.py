"""Load a checkpoint into an :class:`~medmvl_core.engine.Engine` for the worker."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medmvl_core.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def resolve_device(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; "
                          "use --device cpu or auto (see docs/models.md#devices-gpu-or-cpu)")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}; use auto, cuda or cpu")
    return device


def cpu_has_bf16_units() -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there bf16 matrix
    products run ~3x faster than float32; elsewhere they are emulated and far slower."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str | None, device: str):
    """The torch dtype for ``dtype`` (None: the device's default: bf16 / fp16 on a GPU, float32 on
    the CPU)."""
    import torch
    if dtype is None:
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[dtype])


QUANTIZE_CHOICES = ("auto", "none", "int8", "8bit", "4bit")


#: ``auto`` quantizes on the CPU only an LLM with at least this many linear weights: a small model
#: (the demo models) is bound by per-layer overheads, not by reading its weights, so int8 would
#: cost accuracy and save nothing
AUTO_INT8_MIN_PARAMS = 100_000_000


def llm_linear_params(checkpoint: str | Path) -> int | None:
    """Weights in the LLM decoder's linear layers, from the safetensors headers (None: no headers)."""
    from medmvl_core.worker.admission import _LLM_LINEAR, checkpoint_tensors

    tensors = checkpoint_tensors(checkpoint)
    if not tensors:
        return None
    total = 0
    for name, (shape, _dt) in tensors.items():
        if len(shape) == 2 and _LLM_LINEAR.match(name):
            total += shape[0] * shape[1]
    return total


def resolve_quantize(quantize: str, device: str, dtype: str | None = None,
                     checkpoint: str | Path | None = None) -> str:
    """``auto``: int8 LLM weights on the CPU (torch dynamic int8, the fastest CPU path measured,
    see docs/full-size-models.md; with bf16 vision encoders where the CPU has bf16 units) unless
    bf16 or fp16 is asked for or the checkpoint's LLM is small (< ``AUTO_INT8_MIN_PARAMS``
    linear weights); no quantization on a GPU."""
    if quantize != "auto":
        return quantize
    if device != "cpu" or dtype not in (None, "fp32"):
        return "none"
    if checkpoint is not None:
        n = llm_linear_params(checkpoint)
        if n is not None and n < AUTO_INT8_MIN_PARAMS:
            return "none"
    return "int8"


def load_model(checkpoint: str | Path, device: str = "auto", dtype: str | None = None,
               quantize: str = "none") -> tuple[Any, Any]:
    """(model, processor) on the device; ``quantize`` 8bit/4bit loads on the CPU, then puts the
    LLM's layers on the device quantized (bitsandbytes)."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise ConfigError(f"checkpoint folder {str(path)!r} does not exist")
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"unknown quantize {quantize!r}; use one of {', '.join(QUANTIZE_CHOICES)}")
    dev = resolve_device(device)
    quantize = resolve_quantize(quantize, dev, dtype, path)
    torch_dtype = resolve_dtype(dtype, dev)
    import torch

    from medmvl_core.model import load_checkpoint
    if quantize in ("none", "int8"):  # int8: each layer quantized as it is read (no float copy of the model)
        vision = torch.bfloat16 if quantize == "int8" and dtype is None and cpu_has_bf16_units() else None
        model, proc = load_checkpoint(str(path), device=dev, dtype=torch_dtype, quantize=quantize, vision_dtype=vision)
        if vision is not None:
            logger.info("vision encoders in bf16 (CPU bf16 units); LLM int8")
        return model.eval(), proc
    from medmvl_core.engine.quantize import quantize_model
    model, proc = load_checkpoint(str(path), device="cpu", dtype=torch_dtype)
    return quantize_model(model, quantize, device=dev).eval(), proc


def load_engine(checkpoint: str | Path, device: str = "auto", dtype: str | None = None,
                quantize: str = "none", warmup_batch: int = 1, **engine_kwargs: Any):
    """An Engine over the loaded checkpoint (``engine_kwargs`` go to :class:`Engine`)."""
    from medmvl_core.engine import Engine
    from medmvl_core.worker.admission import admit
    # refuse before reading a weight if it will not fit (a folder without safetensors: no plan)
    dev = resolve_device(device)
    quant = resolve_quantize(quantize, dev, dtype, checkpoint)
    admit(checkpoint, dev, resolve_dtype(dtype, dev), quant, int(engine_kwargs.get("kv_cache_bytes", 4 << 30)))
    model, proc = load_model(checkpoint, device, dtype, quant)  # resolved once: its auto rule reads the headers
    engine = Engine(model, proc, **engine_kwargs)
    params = llm_linear_params(checkpoint)
    if engine.fast_path.enabled or (params is not None and params >= AUTO_INT8_MIN_PARAMS):
        # compile / capture the decode step (GPU), create the oneDNN kernels of the encoder's and the
        # LLM's shapes (CPU: a first encode of a full-size model is ~2x slower) now rather than in the
        # first user's question
        sizes = tuple(range(1, max(1, warmup_batch) + 1))
        try:
            logger.info("warm-up took %.1f s", engine.warmup(batch_sizes=sizes))
        except Exception as exc:  # noqa: BLE001 - a warm-up is an optimisation: never a reason not to serve
            logger.warning("warm-up failed (%s: %s); the first question will be slower", type(exc).__name__, exc)
    return engine
