"""Build the model and processor a run starts from: a checkpoint (``init_from``) or parts.

Parts: the LLM, encoders and connectors each come from a local HF folder (config + weights),
a shipped preset (architecture only, random init) or a raw config dict (from scratch).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from medmvl_core.errors import CheckpointError, ConfigError
from training.config import ComponentConfig, RunConfig, resolve_attn_implementation

logger = logging.getLogger(__name__)


def _component_config(comp: ComponentConfig, cfg: RunConfig, what: str) -> tuple[dict, Optional[dict], Optional[Path]]:
    """(config dict, preprocessor config or None, weights folder or None) of one part."""
    if comp.path is not None:
        folder = cfg.resolve_path(comp.path)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.{what}.path: {folder} has no config.json; give a local HF model folder "
                              "(nothing is downloaded), or use preset:/config: instead")
        conf = json.loads((folder / "config.json").read_text())
        pre = folder / "preprocessor_config.json"
        return conf, (json.loads(pre.read_text()) if pre.is_file() else None), folder
    if comp.preset is not None:
        from medmvl_core.model.presets import get_preset, list_presets

        preset = get_preset(comp.preset)
        if preset is None:
            raise ConfigError(f"model.{what}.preset: {comp.preset!r} is not a shipped preset; "
                              f"valid: {', '.join(list_presets())}")
        return dict(preset["config"]), preset.get("preprocessor_config"), None
    if comp.config is not None:
        return dict(comp.config), None, None
    raise ConfigError(f"model.{what}: give path, preset or config")


def _encoder_spec(comp: ComponentConfig, vis: dict) -> dict:
    from medmvl_core.model.medmvl_compat import _vision_config

    opts = dict(comp.options)
    spec = {"type": comp.type, "select_layer": int(opts.pop("select_layer", -1)),
            "select_feature": opts.pop("select_feature", "patch"), "config": _vision_config(vis),
            "attn_implementation": opts.pop("attn_implementation", "eager")}
    spec.update(opts)
    return spec


def _connector_spec(comp: ComponentConfig, vis: dict) -> dict:
    spec = {"type": comp.type, **dict(comp.options)}
    spec.setdefault("name", "mlp2x_gelu")
    if comp.type == "attn_pooling" and "num_queries" not in spec:
        img, patch = vis.get("image_size"), vis.get("patch_size")
        if isinstance(img, int) and isinstance(patch, int):
            spec["num_queries"] = (img // patch) ** 2  # MedM-VL HEAD: one query per patch of one slice
    return spec


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no *.safetensors weights; only safetensors are loaded "
                              "(convert .bin files with transformers on a trusted machine)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def _load_part(module: torch.nn.Module, folder: Path, what: str, prefixes: tuple[str, ...] = ("",)) -> None:
    """Load a base folder's safetensors into ``module``; keys may carry one of ``prefixes``."""
    sd = _read_weights(folder)
    own = module.state_dict()
    picked: dict[str, torch.Tensor] = {}
    for pre in prefixes:
        cand = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre) and k[len(pre):] in own}
        if len(cand) > len(picked):
            picked = cand
    if not picked:
        raise CheckpointError(f"no weight of {folder} matches the {what} module; is it the right model folder?")
    missing = [k for k in own if k not in picked]
    module.load_state_dict(picked, strict=False)
    logger.info("%s: loaded %d tensors from %s (%d not in the folder)", what, len(picked), folder, len(missing))
    return missing


