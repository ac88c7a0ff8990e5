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


def resolve_dtype(dtype: str | None, device: str):
    import torch
    if dtype is None:
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[dtype])


QUANTIZE_CHOICES = ("auto", "none", "int8", "8bit", "4bit")


def resolve_quantize(quantize: str, device: str, dtype: str | None = None) -> str:
    """``auto``: torch dynamic int8 on the CPU (the fastest CPU path measured, see
    docs/full-size-models.md) unless a float dtype is asked for; no quantization on a GPU."""
    if quantize != "auto":
        return quantize
    return "int8" if device == "cpu" and dtype in (None, "fp32") else "none"


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
    quantize = resolve_quantize(quantize, dev, dtype)
    torch_dtype = resolve_dtype(dtype, dev)
    from medmvl_core.model import load_checkpoint
    if quantize == "none":
        model, proc = load_checkpoint(str(path), device=dev, dtype=torch_dtype)
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
    admit(checkpoint, dev, resolve_dtype(dtype, dev), resolve_quantize(quantize, dev, dtype),
          int(engine_kwargs.get("kv_cache_bytes", 4 << 30)))
    model, proc = load_model(checkpoint, device, dtype, quantize)
    engine = Engine(model, proc, **engine_kwargs)
    if engine.fast_path.enabled:
        # compile / capture the decode step now rather than in the first user's question
        sizes = tuple(range(1, max(1, warmup_batch) + 1))
        logger.info("warm-up took %.1f s", engine.warmup(batch_sizes=sizes))
    return engine
