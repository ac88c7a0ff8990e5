"""Memory admission: refuse to load a model that will not fit, before loading it.

The worker calls :func:`admit` before it reads any weight. The need is estimated from the
checkpoint's safetensors headers (no tensor is read) for the chosen dtype / quantization:

    weights      every stored tensor the model keeps, at the load dtype; the LLM's decoder-layer
                 linear weights at 1 byte (int8 / 8bit) or ~0.56 byte (4bit) instead
    activations  one prefill of ``ACT_TOKENS`` tokens (logits over the vocabulary, the MLP's
                 widest intermediate) plus the vision encoder
    KV budget    the sessions' KV-cache budget (``--kv-cache-mb``)
    runtime      torch, the tokenizer, Python (CPU) or the CUDA context (GPU)

against what is free: ``MemAvailable`` (and the cgroup limit) on the CPU, ``cudaMemGetInfo`` on a
GPU, capped by ``MEDMVL_MEMORY_LIMIT_MB`` when set (containers, tests). A model that does not fit
gets :class:`InsufficientMemoryError` naming the need, what is free and the options; the worker
reports it through ``/v1/health`` instead of being killed by the kernel.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medmvl_core.errors import MedMVLError

logger = logging.getLogger(__name__)

ENV_LIMIT = "MEDMVL_MEMORY_LIMIT_MB"
ACT_TOKENS = 1024  # a long prompt: image tokens + question + history
ENCODER_ACT_BYTES = 256 << 20
RUNTIME_BYTES = {"cpu": 768 << 20, "cuda": 640 << 20}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_LLM_LINEAR = re.compile(r"^llm\.model\.layers\.\d+\..*\.weight$")
#: bytes per weight of a quantized LLM linear layer (int8 + per-row scale; NF4 + absmax per 64)
QUANT_BYTES = {"int8": 1.0, "8bit": 1.0, "4bit": 0.5625}
_UNUSED = ("encoder_image3d.encoder.language_encoder.", "encoder_image3d.encoder.text_encoder.",
           "encoder_image3d.encoder.mm_vision_proj.", "encoder_image3d.encoder.mm_language_proj.",
           "encoder_image3d.encoder.logit_scale")


class InsufficientMemoryError(MedMVLError):
    """The model would not fit in the memory that is free; the message lists the options."""

    code = "insufficient_memory"


@dataclass
class MemoryPlan:
    """What loading ``checkpoint`` as asked needs, and what is free (bytes)."""

    device: str
    dtype: str
    quantize: str
    weights_bytes: int
    activation_bytes: int
    kv_budget_bytes: int
    runtime_bytes: int
    available_bytes: int
    available_source: str
    kv_bytes_per_token: int

    @property
    def need_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes + self.kv_budget_bytes + self.runtime_bytes

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.available_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "need_bytes": self.need_bytes, "fits": self.fits}

    def describe(self) -> str:
        return (f"weights {_gb(self.weights_bytes)} ({self.dtype}, quantize {self.quantize}) + activations "
                f"{_gb(self.activation_bytes)} + KV budget {_gb(self.kv_budget_bytes)} + runtime "
                f"{_gb(self.runtime_bytes)} = {_gb(self.need_bytes)}")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _header(path: Path) -> dict:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > 100 << 20:
            raise MedMVLError(f"{path} does not look like a safetensors file (header of {n} bytes)",
                              code="bad_checkpoint")
        return json.loads(fh.read(n))


def checkpoint_tensors(folder: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, safetensors dtype)} of every tensor in the folder's safetensors file(s),
    read from the headers only. Empty when the folder has no safetensors."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"] if (folder / "model.safetensors").is_file() else []
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        if not (folder / f).is_file():
            continue  # the loader reports the missing shard
        for name, meta in _header(folder / f).items():
            if name != "__metadata__":
                out[name] = (tuple(meta["shape"]), meta["dtype"])
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def weights_bytes(tensors: dict[str, tuple[tuple[int, ...], str]], dtype_bytes: int, quantize: str) -> int:
    """Bytes the loaded weights hold: floats at ``dtype_bytes``, integer tensors as stored, the
    LLM decoder's linear weights at the quantized size; the unused 3D-CLIP text tower is dropped."""
    per_q = QUANT_BYTES.get(quantize)
    total = 0.0
    for name, (shape, dt) in tensors.items():
        if name.startswith(_UNUSED):
            continue
        n = _numel(shape)
        if per_q is not None and len(shape) == 2 and _LLM_LINEAR.match(name):
            total += n * per_q + shape[0] * 4
        elif dt.startswith(("F", "BF")):
            total += n * dtype_bytes
        else:
            total += n * _DTYPE_BYTES.get(dt, 4)
    emb = tensors.get("llm.model.embed_tokens.weight")
    if quantize == "int8" and emb is not None and "llm.lm_head.weight" not in tensors:
        total += _numel(emb[0]) + emb[0][0] * 4  # int8 quantizes a copy of the tied LM head
    return int(total)


