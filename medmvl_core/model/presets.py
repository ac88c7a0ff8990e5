"""Base models MedM-VL configs name by hub id or path: resolution (local folder, HF cache, preset).

Presets are JSON data files in ``preset_data/`` (one per hub id, ``owner__name.json``) holding the
public ``config.json`` values and, for vision towers, the ``preprocessor_config.json`` values.
A preset cannot supply a tokenizer; released checkpoints carry theirs in the checkpoint folder.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from medmvl_core.errors import MissingBaseModelError

logger = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parent / "preset_data"


@dataclass
class BaseModel:
    """A resolved base model: its config (and preprocessor config), and a local folder if any."""

    name: str
    origin: str  # "local" | "hf_cache" | "preset"
    config: dict
    preprocessor_config: dict | None = None
    folder: Path | None = None
    extra: dict = field(default_factory=dict)


def _preset_file(name: str) -> Path:
    return PRESET_DIR / (name.replace("/", "__") + ".json")


def list_presets() -> list[str]:
    """Hub ids with a shipped preset."""
    out = []
    for p in sorted(PRESET_DIR.glob("*.json")):
        out.append(json.loads(p.read_text())["name"])
    return out


def get_preset(name: str) -> dict | None:
    """The preset dict ``{"name", "config", "preprocessor_config"?}`` for a hub id, or None."""
    f = _preset_file(name)
    if not f.is_file():
        return None
    return json.loads(f.read_text())


def _read_json(p: Path) -> dict | None:
    return json.loads(p.read_text()) if p.is_file() else None


def _from_folder(name: str, folder: Path, origin: str) -> BaseModel:
    return BaseModel(name=name, origin=origin, config=_read_json(folder / "config.json") or {},
                     preprocessor_config=_read_json(folder / "preprocessor_config.json"), folder=folder)


def _local_candidates(name: str, checkpoint_dir: Path | None) -> list[Path]:
    p = Path(os.path.expanduser(name))
    if p.is_absolute():
        return [p]
    cands = [Path.cwd() / p]  # MedM-VL resolves relative paths against the working directory
    if checkpoint_dir is not None:
        cands += [checkpoint_dir / p, checkpoint_dir.parent / p]
    return cands


def _from_hf_cache(name: str) -> Path | None:
    if name.count("/") != 1 or name.startswith((".", "/")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    try:
        hit = try_to_load_from_cache(repo_id=name, filename="config.json")
    except Exception:  # a malformed repo id: not in the cache
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def resolve_base(name: str, checkpoint_dir: str | Path | None = None, what: str = "base model") -> BaseModel:
    """Find a base model offline: a local folder, then the HF cache, then a shipped preset.

    A relative path is tried against the working directory (as MedM-VL does), the checkpoint
    folder and its parent. Never touches the network. Raises ``MissingBaseModelError``.
    """
    ckpt = Path(checkpoint_dir).resolve() if checkpoint_dir is not None else None
    tried = []
    for cand in _local_candidates(name, ckpt):
        tried.append(str(cand))
        if (cand / "config.json").is_file():
            logger.info("%s %s: local folder %s", what, name, cand)
            return _from_folder(name, cand, "local")
    cached = _from_hf_cache(name)
    if cached is not None:
        logger.info("%s %s: HF cache %s", what, name, cached)
        return _from_folder(name, cached, "hf_cache")
    preset = get_preset(name)
    if preset is not None:
        logger.info("%s %s: shipped preset", what, name)
        if not preset.get("verified_against_public_copy", False):
            logger.warning("the preset for %s was written from documented values that could not be checked against "
                           "the hub's config.json here; if outputs look wrong, put the real config in a local folder "
                           "or the HF cache. %s", name, preset.get("note", ""))
        return BaseModel(name=name, origin="preset", config=dict(preset["config"]),
                         preprocessor_config=preset.get("preprocessor_config"))
    raise MissingBaseModelError(
        f"the checkpoint needs the {what} {name!r}, which is not a local folder (tried: {', '.join(tried)}), "
        f"not in the local Hugging Face cache and not a shipped preset ({', '.join(list_presets())}). "
        f"Provide it by pointing the checkpoint config at a local folder that holds its config.json, "
        f"or by fetching it on a machine with network access (`huggingface-cli download {name}` or "
        f"`medmvl download {name}`) and copying the cache, or by adding a preset JSON file to "
        f"{PRESET_DIR} (see docs)."
    )
