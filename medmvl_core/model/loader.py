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


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``."""
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not (folder / shard).is_file():
                raise CheckpointError(f"shard {shard} listed in {index} is missing; re-download the checkpoint")
            state.update(load_file(str(folder / shard)))
        return state
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(
            f"{folder} has only pickle weights (*.bin/*.pt); this project loads safetensors only. "
            "Convert them with transformers' save_pretrained(safe_serialization=True) on a trusted machine"
        )
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {folder}")


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

    for d in dirs:
        if any((d / f).is_file() for f in _TOKENIZER_FILES):
            tok = AutoTokenizer.from_pretrained(str(d), model_max_length=max_length, padding_side=padding_side)
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


def build_from_state(config: MedMVLConfig, state: dict[str, torch.Tensor], tie_policy: str) -> MedMVLForConditionalGeneration:
    """Build the model without random init and load ``state`` (MedM-VL key names) into it."""
    from transformers.modeling_utils import no_init_weights

    has_head = "llm.lm_head.weight" in state
    if not has_head:
        if tie_policy == "untied":
            logger.warning("the checkpoint stores no llm.lm_head.weight; tying it to the input embeddings "
                           "(MedM-VL would leave a random head here)")
        config.llm_config.tie_word_embeddings = True
        config.tie_word_embeddings = True
    elif tie_policy == "untied":
        config.llm_config.tie_word_embeddings = False
        config.tie_word_embeddings = False
    unused = [k for k in state if k.startswith(UNUSED_PREFIXES)]
    for k in unused:
        del state[k]
    if unused:
        logger.info("ignored %d weights of the 3D CLIP text tower", len(unused))
    with no_init_weights():
        model = MedMVLForConditionalGeneration(config)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (k == "llm.lm_head.weight" and not has_head)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"the weights do not match the config: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}; "
            "the base-model configs (presets or local folders) must be the ones the checkpoint was trained with"
        )
    model.tie_weights()
    return model


def load_medmvl_folder(path: Path) -> tuple[MedMVLForConditionalGeneration, ImportedConfig]:
    """Load a MedM-VL (HEAD or v1) checkpoint folder into our model class, float32 on the CPU."""
    raw = json.loads((path / "config.json").read_text())
    imported = import_config(raw, path)
    _fix_attn(imported.config, "cpu")
    model = build_from_state(imported.config, read_safetensors_folder(path), imported.tie_policy)
    return model, imported


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
                             dtype: torch.dtype | str | None = None) -> tuple[MedMVLForConditionalGeneration, Any]:
    """Like :func:`load_checkpoint` but returns ``(model, tokenizer)``."""
    path = Path(path)
    check_checkpoint_folder(path)
    _check_device(device)
    cfg_file = path / "config.json"
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or _default_dtype(device)
    fmt = detect_format(json.loads(cfg_file.read_text()))
    if fmt == "medmvl":
        config = MedMVLConfig.from_pretrained(str(path))
        _fix_attn(config, device)
        model = MedMVLForConditionalGeneration.from_pretrained(str(path), config=config, dtype=dtype)
        tok_dirs = [path]
    else:
        model, imported = load_medmvl_folder(path)
        tok_dirs = imported.tokenizer_dirs
    model = model.to(device=device, dtype=dtype).eval()
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
                    dtype: torch.dtype | str | None = None) -> tuple[MedMVLForConditionalGeneration, Any]:
    """Load a checkpoint folder and return ``(model, processor)`` in eval mode.

    ``path``: our format, or a MedM-VL folder (HEAD ``lvlm_*`` or v1.0 schema), auto-detected.
    ``dtype``: default float32 on CPU, bfloat16 on a GPU that supports it.
    Works offline: base models come from local folders, the HF cache or shipped presets.
    """
    model, tokenizer = load_model_and_tokenizer(path, device=device, dtype=dtype)
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
