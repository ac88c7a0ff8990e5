"""Tune types per component: freezing, full training, LoRA and QLoRA (bitsandbytes 4-bit) on the LLM.

LoRA adapters are injected in place with peft (``LoraModel``), so the model keeps its class and
forward; only modules under ``llm.`` whose names end in one of ``tune.lora.target_modules`` get
adapters. QLoRA first replaces the LLM's linear layers (not ``lm_head``) with bitsandbytes
``Linear4bit`` (NF4/FP4), then adds LoRA on top.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

import torch
from torch import nn

from medmvl_core.errors import ConfigError
from training.config import RunConfig

logger = logging.getLogger(__name__)

PARTS = ("llm", "encoder_image", "encoder_image3d", "connector_image", "connector_image3d")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def lora_targets(model: nn.Module, target_modules: Optional[list]) -> list[str]:
    """The LoRA target names: the config's, or (``None``) peft's default for the LLM's model type
    (``q_proj``/``v_proj`` for Qwen2 and Llama), which is what a peft ``LoraConfig`` without
    ``target_modules`` uses (MedM-VL's LoRA examples)."""
    if target_modules is not None:
        return list(target_modules)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(model.llm.config, "model_type", None)
    if model_type not in DEFAULTS:
        raise ConfigError(f"tune.lora.target_modules is null (peft's default) but peft has no default for the "
                          f"LLM type {model_type!r}; list the modules, e.g. [q_proj, v_proj]")
    return list(DEFAULTS[model_type])


def lora_target_regex(target_modules: list[str]) -> str:
    """peft ``target_modules`` regex restricted to the LLM: ``llm.<...>.<name>``."""
    names = "|".join(re.escape(t) for t in target_modules)
    return rf"llm\..*\.(?:{names})"


def quantize_llm_4bit(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                      compute_dtype: str = "bfloat16", device: str | torch.device = "cpu") -> int:
    """Replace every ``nn.Linear`` of ``model.llm`` except ``lm_head`` with a bitsandbytes ``Linear4bit``
    holding the same weights quantized. Returns the number of layers replaced."""
    from bitsandbytes.nn import Linear4bit, Params4bit

    count = 0
    for name, module in list(model.llm.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or isinstance(child, Linear4bit) or full.endswith("lm_head"):
                continue
            q = Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                           compute_dtype=_DTYPES[compute_dtype], compress_statistics=double_quant,
                           quant_type=quant_type)
            q.weight = Params4bit(child.weight.data.detach().clone().float(), requires_grad=False,
                                  quant_type=quant_type, compress_statistics=double_quant)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.detach().clone(), requires_grad=False)
            setattr(module, child_name, q.to(device))
            count += 1
    logger.info("QLoRA: %d LLM linear layers quantized to 4-bit %s", count, quant_type)
    return count


def unpack_4bit_for_training(model: nn.Module) -> int:
    """Undo bitsandbytes' CPU inference packing of 4-bit weights.

    On CPUs with AVX512-BF16, a ``Linear4bit`` forward in eval mode without grad repacks its weight
    for fast inference; a later training step through that layer then fails with "a view of a
    leaf Variable that requires grad is being used in an in-place operation". This converts every
    packed layer back (what ``state_dict()`` also does). Call it after every eval/generate.
    Returns the number of layers converted.
    """
    try:
        from bitsandbytes.nn import Linear4bit
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
    except ImportError:  # no bitsandbytes or an API without CPU packing: nothing to undo
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            qs = getattr(module.weight, "quant_state", None)
            if qs is not None and getattr(qs, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, qs)
                n += 1
    return n


def apply_tuning(model: nn.Module, cfg: RunConfig, device: str | torch.device = "cpu") -> Optional[Any]:
    """Freeze / unfreeze each part, add LoRA or QLoRA. Returns the peft ``LoraModel`` (or None).

    After this, exactly the parameters that should train have ``requires_grad=True``. QLoRA
    quantizes the LLM's linear layers on ``device`` (the training device).
    """
    t = cfg.tune
    model.requires_grad_(False)
    lora_model = None
    if t.llm in ("lora", "qlora"):
        from peft import LoraConfig, LoraModel

        if t.llm == "qlora":
            quantize_llm_4bit(model, t.qlora.quant_type, t.qlora.double_quant, t.qlora.compute_dtype, device)
        targets = lora_targets(model, t.lora.target_modules)
        lcfg = LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                          target_modules=lora_target_regex(targets), bias="none")
        lora_model = LoraModel(model, lcfg, "default")  # injects in place into `model`
        n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        if n_lora == 0:
            raise ConfigError(f"tune.lora.target_modules {targets} match no LLM layer; "
                              "use names such as q_proj, v_proj (Qwen2/Llama) or dense (Phi)")
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    elif t.llm == "full":
        model.llm.requires_grad_(True)
    for part in PARTS[1:]:
        mod = getattr(model, part, None)
        if mod is None:
            continue
        if getattr(t, part) == "full":
            mod.requires_grad_(True)
    for part in PARTS[1:]:
        if getattr(t, part) == "full" and getattr(model, part, None) is None:
            logger.debug("tune.%s=full but the model has no %s; ignored", part, part)
    return lora_model


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable parameter count per top-level part (and 'total')."""
    out: dict[str, int] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            part = n.split(".", 1)[0]
            out[part] = out.get(part, 0) + p.numel()
    out["total"] = sum(out.values())
    return out


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Checkpoint the LLM's decoder layers (and HF vision towers that support it)."""
    kw = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if hasattr(model.llm, "gradient_checkpointing_enable"):
        model.llm.gradient_checkpointing_enable(**kw)
        model.llm.config.use_cache = False
    for part in ("encoder_image", "encoder_image3d"):
        enc = getattr(model, part, None)
        inner = getattr(enc, "encoder", None) if enc is not None else None
        if inner is not None and hasattr(inner, "gradient_checkpointing_enable") and \
                getattr(inner, "supports_gradient_checkpointing", False):
            inner.gradient_checkpointing_enable(**kw)


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Store frozen floating-point parameters in ``dtype`` (e.g. bf16 under bf16 autocast: half the
    memory, no per-step weight casts). Only safe when those weights are not saved from this model
    (LoRA/QLoRA adapters). Returns the number of parameters converted."""
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += p.numel()
    return n
