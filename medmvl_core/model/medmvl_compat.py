"""Read MedM-VL checkpoint configs (HEAD ``lvlm_*`` schema and the v1.0 schema) into ``MedMVLConfig``.

Behaviour reproduced on purpose (see Testing/data/medmvl_reference/README.md, "Surprises"):

- HEAD reloads leave ``lm_head`` untied (tie only if the weights have no ``lm_head``); v1 keeps the tie.
- HEAD runs the LLM with ``sdpa`` whatever the config says; v1 runs the configured implementation.
- HEAD ``attn_pooling`` has ``(image_size // patch_size) ** 2`` queries; v1 has 256.
- A volume with no 3D encoder goes through the 2D encoder per slice and all slice tokens are
  concatenated before the connector (HEAD and v1.0 alike; verified on the fixture).
- ``cache_dir_hf`` (v1) points at the training machine and is ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from medmvl_core.errors import CheckpointError
from medmvl_core.model.configuration import MedMVLConfig
from medmvl_core.model.presets import BaseModel, resolve_base

logger = logging.getLogger(__name__)

TEMPLATE_FOR_LLM = {"qwen2": "qwen2", "llama": "llama", "llama3": "llama3", "phi": "phi", "phi3": "phi3"}
_MODEL_TYPE_FOR_LLM = {"llama3": "llama"}
V1_ATTN_POOLING_QUERIES = 256
MEDMVL_SLICES = 32


@dataclass
class ImportedConfig:
    """A MedM-VL config translated to ours, plus what loading still needs."""

    config: MedMVLConfig
    schema: str  # "lvlm_head" | "lvlm_v1"
    tokenizer_dirs: list[Path]  # where to look for the tokenizer, in order
    tie_policy: str  # "untied" (HEAD) | "tied" (v1)


def detect_format(raw: dict) -> str:
    """``"medmvl"`` (ours), ``"lvlm_head"`` or ``"lvlm_v1"``; raises ``CheckpointError`` otherwise."""
    if raw.get("model_type") == "medmvl":
        return "medmvl"
    if raw.get("model_type") == "lvlm" or any(k.startswith("lvlm_") for k in raw):
        return "lvlm_head"
    if "llm_type" in raw and ("llm_config" in raw or "encoder_image_type" in raw or "encoder_image3d_type" in raw):
        return "lvlm_v1"
    raise CheckpointError(
        "config.json is neither a medmvl checkpoint (model_type 'medmvl') nor a MedM-VL one "
        "(model_type 'lvlm' with lvlm_* fields, or the v1.0 fields llm_type/llm_config); "
        "point at the folder that holds the model's config.json and model.safetensors"
    )


def _vision_config(cfg: dict) -> dict:
    """The vision tower's config dict (``vision_config`` of a full CLIP/SigLIP config, else ``cfg``)."""
    cfg = dict(cfg)
    if isinstance(cfg.get("vision_config"), dict):  # a full CLIP/SigLIP config
        vis = dict(cfg["vision_config"])
        vis.setdefault("model_type", cfg.get("model_type", "") + "_vision_model")
        return vis
    return cfg


vision_tower_config = _vision_config  # public name (training/build.py uses it too)


def _image_normalize(enc_type: str, vis_cfg: dict, pre: dict | None) -> dict:
    """The ``normalize`` block of a preprocessing spec, from the tower's image processor config
    (or, without one, the defaults of that tower type at its configured image size)."""
    from medmvl_core.imaging.spec import (
        CLIP_MEAN_STD,
        SIGLIP_MEAN_STD,
        image_processor_normalize,
        normalize_from_processor_config,
    )

    if pre:
        return normalize_from_processor_config(pre)[1]
    size = int(vis_cfg.get("image_size", 224))
    if enc_type == "clip":
        return image_processor_normalize(size, *CLIP_MEAN_STD, crop_size=size)
    return image_processor_normalize(size, *SIGLIP_MEAN_STD)


def image_spec(enc_type: str, vis_cfg: dict, pre: dict | None) -> dict:
    """Preprocessing spec for 2D images through a CLIP/SigLIP tower."""
    return {"kind": "image", "normalize": _image_normalize(enc_type, vis_cfg, pre)}


