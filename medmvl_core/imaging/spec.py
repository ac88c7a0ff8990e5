"""Preprocessing specs: what a checkpoint expects its images to look like.

A spec is a JSON-serialisable dict stored in the checkpoint config
(``config.preprocessing["image3d" | "image"]``). Kinds:

* ``"volume"`` — a HU volume: optional ``hu_window`` ([lo, hi] -> [0, 255], float64), optional
  ``crop_foreground`` (MONAI ``CropForeground``: voxels > 0 after the intensity step), resize to
  ``size`` = [D, H, W] (MONAI ``Resize`` trilinear), optional ``cast_uint8`` (truncation), then
  ``channels`` copies and ``normalize``; optional ``max_windows`` ([[lo, hi], ...] in HU, default
  none): one more channel each, the region windowed to [lo, hi] -> [0, 1] and resized by area
  maximum instead of averaging (small dense findings keep their intensity; our extension, not
  MedM-VL's).
* ``"volume_preprocessed"`` — MedM-VL v1.0 data: the array is already windowed, cropped and
  resized ([1, D, H, W] or [D, H, W] in [0, 255]); only the cast and ``normalize`` apply. An
  optional ``raw`` (a ``"volume"`` spec) is what a raw scan goes through instead (values below
  0, i.e. HU, or a shape other than ``size``): the pipeline that produced the v1.0 data.
* ``"image"`` — a 2D image, processed as the encoder's HF image processor does.

``normalize.type``: ``"image_processor"`` (SigLIP/CLIP: per slice, PIL bicubic resize to
``image_size``, rescale, mean/std; CLIP adds ``crop_size`` with a shortest-edge resize and a
centre crop), ``"minmax"`` (M3D-CLIP: (x - min)/(max - min) before the crop), ``"mean_std"``
(MedM-CLIP: (x - mean)/std before the crop) or ``"none"``.

``orientation``: ``"native"`` keeps the array axes as read; a 3-letter code such as ``"LPS"``
or ``"RAS"`` reorients (see :mod:`medmvl_core.imaging.orientation`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from medmvl_core.errors import ConfigError

SIGLIP_MEAN_STD = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
CLIP_MEAN_STD = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
MEDMCLIP_MEAN_STD = (55.6982188356434, 66.1943479570918)
RESCALE_1_255 = 0.00392156862745098

KINDS = ("volume", "volume_preprocessed", "image")
NORMALIZE_TYPES = ("image_processor", "minmax", "mean_std", "none")
ENCODER_TYPES = ("siglip", "clip", "siglip_slices", "clip_slices", "m3dclip", "medmclip")


def image_processor_normalize(image_size: int, mean, std, *, resample: int = 3,
                              crop_size: int | None = None,
                              rescale: float = RESCALE_1_255) -> dict:
    """The ``normalize`` block of a SigLIP (``crop_size=None``) or CLIP image processor."""
    d = {"type": "image_processor", "image_size": int(image_size), "resample": int(resample),
         "rescale": float(rescale), "mean": [float(m) for m in mean],
         "std": [float(s) for s in std]}
    if crop_size is not None:
        d["crop_size"] = int(crop_size)
    return d


def default_spec(encoder_type: str, image_size: int, *, depth: int = 32,
                 orientation: str = "LPS") -> dict:
    """The preprocessing spec MedM-VL uses for an encoder.

    Args:
        encoder_type: ``"siglip"`` / ``"clip"`` (2D images), ``"siglip_slices"`` /
            ``"clip_slices"`` (a CT through the 2D encoder slice by slice, MedM-VL-CT-Chest),
            ``"m3dclip"`` or ``"medmclip"`` (3D ViTs).
        image_size: in-plane size S (the encoder's image size).
        depth: number of slices D of the model input (MedM-VL: 32).
        orientation: canonical orientation of volumes (``"LPS"``; ``"native"`` keeps axes).
    """
    if encoder_type not in ENCODER_TYPES:
        raise ConfigError(f"unknown encoder type {encoder_type!r}; valid: {list(ENCODER_TYPES)}")
    if int(image_size) < 1:
        raise ConfigError(f"image_size must be positive, got {image_size}")
    s = int(image_size)
    if encoder_type == "siglip":
        return {"kind": "image", "normalize": image_processor_normalize(s, *SIGLIP_MEAN_STD)}
    if encoder_type == "clip":
        return {"kind": "image",
                "normalize": image_processor_normalize(s, *CLIP_MEAN_STD, crop_size=s)}
    vol = {"kind": "volume", "hu_window": [-1000, 1000], "crop_foreground": True,
           "size": [int(depth), s, s], "orientation": orientation}
    if encoder_type in ("siglip_slices", "clip_slices"):
        mean, std = SIGLIP_MEAN_STD if encoder_type == "siglip_slices" else CLIP_MEAN_STD
        vol.update(cast_uint8=True, channels=3, normalize=image_processor_normalize(
            s, mean, std, crop_size=s if encoder_type == "clip_slices" else None))
    elif encoder_type == "m3dclip":
        vol.update(cast_uint8=False, channels=1, normalize={"type": "minmax"})
    else:  # medmclip
        m, sd = MEDMCLIP_MEAN_STD
        vol.update(cast_uint8=False, channels=1, normalize={"type": "mean_std", "mean": m, "std": sd})
    return vol


#: Named presets for ``medmvl preprocess --preset NAME``.
PRESETS: dict[str, dict] = {
    "ct-chest-siglip-384": default_spec("siglip_slices", 384),
    "ct-chest-siglip-256": default_spec("siglip_slices", 256),
    "image-siglip-384": default_spec("siglip", 384),
    "image-clip-336": default_spec("clip", 336),
    "m3dclip-256": default_spec("m3dclip", 256),
    "medmclip-256": default_spec("medmclip", 256),
}


def get_preset(name: str) -> dict:
    """A copy of a named preset spec; unknown names raise ConfigError listing the valid ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preprocessing preset {name!r}; valid: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def validate_spec(spec: dict) -> dict:
    """Check a spec and return a copy with defaults filled in. Raises ConfigError listing problems."""
    if not isinstance(spec, dict):
        raise ConfigError(f"a preprocessing spec must be a dict, got {type(spec).__name__}")
    s = copy.deepcopy(spec)
    problems: list[str] = []
    kind = s.get("kind")
    if kind not in KINDS:
        problems.append(f"kind={kind!r} (valid: {list(KINDS)})")
    norm = s.setdefault("normalize", {"type": "none"})
    if not isinstance(norm, dict) or norm.get("type") not in NORMALIZE_TYPES:
        problems.append(f"normalize={norm!r} (type must be one of {list(NORMALIZE_TYPES)})")
    elif norm["type"] == "image_processor":
        for key in ("image_size", "mean", "std"):
            if key not in norm:
                problems.append(f"normalize.{key} missing")
        norm.setdefault("resample", 3)
        norm.setdefault("rescale", RESCALE_1_255)
    elif norm["type"] == "mean_std" and not ("mean" in norm and "std" in norm):
        problems.append("normalize.mean/std missing")
    if kind in ("volume", "volume_preprocessed"):
        s.setdefault("cast_uint8", False)
        s.setdefault("channels", 1)
        s.setdefault("orientation", "native")
        if s["channels"] not in (1, 3):
            problems.append(f"channels={s['channels']!r} (1 or 3)")
        orient = s["orientation"]
        if orient != "native" and not _is_axcode(orient):
            problems.append(f"orientation={orient!r} ('native' or a code like 'LPS', 'RAS')")
    if kind == "volume":
        s.setdefault("hu_window", None)
        s.setdefault("crop_foreground", False)
        size = s.get("size")
        if not (isinstance(size, (list, tuple)) and len(size) == 3
                and all(isinstance(v, int) and v > 0 for v in size)):
            problems.append(f"size={size!r} (three positive integers [D, H, W])")
        win = s["hu_window"]
        if win is not None and not (len(win) == 2 and float(win[0]) < float(win[1])):
            problems.append(f"hu_window={win!r} ([lo, hi] with lo < hi, or null)")
        mw = s.get("max_windows", [])
        if not (isinstance(mw, (list, tuple)) and all(
                isinstance(w, (list, tuple)) and len(w) == 2
                and all(isinstance(v, (int, float)) for v in w) and w[0] < w[1] for w in mw)):
            problems.append(f"max_windows={mw!r} (a list of [lo, hi] HU pairs with lo < hi)")
    if kind == "volume_preprocessed" and s.get("raw") is not None:
        raw = s["raw"]
        if not isinstance(raw, dict) or raw.get("kind") != "volume":
            problems.append(f"raw={raw!r} (a 'volume' spec for raw scans, or null)")
        else:
            s["raw"] = validate_spec(raw)
    if problems:
        raise ConfigError("invalid preprocessing spec: " + "; ".join(problems))
    return s


def _is_axcode(code) -> bool:
    if not isinstance(code, str) or len(code) != 3:
        return False
    pairs = [{"L", "R"}, {"P", "A"}, {"S", "I"}]
    return all(sum(c in p for c in code.upper()) == 1 for p in pairs)


def spec_from_checkpoint(path: str | Path, kind: str | None = None) -> dict:
    """Read a checkpoint's preprocessing spec from its ``config.json`` (plain JSON, no torch).

    Our format stores ``preprocessing: {"image3d": spec, "image": spec}``; ``kind`` picks one
    (default: ``image3d`` when present, else ``image``). MedM-VL folders (``lvlm_*`` or v1.0 schema) have no
    spec; for them the spec is derived from the encoder type and ``preprocessor_config.json``.
    """
    path = Path(path)
    cfg_path = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read checkpoint config {cfg_path}: {exc}; "
                          "pass a checkpoint folder containing config.json") from exc
    pre = cfg.get("preprocessing")
    if isinstance(pre, dict) and pre:
        key = kind or ("image3d" if pre.get("image3d") else "image")
        if not pre.get(key):
            raise ConfigError(f"checkpoint {path} has no preprocessing spec for {key!r}; "
                              f"it has {sorted(k for k, v in pre.items() if v)}")
        return validate_spec(pre[key])
    return _spec_from_medmvl_config(cfg, cfg_path.parent, kind)


