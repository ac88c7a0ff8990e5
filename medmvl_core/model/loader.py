"""``load_checkpoint``: our format or a MedM-VL folder (HEAD or v1.0 schema), auto-detected, offline."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from medmvl_core.docs_links import CHECKPOINTS, DEVICES, see
from medmvl_core.errors import CheckpointError, ConfigError
from medmvl_core.model.configuration import MedMVLConfig
from medmvl_core.model.medmvl_compat import ImportedConfig, detect_format, import_config
from medmvl_core.model.modeling import MedMVLForConditionalGeneration

logger = logging.getLogger(__name__)

# Weights MedM-VL keeps for 3D CLIP models but never uses for the LLM (text towers, CLIP heads).
UNUSED_PREFIXES = (
    "encoder_image3d.encoder.language_encoder.",
    "encoder_image3d.encoder.text_encoder.",
    "encoder_image3d.encoder.mm_vision_proj.",
    "encoder_image3d.encoder.mm_language_proj.",
    "encoder_image3d.encoder.logit_scale",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _default_dtype(device: str | torch.device) -> torch.dtype:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _fix_attn(config: MedMVLConfig, device: str | torch.device) -> None:
    if config.llm_attn_implementation == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401

            ok = torch.device(device).type == "cuda"
        except ImportError:
            ok = False
        if not ok:
            logger.info("flash_attention_2 is not available here; using sdpa (same results up to rounding)")
            config.llm_attn_implementation = "sdpa"


def _load_tokenizer(dirs: list[Path], max_length: int, padding_side: str):
    from transformers import AutoTokenizer

    from transformers import PreTrainedTokenizerBase

    extra = {}
    if hasattr(PreTrainedTokenizerBase, "_patch_mistral_regex"):
        # transformers 4.57+ takes a local folder whose config.json has no model_type (MedM-VL's) for a
        # Mistral tokenizer with a known-bad regex and warns; MedM-VL's tokenizers are Qwen / Llama ones
        extra["fix_mistral_regex"] = False
    for d in dirs:
        if any((d / f).is_file() for f in _TOKENIZER_FILES):
            tok = AutoTokenizer.from_pretrained(str(d), model_max_length=max_length, padding_side=padding_side, **extra)
            tok.init_kwargs.pop("fix_mistral_regex", None)  # not written into a saved tokenizer_config.json
            logger.info("tokenizer from %s (%s)", d, type(tok).__name__)
            return tok
    raise CheckpointError(
        f"no tokenizer found in {[str(d) for d in dirs]}; copy the tokenizer files (tokenizer_config.json, "
        "vocab.json/merges.txt or tokenizer.json) into the checkpoint folder"
    )


def make_processor(model: MedMVLForConditionalGeneration, tokenizer: Any) -> Any:
    """The ``MedMVLProcessor`` for ``model``: its template, image-token counts, preprocessing,
    padding side and maximum length, with ``tokenizer``."""
    from medmvl_core.processing import MedMVLProcessor

    from medmvl_core.model.box_refs import add_box_ref_tokens

    cfg = model.config
    add_box_ref_tokens(tokenizer, getattr(cfg, "box_refs", None), cfg.llm_config.vocab_size)
    counts = {}
    for kind in ("image", "image3d"):
        try:
            counts[kind] = model.num_image_tokens(kind)
        except ConfigError:  # the model does not take this kind
            pass
    return MedMVLProcessor(tokenizer, template=cfg.template, num_image_tokens=counts,
                           preprocessing=cfg.preprocessing, padding_side=cfg.padding_side, max_length=cfg.model_max_length)


#: state-dict prefixes of the vision encoders (``vision_dtype``)
VISION_PREFIXES = ("encoder_image.", "encoder_image3d.")


def load_medmvl_folder(path: Path, dtype: torch.dtype = torch.float32, quantize: str = "none",
                       vision_dtype: torch.dtype | None = None) -> tuple[MedMVLForConditionalGeneration, ImportedConfig]:
    """Load a MedM-VL (HEAD or v1) checkpoint folder into our model class on the CPU, reading the
    weights tensor by tensor straight into ``dtype`` (the vision encoders into ``vision_dtype``
    when given; peak memory: the model plus one tensor); ``quantize="int8"`` quantizes the LLM's
    linear layers as they are read."""
    from transformers.modeling_utils import no_init_weights

    from medmvl_core.model.stream_load import shard_files, stream_into

    raw = json.loads((path / "config.json").read_text())
    imported = import_config(raw, path)
    config = imported.config
    _fix_attn(config, "cpu")
    files = shard_files(path)
    has_head = any("llm.lm_head.weight" in _names(f) for f in files)
    _tie_config(config, has_head, imported.tie_policy)
    with no_init_weights():  # never touched, so the skeleton's memory is never committed
        model = MedMVLForConditionalGeneration(config)
    optional = ("llm.lm_head.weight",) if not has_head else ()
    dtype_for = dtype if vision_dtype is None else (
        lambda name: vision_dtype if name.startswith(VISION_PREFIXES) else dtype)
    stream_into(model, files, dtype_for, skip_prefixes=UNUSED_PREFIXES, quantize=quantize, optional=optional)
    model.tie_weights()
    if quantize == "int8":
        from medmvl_core.engine.quantize import quantize_int8_head

        quantize_int8_head(model)
    return model, imported


def _names(file: Path) -> set[str]:
    import struct

    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return set(json.loads(fh.read(n)))


def _tie_config(config: MedMVLConfig, has_head: bool, tie_policy: str) -> None:
    """MedM-VL's tie rules: a stored head is used as is when the policy is "untied" (HEAD); a
    missing head is tied to the embeddings."""
    if not has_head:
        if tie_policy == "untied":
            logger.warning("the checkpoint stores no llm.lm_head.weight; tying it to the input embeddings "
                           "(MedM-VL would leave a random head here)")
        config.llm_config.tie_word_embeddings = True
        config.tie_word_embeddings = True
    elif tie_policy == "untied":
        config.llm_config.tie_word_embeddings = False
        config.tie_word_embeddings = False


def check_checkpoint_folder(path: str | Path) -> None:
    """Raise :class:`CheckpointError` saying what is wrong when ``path`` is not a checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint folder {path} does not exist; give a model folder such as "
                              f"Resources/demo_model or one written by `medmvl download` ({see(CHECKPOINTS)})")
    if not (path / "config.json").is_file():
        hint = " (it is a file: give the folder that holds it)" if path.is_file() else ""
        raise CheckpointError(f"{path} has no config.json, so it is not a checkpoint folder{hint}; give the folder "
                              f"that holds config.json and the weights, e.g. Resources/demo_model, one written by "
                              f"`medmvl download` or a training run's final/ ({see(CHECKPOINTS)})")