def volume_spec_2d_encoder(enc_type: str, vis_cfg: dict, pre: dict | None, schema: str) -> dict:
    """Spec for a CT through a 2D tower per slice (MedM-VL-CT-Chest): HU window [-1000, 1000],
    CropForeground, Resize to [32, S, S], uint8 truncation, 3 channels, the tower's normalisation."""
    norm = _image_normalize(enc_type, vis_cfg, pre)
    s = int(norm.get("crop_size") or norm["image_size"])
    head = {"kind": "volume", "hu_window": [-1000, 1000], "crop_foreground": True, "size": [MEDMVL_SLICES, s, s],
            "cast_uint8": True, "channels": 3, "orientation": "native", "normalize": norm}
    if schema == "lvlm_v1":  # v1 expects npy already windowed, cropped and resized to [1, 32, S, S]
        # by the same window / crop / resize as HEAD's eval path; a raw scan goes through that
        return {"kind": "volume_preprocessed", "size": [MEDMVL_SLICES, s, s], "cast_uint8": True,
                "channels": 3, "orientation": "native", "normalize": norm, "raw": head}
    return head


def volume_spec_3d_encoder(enc_type: str, enc_cfg: dict, schema: str = "lvlm_head") -> dict:
    """Spec for a CT through M3D-CLIP or MedM-CLIP (``medmvl_core.imaging.spec.default_spec``,
    at the encoder's configured size; v1.0 M3D-CLIP data is already preprocessed)."""
    from medmvl_core.imaging.spec import default_spec

    if enc_type == "convvit3d":  # trained here, always with an explicit spec; this is the fallback
        return {"kind": "volume", "hu_window": [-1000, 1000], "crop_foreground": False,
                "size": [int(v) for v in enc_cfg["img_size"]], "orientation": "LPS", "cast_uint8": False,
                "channels": 1, "normalize": {"type": "minmax"}}
    if enc_type == "m3dclip":
        size = [int(v) for v in enc_cfg.get("img_size", [32, 256, 256])]
        if schema == "lvlm_v1":  # M3D's own preprocessed npy; a raw scan gets M3D-CLIP's pipeline
            raw = default_spec(enc_type, size[-1], depth=size[0], orientation="native")
            raw["size"] = size
            return {"kind": "volume_preprocessed", "cast_uint8": False, "channels": 1, "orientation": "native",
                    "normalize": {"type": "none"}, "size": size, "raw": raw}
    else:
        img = enc_cfg.get("image_size", 256)
        img = int(img[-1] if isinstance(img, list) else img)
        size = [int(enc_cfg.get("frame_size", 32)), img, img]
    spec = default_spec(enc_type, size[-1], depth=size[0], orientation="native")
    spec["size"] = size
    return spec


def _encoder_spec(enc_type: str, vis_cfg: dict, layer, feature) -> dict:
    # MedM-VL after reload runs every vision tower with transformers' default for 4.42: eager
    return {"type": enc_type, "select_layer": int(layer if layer is not None else -1),
            "select_feature": feature or "patch", "config": vis_cfg, "attn_implementation": "eager"}