def _spec_from_medmvl_config(cfg: dict, folder: Path, kind: str | None) -> dict:
    enc3d = cfg.get("lvlm_encoder_image3d_type") or cfg.get("encoder_image3d_type")
    enc2d = cfg.get("lvlm_encoder_image_type") or cfg.get("encoder_image_type")
    enc_path = cfg.get("lvlm_encoder_image_name_or_path") or cfg.get("encoder_image_name_or_path")
    v1 = "lvlm_llm_type" not in cfg
    if enc3d in ("m3dclip", "medmclip") and kind != "image":
        spec = default_spec(enc3d, 256)
        if v1 and enc3d == "m3dclip":
            spec = {"kind": "volume_preprocessed", "cast_uint8": False, "channels": 1,
                    "normalize": {"type": "none"}}
        return validate_spec(spec)
    if enc2d not in ("siglip", "clip"):
        raise ConfigError(f"cannot derive a preprocessing spec: encoder types {enc2d!r}/{enc3d!r} "
                          "are not known; pass --preset NAME instead")
    size, norm = _processor_from_folder(folder, enc_path, enc2d)
    if kind == "image":
        return validate_spec({"kind": "image", "normalize": norm})
    if v1:
        return validate_spec({"kind": "volume_preprocessed", "cast_uint8": True, "channels": 3,
                              "normalize": norm})
    spec = default_spec(enc2d + "_slices", size)
    spec["normalize"] = norm
    return validate_spec(spec)