def _check_device(device: str | torch.device) -> None:
    """A CUDA device on a machine without one is a setup problem: say so instead of torch's assertion."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} was asked for but no CUDA GPU is visible to torch "
                          f"(torch {torch.__version__}); use device 'cpu' or 'auto', or install the CUDA build "
                          f"of torch ({see(DEVICES)})")


def load_model_and_tokenizer(path: str | Path, device: str | torch.device = "cpu",
                             dtype: torch.dtype | str | None = None, quantize: str = "none",
                             vision_dtype: torch.dtype | None = None) -> tuple[MedMVLForConditionalGeneration, Any]:
    """Like :func:`load_checkpoint` but returns ``(model, tokenizer)``."""
    path = Path(path)
    check_checkpoint_folder(path)
    _check_device(device)
    cfg_file = path / "config.json"
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or _default_dtype(device)
    if quantize == "int8" and dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"--quantize int8 (CPU) computes in bf16 (weight-only int8) or float32 (dynamic int8), "
                          f"not {dtype}; use --dtype bf16 or fp32, or leave --dtype out")
    fmt = detect_format(json.loads(cfg_file.read_text()))
    if fmt == "medmvl":
        config = MedMVLConfig.from_pretrained(str(path))
        _fix_attn(config, device)
        model = MedMVLForConditionalGeneration.from_pretrained(str(path), config=config, dtype=dtype)
        tok_dirs = [path]
        if quantize == "int8":
            from medmvl_core.engine.quantize import quantize_int8

            model = quantize_int8(model)
    else:
        model, imported = load_medmvl_folder(path, dtype=dtype, quantize="int8" if quantize == "int8" else "none",
                                             vision_dtype=vision_dtype)
        tok_dirs = imported.tokenizer_dirs
    if quantize in ("8bit", "4bit"):
        from medmvl_core.engine.quantize import quantize_model

        model = quantize_model(model, quantize, device=device)
    model = model.to(device=device, dtype=dtype).eval() if quantize == "none" else model.to(device).eval()
    if vision_dtype is not None:  # our own format loads whole; a MedM-VL folder was read so already
        for prefix in VISION_PREFIXES:
            if getattr(model, prefix.rstrip("."), None) is not None:
                getattr(model, prefix.rstrip(".")).to(vision_dtype)
    tokenizer = _load_tokenizer(tok_dirs, model.config.model_max_length, model.config.padding_side)
    if fmt != "medmvl":
        _medmvl_pad_rules(tokenizer, model.config.source.get("llm_type"))
    _generation_defaults(model, tokenizer)
    return model, tokenizer


def _generation_defaults(model: MedMVLForConditionalGeneration, tokenizer: Any) -> None:
    """Stop at the tokenizer's eos and pad with its pad, as MedM-VL's inference.py passes them."""
    gen = model.llm.generation_config
    if tokenizer.eos_token_id is not None:
        gen.eos_token_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id


def _medmvl_pad_rules(tokenizer: Any, llm_type: str | None) -> None:
    """MedM-VL's loaders set the pad token per LLM type (Llama-3: eos, Phi-2: unk)."""
    try:
        from medmvl_core.processing import apply_medmvl_tokenizer_rules
    except ImportError:  # processing package not there: keep the tokenizer's own pad
        return
    if llm_type:
        apply_medmvl_tokenizer_rules(tokenizer, llm_type)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | str | None = None, quantize: str = "none",
                    vision_dtype: torch.dtype | None = None) -> tuple[MedMVLForConditionalGeneration, Any]:
    """Load a checkpoint folder and return ``(model, processor)`` in eval mode.

    ``path``: our format, or a MedM-VL folder (HEAD ``lvlm_*`` or v1.0 schema), auto-detected.
    ``dtype``: default float32 on CPU, bfloat16 on a GPU that supports it.
    ``quantize``: "none", "int8" (CPU: torch dynamic int8 with float32, weight-only int8 with bf16),
    "8bit" / "4bit" (bitsandbytes). ``vision_dtype``: the vision encoders' dtype when it differs
    (bf16 vision with an int8 LLM on a CPU; read so, never held in ``dtype``).
    Works offline: base models come from local folders, the HF cache or shipped presets.
    """
    model, tokenizer = load_model_and_tokenizer(path, device=device, dtype=dtype, quantize=quantize,
                                                vision_dtype=vision_dtype)
    return model, make_processor(model, tokenizer)


def save_checkpoint(model: MedMVLForConditionalGeneration, tokenizer_or_processor: Any, out_dir: str | Path,
                    max_shard_size: str | int = "5GB") -> Path:
    """Write our self-contained folder: config.json, safetensors (sharded + index when large),
    tokenizer files and, when a processor is given, its config."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)
    if tokenizer_or_processor is not None:
        tokenizer_or_processor.save_pretrained(str(out))
        tok = getattr(tokenizer_or_processor, "tokenizer", None)
        if tok is not None and not any((out / f).is_file() for f in _TOKENIZER_FILES):
            tok.save_pretrained(str(out))
    return out
