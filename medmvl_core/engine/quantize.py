"""Quantized LLM weights: bitsandbytes 8-bit / 4-bit for GPUs with little memory, and int8 for
CPUs (``"int8"``, the CPU default: see docs/full-size-models.md).

``"int8"`` replaces every ``nn.Linear`` of the LLM's decoder layers, and the LM head, with int8
weights and one scale per output row. How it computes follows the model's dtype:

* bfloat16 (the CPU default where the CPU has bf16 units): :class:`Int8WeightOnlyLinear`, int8
  weights read by ATen's weight-only kernel (``_weight_int8pack_mm``, bf16 activations) for a
  few rows (decoding: memory-bound, so half the bytes of bf16 is about twice the speed), and for
  many rows (prefill) the int8 weight widened into a reused bf16 buffer and multiplied as bf16
  (compute-bound: the CPU's bf16 matrix units), the scales applied to the output.
* float32: ``torch.ao.nn.quantized.dynamic.Linear`` (activations quantized per call,
  fbgemm/oneDNN int8 matrix products, float32 in and out), for CPUs without bf16 units.

The embeddings, norms and the vision side stay in the model's dtype. During loading
:class:`Int8Filler` quantizes each layer as soon as its float weights have been read, so the
float model never exists as a whole.

``quantize_model(model, "8bit" | "4bit" | "none")`` replaces every ``nn.Linear`` of the LLM's
decoder layers with a bitsandbytes ``Linear8bitLt`` (LLM.int8, threshold 6.0) or ``Linear4bit``
(NF4, double quantization, compute in the model's float dtype). The embeddings, the LM head and
the vision encoder/connector stay in their float dtype (they are a small part of the weights and
the most sensitive to rounding). Works on CUDA and, with bitsandbytes >= 0.45's CPU backend, on
CPU (slow; for tests). The model is modified in place and returned.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any

import torch
from torch import nn

from medmvl_core.errors import MedMVLError

logger = logging.getLogger(__name__)

QUANT_MODES = ("none", "8bit", "4bit", "int8")
#: int8 weights with one scale per output row (accuracy) rather than one per matrix
INT8_PER_CHANNEL = True


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
    if mode == "int8":
        if device is not None and torch.device(device).type != "cpu":
            raise QuantizationError("--quantize int8 (torch dynamic int8) runs on the CPU only; on a GPU use "
                                    "--quantize 8bit or 4bit")
        return quantize_int8(model)
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


# --------------------------------------------------------------------------- CPU int8
#: at most this many rows (tokens) go through the weight-only int8 kernel; more rows widen the
#: weight to bf16 and use the bf16 matrix product (measured crossover on a 2-core AVX-512 CPU: 8-16)
WO_MAX_ROWS = 8
_scratch = threading.local()


def _widen_buffer(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer of ``shape`` reused across layers and calls: widening into it costs
    one pass over the weight, a fresh tensor per call costs page faults (about 4x slower)."""
    buf = getattr(_scratch, "buf", None)
    n = shape[0] * shape[1]
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = _scratch.buf = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def row_scales(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 scales, one per output row of ``w`` [out, in] (float32 [out]); computed in
    blocks of rows so that no full-size temporary of a large matrix (the LM head) is made."""
    amax = torch.cat([blk.abs().amax(dim=1).float() for blk in w.split(4096, dim=0)])
    return (amax / 127.0).clamp(min=1e-12)


class Int8WeightOnlyLinear(nn.Module):
    """``y = x W^T + b`` with W stored as int8 [out, in] and one scale per output row; x and y in
    ``compute_dtype`` (bf16). Inference only."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(compute_dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(compute_dtype))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None,
                   compute_dtype: torch.dtype = torch.bfloat16) -> "Int8WeightOnlyLinear":
        w = weight.detach()
        # quantize against the scales as stored (rounded to the compute dtype), so that q * scale
        # is the nearest int8 multiple of the scale the kernels use
        scales = row_scales(w).to(compute_dtype).float()
        q = torch.empty(w.shape, dtype=torch.int8)
        # in blocks of rows: no full-size float temporary of a large matrix
        for rows, blk, s in zip(q.split(4096, dim=0), w.split(4096, dim=0), scales.split(4096)):
            rows.copy_(torch.round(blk.float() / s[:, None]).clamp_(-127, 127))
        return cls(q, scales, bias, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.scales.dtype)
        if x2.shape[0] <= WO_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scales)
        else:
            w = _widen_buffer(self.qweight.shape, x2.dtype)
            w.copy_(self.qweight)  # exact: |q| <= 127 is representable in bf16
            y = torch.mm(x2, w.t()).mul_(self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def int8_linear(weight: torch.Tensor, bias: torch.Tensor | None,
                compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """An int8 ``Linear`` from a float weight [out, in] and an optional bias [out]: weight-only
    int8 computing in ``compute_dtype`` when it is bf16 / fp16, otherwise torch's dynamic int8
    (symmetric, one scale per output row when ``INT8_PER_CHANNEL``; bias kept float32)."""
    if compute_dtype in (torch.bfloat16, torch.float16):
        return Int8WeightOnlyLinear.from_float(weight, bias, compute_dtype)
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    w = weight.detach().to(torch.float32)
    out_f, in_f = w.shape
    if INT8_PER_CHANNEL:
        scales = row_scales(w).to(torch.float64)
        qw = torch.quantize_per_channel(w, scales, torch.zeros(out_f, dtype=torch.long), 0, torch.qint8)
    else:
        qw = torch.quantize_per_tensor(w, max(float(w.abs().max()) / 127.0, 1e-12), 0, torch.qint8)
    # built 1x1 and then given the real weight: the full-size zero weight the constructor would
    # quantize and pack first is never made (0.3 GB for the LM head)
    q = DynamicLinear(1, 1, bias_=bias is not None, dtype=torch.qint8)
    q.set_weight_bias(qw, None if bias is None else bias.detach().to(torch.float32))
    q.in_features, q.out_features = in_f, out_f
    return q


def _int8_targets(model: Any) -> dict[str, nn.Module]:
    """{state-dict prefix: nn.Linear} of the LLM's decoder layers (the LM head separately)."""
    llm = getattr(model, "llm", model)
    base = getattr(llm, "model", llm)
    pre = "llm.model." if hasattr(model, "llm") else "model."
    return {pre + n: m for n, m in base.named_modules() if isinstance(m, nn.Linear)}


def _set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def quantize_int8_head(model: Any) -> None:
    """Quantize the LM head (a copy of the tied embeddings, which stay float for the input side)."""
    llm = getattr(model, "llm", model)
    head = llm.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return
    llm.lm_head = int8_linear(head.weight, head.bias, head.weight.dtype)
    # the head is no longer the embedding matrix: never re-tie it (save/reload would break it)
    llm.config.tie_word_embeddings = False
    if hasattr(model, "config") and hasattr(model.config, "llm_config"):
        model.config.llm_config.tie_word_embeddings = False
        model.config.tie_word_embeddings = False
    llm.config.medmvl_quantization = "int8"


def quantize_int8(model: Any) -> Any:
    """Quantize a loaded float model's LLM linear layers (and LM head) to dynamic int8 in place,
    one layer at a time; returns ``model``. Loading with ``quantize="int8"`` does this while
    reading the weights instead, so the float32 model is never held whole."""
    targets = _int8_targets(model)
    if not targets:
        raise QuantizationError("the LLM has no nn.Linear layers to quantize (already quantized?)")
    for prefix, lin in targets.items():
        _set_module(model, prefix, int8_linear(lin.weight, lin.bias, lin.weight.dtype))
    quantize_int8_head(model)
    logger.info("quantized %d LLM linear layers and the LM head to int8 (%s)", len(targets), int8_kind(model))
    return model


def int8_kind(model: Any) -> str:
    """"weight-only" (bf16 compute), "dynamic" (float32) or "none": how the model's int8 layers compute."""
    for m in model.modules():
        if isinstance(m, Int8WeightOnlyLinear):
            return "weight-only"
        if hasattr(m, "_packed_params"):
            return "dynamic"
    return "none"


class Int8Filler:
    """Takes the LLM linear weights during a streaming load and swaps each ``nn.Linear`` for its
    int8 version as soon as all of its tensors (weight, bias) have arrived."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.targets = _int8_targets(model)
        self.parts: dict[str, dict[str, torch.Tensor]] = {}

    def take(self, name: str, tensor: torch.Tensor) -> bool:
        """True when ``name`` belongs to a target layer (kept until the layer is complete)."""
        prefix, _, attr = name.rpartition(".")
        lin = self.targets.get(prefix)
        if lin is None or attr not in ("weight", "bias"):
            return False
        got = self.parts.setdefault(prefix, {})
        got[attr] = tensor
        if "weight" in got and ("bias" in got or lin.bias is None):
            # the tensors arrive in the load dtype, which is the dtype the layer computes in
            _set_module(self.model, prefix, int8_linear(got["weight"], got.get("bias"), got["weight"].dtype))
            del self.parts[prefix], self.targets[prefix]
        return True