def _processor_from_folder(folder: Path, enc_path: str | None, enc_type: str) -> tuple[int, dict]:
    """Read ``preprocessor_config.json`` from the encoder folder the MedM-VL config names."""
    bases = [folder / enc_path, folder.parent / enc_path, Path(enc_path)] if enc_path else []
    for base in bases + [folder]:
        p = base / "preprocessor_config.json"
        if p.is_file():
            return normalize_from_processor_config(json.loads(p.read_text()))
    raise ConfigError(f"no preprocessor_config.json for encoder {enc_path!r} near {folder}; "
                      "run from the folder the checkpoint's relative paths refer to, or use --preset")


def normalize_from_processor_config(pc: dict) -> tuple[int, dict]:
    """(image_size, normalize block) from an HF Siglip/CLIP ``preprocessor_config.json`` dict."""
    size = pc.get("size", {})
    crop = pc.get("crop_size")
    if isinstance(size, dict):
        s = int(size.get("shortest_edge") or size.get("height"))
    else:
        s = int(size)
    crop_size = None
    if pc.get("do_center_crop", False) and crop is not None:
        crop_size = int(crop.get("height") if isinstance(crop, dict) else crop)
    norm = image_processor_normalize(s, pc.get("image_mean", SIGLIP_MEAN_STD[0]),
                                     pc.get("image_std", SIGLIP_MEAN_STD[1]),
                                     resample=int(pc.get("resample", 3)), crop_size=crop_size,
                                     rescale=float(pc.get("rescale_factor", RESCALE_1_255)))
    return (crop_size or s), norm