def kv_bytes_per_token(llm_config: Any, dtype_bytes: int) -> int:
    """K and V of one token over every layer: 2 x layers x kv_heads x head_dim x bytes."""
    get = llm_config.get if isinstance(llm_config, dict) else (lambda k, d=None: getattr(llm_config, k, d))
    heads = int(get("num_attention_heads"))
    kv_heads = int(get("num_key_value_heads") or heads)
    head_dim = int(get("head_dim", None) or int(get("hidden_size")) // heads)
    return 2 * int(get("num_hidden_layers")) * kv_heads * head_dim * dtype_bytes


def activation_bytes(llm_config: dict, dtype_bytes: int, tokens: int = ACT_TOKENS) -> int:
    """One prefill of ``tokens``: float32 logits over the vocabulary plus the widest hidden
    states (MLP intermediate, attention projections), and the vision encoder's working set."""
    hidden, inter = int(llm_config["hidden_size"]), int(llm_config.get("intermediate_size") or 4 * llm_config["hidden_size"])
    per_token = int(llm_config["vocab_size"]) * 4 + (6 * hidden + 3 * inter) * max(dtype_bytes, 4)
    return tokens * per_token + ENCODER_ACT_BYTES


def available_memory(device: str) -> tuple[int, str]:
    """(bytes free for this process on ``device``, where that figure comes from)."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        avail, source = int(free), f"free GPU memory on {device}"
    else:
        avail, source = _host_available()
    cap = os.environ.get(ENV_LIMIT)
    if cap:
        try:
            limit = int(float(cap) * (1 << 20))
        except ValueError as exc:
            raise MedMVLError(f"{ENV_LIMIT}={cap!r} is not a number of MB", code="bad_config") from exc
        if limit < avail:
            avail, source = limit, f"{ENV_LIMIT}={cap}"
    return avail, source


def _host_available() -> tuple[int, str]:
    avail, source = None, "MemAvailable"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        try:
            import psutil

            avail, source = int(psutil.virtual_memory().available), "psutil available"
        except ImportError:
            return 1 << 62, "unknown (no /proc/meminfo, no psutil): not checked"
    try:  # a container's cgroup v2 limit
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max" and int(limit) - used < avail:
            avail, source = int(limit) - used, "cgroup memory.max - memory.current"
    except (OSError, ValueError):
        pass
    return avail, source


def _llm_config(folder: Path) -> dict:
    raw = json.loads((folder / "config.json").read_text())
    if isinstance(raw.get("llm_config"), dict):
        return raw["llm_config"]
    from medmvl_core.model.medmvl_compat import import_config

    return import_config(raw, folder).config.llm_config.to_dict()


def plan_memory(checkpoint: str | Path, device: str, dtype: Any, quantize: str,
                kv_budget_bytes: int) -> MemoryPlan | None:
    """The :class:`MemoryPlan` for loading ``checkpoint`` so; None when it has no safetensors
    (the loader then reports what is wrong)."""
    folder = Path(checkpoint)
    tensors = checkpoint_tensors(folder)
    if not tensors or not (folder / "config.json").is_file():
        return None
    dtype_name = str(dtype).replace("torch.", "")
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype_name, 4)
    llm = _llm_config(folder)
    avail, source = available_memory(device)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return MemoryPlan(device=device, dtype=dtype_name, quantize=quantize,
                      weights_bytes=weights_bytes(tensors, dtype_bytes, quantize),
                      activation_bytes=activation_bytes(llm, dtype_bytes), kv_budget_bytes=int(kv_budget_bytes),
                      runtime_bytes=RUNTIME_BYTES[kind], available_bytes=avail, available_source=source,
                      kv_bytes_per_token=kv_bytes_per_token(llm, dtype_bytes))


def _options(plan: MemoryPlan, tensors_weights: dict[str, int]) -> list[str]:
    opts = []
    for label, need in tensors_weights.items():
        opts.append(f"{label} (weights {_gb(need)})")
    if plan.kv_budget_bytes > 256 << 20:
        opts.append(f"a smaller session KV budget (--kv-cache-mb {max(256, plan.kv_budget_bytes // 4 >> 20)})")
    opts.append("another device (--device cuda / a machine with more memory), or close other programs")
    return opts


def admit(checkpoint: str | Path, device: str, dtype: Any, quantize: str, kv_budget_bytes: int) -> MemoryPlan | None:
    """Check that loading fits; returns the plan, or raises :class:`InsufficientMemoryError`."""
    plan = plan_memory(checkpoint, device, dtype, quantize, kv_budget_bytes)
    if plan is None:
        return None
    logger.info("memory admission on %s: need %s; free %s (%s)", device, plan.describe(),
                _gb(plan.available_bytes), plan.available_source)
    if plan.fits:
        return plan
    tensors = checkpoint_tensors(checkpoint)
    alternatives: dict[str, int] = {}
    if device.startswith("cuda"):
        if quantize != "8bit":
            alternatives["--quantize 8bit"] = weights_bytes(tensors, 2, "8bit")
        if quantize != "4bit":
            alternatives["--quantize 4bit"] = weights_bytes(tensors, 2, "4bit")
    else:
        if plan.dtype == "float32" and quantize == "none":
            alternatives["--dtype bf16 (slow matrix products on CPUs without bf16 units)"] = weights_bytes(tensors, 2, "none")
        if quantize != "int8":
            alternatives["--quantize int8 (torch dynamic int8, the CPU default)"] = weights_bytes(tensors, 4, "int8")
    raise InsufficientMemoryError(
        f"not enough memory to load {Path(checkpoint).name} on {device}: it needs about {_gb(plan.need_bytes)} "
        f"({plan.describe()}), but only {_gb(plan.available_bytes)} is free ({plan.available_source}). "
        f"Options: " + "; ".join(_options(plan, alternatives)) + ".")


def kv_report(engine: Any) -> dict:
    """KV-cache figures of a loaded engine for ``/v1/health``: the budget in bytes and in tokens
    at the loaded model's real per-token size (its layers, KV heads, head size and dtype)."""
    try:
        model = engine.model
        llm_cfg = model.config.llm_config
        dtype_bytes = next(p for p in model.llm.parameters() if p.dtype.is_floating_point).element_size()
        per_token = kv_bytes_per_token(llm_cfg, dtype_bytes)
        budget = int(getattr(engine, "kv_cache_bytes", 0) or getattr(getattr(engine, "kv", None), "capacity", 0) or 0)
    except (AttributeError, StopIteration, TypeError, KeyError):
        return {}
    out = {"kv_bytes_per_token": per_token}
    if budget:
        out.update(kv_budget_bytes=budget, kv_budget_tokens=budget // per_token)
    return out