def _connector_spec(con_type: str, name: str, vis_cfg: dict, schema: str) -> dict:
    spec = {"type": con_type, "name": name}
    if con_type == "attn_pooling":
        spec["num_heads"] = 8
        if schema == "lvlm_v1":
            spec["num_queries"] = V1_ATTN_POOLING_QUERIES
        else:
            img, patch = vis_cfg.get("image_size"), vis_cfg.get("patch_size")
            if isinstance(img, int) and isinstance(patch, int):
                spec["num_queries"] = (img // patch) ** 2
    return spec


def _fields(raw: dict, schema: str) -> dict:
    """The MedM-VL fields without their schema prefix."""
    if schema == "lvlm_head":
        return {k[len("lvlm_"):]: v for k, v in raw.items() if k.startswith("lvlm_")}
    return dict(raw)


def _resolve(name: str | None, ckpt: Path, what: str) -> BaseModel:
    if not name:
        raise CheckpointError(f"the checkpoint config names no {what}; it cannot be rebuilt")
    return resolve_base(name, ckpt, what)


def import_config(raw: dict, checkpoint_dir: str | Path) -> ImportedConfig:
    """Translate a MedM-VL ``config.json`` dict into a ``MedMVLConfig`` (offline)."""
    ckpt = Path(checkpoint_dir).resolve()
    schema = detect_format(raw)
    if schema == "medmvl":
        raise CheckpointError("import_config is for MedM-VL configs; this is already a medmvl config")
    f = _fields(raw, schema)
    if f.get("cache_dir_hf"):
        logger.info("ignoring cache_dir_hf=%r from the checkpoint config", f["cache_dir_hf"])
    llm_type = f.get("llm_type")
    source = {"format": schema, "llm_type": llm_type, "bases": {}}
    tokenizer_dirs: list[Path] = []

    # LLM
    if schema == "lvlm_v1" and isinstance(f.get("llm_config"), dict):
        llm_cfg = dict(f["llm_config"])
    else:
        base = _resolve(f.get("llm_name_or_path"), ckpt, "base LLM")
        llm_cfg = dict(base.config)
        if base.folder is not None:
            tokenizer_dirs.append(base.folder)
    source["bases"]["llm"] = f.get("llm_name_or_path")
    if schema == "lvlm_v1" and f.get("llm_name_or_path"):
        try:  # v1 also reloads the tokenizer from the base LLM when it is there
            base = resolve_base(f["llm_name_or_path"], ckpt, "base LLM")
            if base.folder is not None:
                tokenizer_dirs.append(base.folder)
        except Exception:  # the nested llm_config is enough for the model
            pass
    tokenizer_dirs.append(ckpt)
    llm_cfg["model_type"] = llm_cfg.get("model_type") or _MODEL_TYPE_FOR_LLM.get(llm_type, llm_type)
    for k in ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype", "_attn_implementation"):
        llm_cfg.pop(k, None)
    tie_policy = "tied" if schema == "lvlm_v1" else "untied"
    llm_cfg["tie_word_embeddings"] = bool(llm_cfg.get("tie_word_embeddings", False)) and tie_policy == "tied"

    kw: dict = {}
    preprocessing: dict = {}
    for kind in ("image", "image3d"):
        enc_type = f.get(f"encoder_{kind}_type")
        if not enc_type:
            continue
        nested = f.get(f"encoder_{kind}_config") if schema == "lvlm_v1" else None
        pre = None
        if isinstance(nested, dict):
            enc_cfg = _vision_config(nested)
            try:
                base = resolve_base(f.get(f"encoder_{kind}_name_or_path") or "", ckpt, f"{kind} encoder")
                pre = base.preprocessor_config
            except Exception:
                logger.info("no preprocessor config for the %s encoder; using %s defaults", kind, enc_type)
        else:
            base = _resolve(f.get(f"encoder_{kind}_name_or_path"), ckpt, f"{kind} encoder")
            enc_cfg, pre = _vision_config(base.config), base.preprocessor_config
        for k in ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype"):
            enc_cfg.pop(k, None)
        source["bases"][f"encoder_{kind}"] = f.get(f"encoder_{kind}_name_or_path")
        kw[f"encoder_{kind}"] = _encoder_spec(enc_type, enc_cfg, f.get(f"encoder_{kind}_select_layer"),
                                              f.get(f"encoder_{kind}_select_feature"))
        kw[f"connector_{kind}"] = _connector_spec(f.get(f"connector_{kind}_type") or "mlp",
                                                  f.get(f"connector_{kind}_name") or "mlp2x_gelu", enc_cfg, schema)
        if kind == "image":
            preprocessing["image"] = image_spec(enc_type, enc_cfg, pre)
            if not f.get("encoder_image3d_type"):
                preprocessing["image3d"] = volume_spec_2d_encoder(enc_type, enc_cfg, pre, schema)
        else:
            preprocessing["image3d"] = volume_spec_3d_encoder(enc_type, enc_cfg, schema)

    config = MedMVLConfig(
        llm_config=llm_cfg,
        template=TEMPLATE_FOR_LLM.get(llm_type, llm_type or "qwen2"),
        preprocessing=preprocessing,
        padding_side=f.get("llm_padding_side") or "right",
        max_length=int(f.get("llm_max_length") or 2048),
        llm_attn_implementation="sdpa" if schema == "lvlm_head" else (f.get("llm_attn_implementation") or "eager"),
        image3d_slice_fusion="concat",
        source=source,
        **kw,
    )
    return ImportedConfig(config=config, schema=schema, tokenizer_dirs=tokenizer_dirs, tie_policy=tie_policy)
