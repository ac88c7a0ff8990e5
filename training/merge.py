"""LoRA adapters: adapter-only saving and merging into a full checkpoint.

Adapter folder: ``adapter_config.json`` (format, base checkpoint, peft LoRA config, tune types),
``adapter_model.safetensors`` (LoRA weights, peft names with adapter ``default``),
``trained_modules.safetensors`` (other parts trained in full, e.g. the connector) and the
processor files. Merging loads the base with ``load_checkpoint`` on one process from files —
never from sharded live parameters — so it is safe after ZeRO-3/FSDP training (the adapter was
written from the gathered state dict).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from medmvl_core.errors import CheckpointError

logger = logging.getLogger(__name__)

ADAPTER_FORMAT = "medmvl-lora-adapter"
ADAPTER_CONFIG = "adapter_config.json"


def save_adapter(out_dir: Path, model: torch.nn.Module, state: dict, lora_model: Any, base_dir: Optional[Path],
                 processor: Any, cfg: Any) -> Path:
    """Write the adapter of a LoRA/QLoRA run. ``state`` is the (gathered) full state dict of ``model``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {k: v.detach().cpu().contiguous() for k, v in state.items() if "lora_" in k}
    other = {k: state[k].detach().cpu().contiguous() for k in sorted(trainable) if "lora_" not in k and k in state}
    save_file(lora, str(out / "adapter_model.safetensors"))
    save_file(other, str(out / "trained_modules.safetensors"))
    peft_cfg = lora_model.peft_config["default"]
    conf = {"format": ADAPTER_FORMAT, "version": 1, "base": str(base_dir) if base_dir else None,
            "lora": {"r": peft_cfg.r, "lora_alpha": peft_cfg.lora_alpha, "lora_dropout": peft_cfg.lora_dropout,
                     "target_modules": peft_cfg.target_modules if isinstance(peft_cfg.target_modules, str)
                     else sorted(peft_cfg.target_modules), "bias": peft_cfg.bias},
            "tune": {"llm": cfg.tune.llm, "encoder_image": cfg.tune.encoder_image,
                     "encoder_image3d": cfg.tune.encoder_image3d, "connector_image": cfg.tune.connector_image,
                     "connector_image3d": cfg.tune.connector_image3d},
            "trained_modules": sorted(other)}
    (out / ADAPTER_CONFIG).write_text(json.dumps(conf, indent=2))
    processor.save_pretrained(str(out))
    logger.info("adapter written to %s (%d LoRA tensors, %d other trained tensors)", out, len(lora), len(other))
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict:
    p = Path(adapter_dir) / ADAPTER_CONFIG
    if not p.is_file():
        raise CheckpointError(f"{adapter_dir} is not an adapter folder (no {ADAPTER_CONFIG}); give OUTPUT/final "
                              "of a LoRA/QLoRA run")
    conf = json.loads(p.read_text())
    if conf.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{p} is not a MedM-VL training adapter (format {conf.get('format')!r})")
    return conf


def apply_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> Any:
    """Inject the adapter's LoRA layers into ``model`` and load its weights; returns the peft LoraModel."""
    from peft import LoraConfig, LoraModel
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    conf = read_adapter_config(adapter_dir)
    lcfg = LoraConfig(**conf["lora"])
    lora_model = LoraModel(model, lcfg, "default")
    sd = load_file(str(adapter_dir / "adapter_model.safetensors"))
    sd.update(load_file(str(adapter_dir / "trained_modules.safetensors")))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise CheckpointError(f"the adapter {adapter_dir} has {len(unexpected)} tensors the base model lacks "
                              f"(e.g. {unexpected[:3]}); is --base the checkpoint it was trained from?")
    lora_missing = [k for k in missing if "lora_" in k]
    if lora_missing:
        raise CheckpointError(f"the adapter {adapter_dir} lacks {len(lora_missing)} LoRA tensors "
                              f"(e.g. {lora_missing[:3]})")
    return lora_model


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, base: Optional[str | Path] = None) -> Path:
    """Load the base checkpoint, apply the adapter, merge LoRA into the weights and save a full
    checkpoint (our format: model + processor) to ``out_dir``."""
    from medmvl_core.model import load_checkpoint
    from medmvl_core.processing import MedMVLProcessor

    conf = read_adapter_config(adapter_dir)
    base = base or conf.get("base")
    if not base or not Path(base).exists():
        raise CheckpointError(f"the adapter's base checkpoint {base!r} is not there; pass --base PATH")
    model, _ = load_checkpoint(str(base), device="cpu", dtype=torch.float32)
    lora_model = apply_adapter(model, adapter_dir)
    merged = lora_model.merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(str(out), safe_serialization=True)
    MedMVLProcessor.from_pretrained(str(adapter_dir)).save_pretrained(str(out))
    logger.info("merged %s into %s -> %s", adapter_dir, base, out)
    return out
