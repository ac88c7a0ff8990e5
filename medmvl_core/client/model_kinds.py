"""Which inputs a checkpoint takes, read from its ``config.json`` alone (no torch, no model load).

A view (``medmvl ask``, the viewer, the Slicer panel) checks an image against the checkpoint before it
starts a worker, so a radiograph given to a CT-only model (or a CT to a 2D-only one) is refused at once
with a message that names the model's kind and the model that fits, instead of after the seconds a
worker takes to start. The rules mirror the engine's (``medmvl_core.engine.engine.supported_kinds`` and
``input_kind``): a model takes ``image`` (a single 2D image) with a 2D encoder and an ``image`` spec,
and ``image3d`` (a volume) with a 3D encoder, or with a 2D tower applied slice by slice (MedM-VL-CT-Chest)
and an ``image3d`` spec; the demo's 2D ``convvit3d`` encoder takes single images only.
Standard library + numpy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from medmvl_core.client import errors

IMAGE, IMAGE3D = "image", "image3d"
KIND_WORDS = {IMAGE: "2D images (radiographs, single slices)", IMAGE3D: "3D volumes (CT)"}
#: The shipped demo models, by the kind they take (folders under Resources/).
DEMO_MODELS = {IMAGE3D: "demo_model", IMAGE: "demo_model_2d"}
#: Released MedM-VL checkpoints, by the kind they were trained on.
RELEASED_BY_KIND = {IMAGE3D: "shiym2000/MedM-VL-CT-Chest-3B-en", IMAGE: "shiym2000/MedM-VL-2D-3B-en"}


class WrongInputKindError(errors.BadRequestError):
    """The image is of a kind the model does not take (checked before any worker starts)."""

    code = "wrong_input_kind"


@dataclass(frozen=True)
class ModelKinds:
    """What a checkpoint takes. ``kinds``: a subset of ("image", "image3d"); ``path``: its folder."""

    path: str
    kinds: tuple[str, ...]

    def describe(self) -> str:
        """E.g. "3D volumes (CT)" or "2D images (radiographs, single slices) and 3D volumes (CT)"."""
        return " and ".join(KIND_WORDS[k] for k in self.kinds) or "no images"


def read_model_kinds(checkpoint: str | Path) -> ModelKinds:
    """The input kinds of the checkpoint folder ``checkpoint``, from its ``config.json``.

    Raises :class:`~medmvl_core.client.errors.LaunchError` when the folder holds no readable config."""
    folder = Path(checkpoint)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise errors.LaunchError(f"no model at {folder} (config.json missing); choose a model folder",
                                 code="bad_argument")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise errors.LaunchError(f"cannot read {cfg_file}: {exc}", code="bad_argument") from None
    if not isinstance(cfg, dict):
        raise errors.LaunchError(f"{cfg_file} is not a JSON object", code="bad_argument")
    return ModelKinds(str(folder), kinds_from_config(cfg))


def kinds_from_config(cfg: dict) -> tuple[str, ...]:
    """The input kinds of a parsed checkpoint config (ours; a MedM-VL config is read by its keys too)."""
    prep = cfg.get("preprocessing") or {}
    enc2d = cfg.get("encoder_image") or _medmvl_encoder(cfg, "image")
    enc3d = cfg.get("encoder_image3d") or _medmvl_encoder(cfg, "image3d")
    has_prep = bool(prep)  # MedM-VL configs carry no preprocessing block; our loader derives it
    out = []
    if enc2d and (prep.get(IMAGE) is not None or not has_prep):
        out.append(IMAGE)
    per_slice = enc2d and (enc2d.get("type") if isinstance(enc2d, dict) else None) != "convvit3d"
    if (enc3d or per_slice) and (prep.get(IMAGE3D) is not None or not has_prep):
        out.append(IMAGE3D)
    return tuple(out)


def _medmvl_encoder(cfg: dict, kind: str) -> dict | None:
    """A MedM-VL config names its encoders ``encoder_image_type`` / ``encoder_image3d_type`` (v1.0) or
    ``lvlm_encoder_image_type`` / ... (HEAD); an unset or ``null`` one means no encoder."""
    for key in (f"encoder_{kind}_type", f"lvlm_encoder_{kind}_type"):
        value = cfg.get(key)
        if value not in (None, "", "null", "None"):
            return {"type": str(value)}
    return None


def input_kind(shape: Sequence[int]) -> str:
    """``"image"`` for a 2D image ([H, W], [1, H, W] or [1, H, W, 3]), else ``"image3d"`` (the engine's rule)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2 or len(shape) == 4 or (len(shape) == 3 and shape[0] == 1):
        return IMAGE
    return IMAGE3D


def kind_problem(model: ModelKinds, shape: Sequence[int]) -> str | None:
    """Why ``model`` cannot take an input of array ``shape`` (a message that says what to use
    instead), or None when it can."""
    kind = input_kind(shape)
    if kind in model.kinds:
        return None
    what = ("a 2D image (a radiograph or a single slice)" if kind == IMAGE
            else f"a 3D volume of {tuple(int(s) for s in shape)[0]} slices")
    return (f"this is {what}, but the model at {model.path} takes {model.describe()} only; "
            f"use a model for {KIND_WORDS[kind]}: {suggest_model(model.path, kind)}")


def suggest_model(checkpoint: str | Path, kind: str) -> str:
    """A model that takes ``kind``: the shipped demo model beside ``checkpoint`` when it exists (the demo
    models live side by side in Resources/), and the released checkpoint of that kind."""
    released = f"the released {RELEASED_BY_KIND[kind]}"
    sibling = Path(checkpoint).resolve().parent / DEMO_MODELS[kind]
    if (sibling / "config.json").is_file() and sibling.resolve() != Path(checkpoint).resolve():
        return f"the demo model {sibling} or {released}"
    return released


def check_input_kind(checkpoint: str | Path, shape: Sequence[int]) -> ModelKinds:
    """Read the checkpoint's kinds and raise :class:`WrongInputKindError` if an input of ``shape`` does
    not fit; returns the kinds otherwise. Nothing is started."""
    model = read_model_kinds(checkpoint)
    problem = kind_problem(model, shape)
    if problem:
        raise WrongInputKindError(problem)
    return model


__all__ = ["IMAGE", "IMAGE3D", "ModelKinds", "WrongInputKindError", "check_input_kind", "input_kind",
           "kind_problem", "kinds_from_config", "read_model_kinds", "suggest_model"]