def build_from_parts(cfg: RunConfig) -> tuple[Any, Any]:
    """Build ``MedMVLForConditionalGeneration`` + processor from the config's parts."""
    from medmvl_core.model import MedMVLConfig, MedMVLForConditionalGeneration
    from medmvl_core.model.medmvl_compat import image_spec, volume_spec_2d_encoder, volume_spec_3d_encoder

    m = cfg.model
    llm_conf, _, llm_folder = _component_config(m.llm, cfg, "llm")
    for k in ("architectures", "torch_dtype", "transformers_version", "_name_or_path"):
        llm_conf.pop(k, None)
    kwargs: dict[str, Any] = {"llm_config": llm_conf}
    folders: dict[str, Path] = {}
    prep: dict[str, dict] = {}
    for kind in ("image", "image3d"):
        enc = getattr(m, f"encoder_{kind}")
        if enc is None:
            continue
        vis, pre, folder = _component_config(enc, cfg, f"encoder_{kind}")
        con = getattr(m, f"connector_{kind}")
        if con is None:
            raise ConfigError(f"model.encoder_{kind} needs model.connector_{kind}")
        espec = _encoder_spec(enc, vis)
        kwargs[f"encoder_{kind}"] = espec
        kwargs[f"connector_{kind}"] = _connector_spec(con, espec["config"])
        if folder is not None:
            folders[f"encoder_{kind}"] = folder
        if kind == "image":
            prep["image"] = image_spec(enc.type, espec["config"], pre)
            if m.encoder_image3d is None and enc.type != "convvit3d":  # convvit3d in the 2D slot: images only
                prep["image3d"] = volume_spec_2d_encoder(enc.type, espec["config"], pre, "lvlm")
        else:
            prep["image3d"] = volume_spec_3d_encoder(enc.type, espec["config"])
    if m.preprocessing:
        prep.update(m.preprocessing)
    mcfg = MedMVLConfig(template=m.template, preprocessing=prep, padding_side=m.padding_side,
                        max_length=m.max_length or 2048,
                        llm_attn_implementation=resolve_attn_implementation(m.attn_implementation),
                        box_refs=m.box_refs, **kwargs)
    torch.manual_seed(cfg.seed)
    model = MedMVLForConditionalGeneration(mcfg)
    if llm_folder is not None:
        missing = _load_part(model.llm, llm_folder, "llm")
        bad = [k for k in missing if not k.startswith("lm_head")]
        if bad:
            raise CheckpointError(f"the LLM folder {llm_folder} lacks {len(bad)} weights (e.g. {bad[:3]})")
        model.tie_weights()
    for name, folder in folders.items():
        _load_part(getattr(model, name).encoder, folder, name, prefixes=("", "encoder.", "model."))
    processor = make_processor(model, cfg.resolve_path(m.tokenizer) if m.tokenizer else llm_folder)
    return model, processor


def make_processor(model: Any, tokenizer_dir: Optional[Path]) -> Any:
    """The processor for ``model`` with the tokenizer in ``tokenizer_dir``."""
    from transformers import AutoTokenizer

    from medmvl_core.model.loader import make_processor as processor_for

    if tokenizer_dir is None or not Path(tokenizer_dir).is_dir():
        raise ConfigError(f"model.tokenizer: {tokenizer_dir} is not a tokenizer folder")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
    vocab = model.config.llm_config.vocab_size
    if len(tok) > vocab:
        raise ConfigError(f"the tokenizer has {len(tok)} tokens but the LLM's vocab_size is {vocab}; "
                          "raise model.llm.config.vocab_size (or use the matching tokenizer)")
    return processor_for(model, tok)


def build_model(cfg: RunConfig) -> tuple[Any, Any]:
    """(model, processor) for the run: ``model.init_from`` if set, else the parts. float32 on CPU."""
    if cfg.model.init_from:
        from medmvl_core.model import load_checkpoint

        path = cfg.resolve_path(cfg.model.init_from)
        if not path.exists():
            raise ConfigError(f"model.init_from: {path} does not exist (a checkpoint folder load_checkpoint reads)")
        model, processor = load_checkpoint(str(path), device="cpu", dtype=torch.float32)
        logger.info("initial weights from %s", path)
        if cfg.model.attn_implementation == "auto":  # otherwise the checkpoint's own setting stays
            attn = resolve_attn_implementation("auto")
            if hasattr(model.llm, "set_attn_implementation"):
                model.llm.set_attn_implementation(attn)
                model.config.llm_attn_implementation = attn
        return model, processor
    return build_from_parts(cfg)
