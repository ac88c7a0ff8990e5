"""8-bit and 4-bit weights for the LLM (bitsandbytes), for GPUs with little memory.

``quantize_model(model, "8bit" | "4bit" | "none")`` replaces every ``nn.Linear`` of the LLM's
decoder layers with a bitsandbytes ``Linear8bitLt`` (LLM.int8, threshold 6.0) or ``Linear4bit``
(NF4, double quantization, compute in the model's float dtype). The embeddings, the LM head and
the vision encoder/connector stay in their float dtype (they are a small part of the weights and
the most sensitive to rounding). Works on CUDA and, with bitsandbytes >= 0.45's CPU backend, on
CPU (slow; for tests). The model is modified in place and returned.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from medmvl_core.errors import MedMVLError

logger = logging.getLogger(__name__)

QUANT_MODES = ("none", "8bit", "4bit")


class QuantizationError(MedMVLError):
    """Quantization was asked for but cannot be done (unknown mode, bitsandbytes missing/failing)."""


def _bnb() -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise QuantizationError("--quantize 8bit/4bit needs bitsandbytes; install it with "
                                "`pip install bitsandbytes` or run with --quantize none") from exc
    return bnb


def _new_linear(lin: nn.Linear, mode: str, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    bnb = _bnb()
    has_bias = lin.bias is not None
    w = lin.weight.data
    if mode == "8bit":
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias,
                                has_fp16_weights=False, threshold=6.0)
        # Int8Params quantizes when moved from the CPU to the target device
        q.weight = bnb.nn.Int8Params(w.to("cpu"), requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    if has_bias:
        q.bias = nn.Parameter(lin.bias.data.to(compute_dtype), requires_grad=False)
    return q.to(device)


def quantize_model(model: Any, mode: str, device: str | torch.device | None = None) -> Any:
    """Quantize the LLM's decoder-layer linear weights in place; returns ``model``.

    model: a MedMVLForConditionalGeneration (its ``.llm``) or a causal LM. mode: "none" |
    "8bit" | "4bit". device: where the model should end up; give it with a model loaded on the
    CPU so the full-precision weights never have to fit on the GPU (each layer is quantized
    straight onto ``device``, then the rest of the model is moved). Raises QuantizationError for
    an unknown mode or when bitsandbytes fails.
    """
    if mode not in QUANT_MODES:
        raise QuantizationError(f"quantize mode {mode!r} is not known; use one of {list(QUANT_MODES)}")
    if mode == "none":
        return model if device is None else model.to(device)
    # bitsandbytes warns on every int8 matmul whose input is not fp16; once is enough
    warnings.filterwarnings("once", message="MatMul8bitLt: inputs will be cast")
    llm = getattr(model, "llm", model)
    params = list(llm.parameters())
    device = torch.device(device) if device is not None else params[0].device
    floats = [p.dtype for p in params if p.dtype.is_floating_point]
    compute_dtype = floats[0] if floats else torch.float32
    base = getattr(llm, "model", llm)  # the decoder stack; lm_head and embeddings stay float
    targets = [(name, mod) for name, mod in base.named_modules() if isinstance(mod, nn.Linear)]
    if not targets:
        raise QuantizationError("the LLM has no nn.Linear layers to quantize (already quantized?)")
    before = sum(m.weight.numel() * m.weight.element_size() for _, m in targets)
    try:
        for name, mod in targets:
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            setattr(parent, child, _new_linear(mod, mode, device, compute_dtype))
    except QuantizationError:
        raise
    except Exception as exc:  # noqa: BLE001 - bitsandbytes backend errors vary by platform
        raise QuantizationError(f"bitsandbytes could not quantize the LLM to {mode} on {device.type}: "
                                f"{type(exc).__name__}: {exc}; run with --quantize none") from exc
    model.to(device)  # the float parts (embeddings, head, vision); quantized layers are already there
    after = sum(quantized_bytes(m) for m in base.modules() if _is_bnb(m))
    logger.info("quantized %d LLM linear layers to %s: %.1f MB -> %.1f MB", len(targets), mode,
                before / 1e6, after / 1e6)
    llm.config.medmvl_quantization = mode  # informational; never saved with a checkpoint
    return model


def _is_bnb(m: nn.Module) -> bool:
    return type(m).__module__.startswith("bitsandbytes")


def quantized_bytes(m: nn.Module) -> int:
    """Bytes held by a (quantized or float) module's own parameters and quantization state."""
    total = sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    for attr in ("SCB",):
        t = getattr(getattr(m, "weight", None), attr, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    state = getattr(getattr(m, "weight", None), "quant_state", None)
    if state is not None and isinstance(getattr(state, "absmax", None), torch.Tensor):
        total += state.absmax.numel() * state.absmax.element_size()
    return total


def weight_bytes(model: Any) -> int:
    """Bytes of all parameters and buffers (quantized weights counted at their stored size)."""
    total = 0
    for m in model.modules():
        total += quantized_bytes(m) if _is_bnb(m) else sum(
            p.numel() * p.element_size() for p in m.parameters(recurse=False))
        total += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
    return total
