"""Which model answers, and what it is for: name, revision, content hash and intended use.

Read from a checkpoint folder on the worker's side (``medmvl serve`` puts it into
``/v1/health`` as ``model_info``) and shown by the panel, the viewer and every saved or
exported answer. Standard library only.

Where the facts come from, first match wins:

- ``model_card.json`` beside ``config.json``: ``{"name", "intended_use", "training_data",
  "limitations"}`` (the embedded demo model ships one);
- ``README.md`` (a Hugging Face model card): YAML front-matter keys ``model_name`` /
  ``intended_use``, else the first paragraph under a heading that contains "intended use";
- the revision: the commit recorded by ``huggingface_hub`` when the folder was downloaded
  (``.cache/huggingface/download/config.json.metadata``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Weights up to this size are hashed in full; larger ones by config + safetensors headers.
FULL_HASH_LIMIT = 512 << 20
UNKNOWN_USE = ("intended use not stated by the model card; research use only, "
               "not validated for clinical use")


@dataclass
class ModelIdentity:
    """name: the model's name; revision: hub commit (or ""); content_hash: 16 hex digits of a
    SHA-256; hash_scope: "weights" (every weight byte) or "config+headers" (config.json and
    the safetensors headers and sizes: large checkpoints); intended_use: from the model card."""

    name: str
    revision: str = ""
    content_hash: str = ""
    hash_scope: str = ""
    intended_use: str = UNKNOWN_USE
    training_data: str = ""

    def label(self) -> str:
        """One line for the panel and for exports: name, revision/hash, intended use."""
        ids = [f"revision {self.revision[:12]}"] if self.revision else []
        if self.content_hash:
            ids.append(f"sha256 {self.content_hash[:12]}")
        ident = f"{self.name} ({', '.join(ids)})" if ids else self.name
        return f"{ident} — {self.intended_use}"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ModelIdentity":
        d = d or {}
        return cls(name=str(d.get("name") or "unknown model"),
                   revision=str(d.get("revision") or ""),
                   content_hash=str(d.get("content_hash") or ""),
                   hash_scope=str(d.get("hash_scope") or ""),
                   intended_use=str(d.get("intended_use") or UNKNOWN_USE),
                   training_data=str(d.get("training_data") or ""))

    @classmethod
    def from_health(cls, health: dict[str, Any] | None) -> "ModelIdentity":
        """From the worker's ``/v1/health`` (an older worker without ``model_info`` gives the
        folder name and an intended use that says it is unknown)."""
        health = health or {}
        info = health.get("model_info")
        if isinstance(info, dict) and info.get("name"):
            return cls.from_dict(info)
        return cls(name=str(health.get("model") or "unknown model"))


def _front_matter(text: str) -> dict[str, str]:
    """Flat ``key: value`` pairs of a YAML front matter (enough for a card's scalar keys)."""
    m = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
    out: dict[str, str] = {}
    if m:
        for line in m.group(1).splitlines():
            kv = re.match(r"^([A-Za-z_][\w-]*)\s*:\s*(.+?)\s*$", line)
            if kv:
                out[kv.group(1)] = kv.group(2).strip().strip("'\"")
    return out


def _intended_use_section(text: str) -> str:
    """The first paragraph under a Markdown heading containing "intended use"."""
    lines = text.splitlines()
    for n, line in enumerate(lines):
        if line.lstrip().startswith("#") and "intended use" in line.lower():
            para: list[str] = []
            for nxt in lines[n + 1:]:
                if nxt.lstrip().startswith("#"):
                    break
                if not nxt.strip():
                    if para:
                        break
                    continue
                para.append(nxt.strip().lstrip("-* ").strip())
            return " ".join(para)
    return ""


def _hub_revision(folder: Path) -> str:
    meta = folder / ".cache" / "huggingface" / "download" / "config.json.metadata"
    try:
        first = meta.read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return ""
    return first if re.fullmatch(r"[0-9a-f]{40}", first) else ""


def _safetensors_header(path: Path) -> bytes:
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            return raw
        (n,) = struct.unpack("<Q", raw)
        return raw + fh.read(min(n, 100 << 20))


def content_hash(folder: str | Path, full_limit: int = FULL_HASH_LIMIT) -> tuple[str, str]:
    """(16 hex digits, scope). Hashes config.json and every ``*.safetensors`` in name order:
    whole files when they total at most ``full_limit`` bytes, else their headers and sizes."""
    folder = Path(folder)
    weights = sorted(folder.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in weights)
    full = total <= full_limit
    h = hashlib.sha256()
    cfg = folder / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for p in weights:
        h.update(p.name.encode() + b"\0" + str(p.stat().st_size).encode() + b"\0")
        if full:
            with p.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(_safetensors_header(p))
    return h.hexdigest()[:16], "weights" if full else "config+headers"


def read_model_identity(folder: str | Path, full_limit: int = FULL_HASH_LIMIT) -> ModelIdentity:
    """The identity of the checkpoint in ``folder`` (see the module docstring)."""
    folder = Path(folder)
    card: dict[str, Any] = {}
    card_json = folder / "model_card.json"
    if card_json.is_file():
        try:
            loaded = json.loads(card_json.read_text(encoding="utf-8"))
            card = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable %s: %s", card_json.name, exc)
    readme = folder / "README.md"
    if readme.is_file() and not card.get("intended_use"):
        text = readme.read_text(encoding="utf-8", errors="replace")
        fm = _front_matter(text)
        card.setdefault("name", fm.get("model_name", ""))
        card["intended_use"] = fm.get("intended_use") or _intended_use_section(text)
    digest, scope = content_hash(folder, full_limit)
    return ModelIdentity(name=str(card.get("name") or folder.resolve().name),
                         revision=_hub_revision(folder), content_hash=digest, hash_scope=scope,
                         intended_use=str(card.get("intended_use") or UNKNOWN_USE),
                         training_data=str(card.get("training_data") or ""))
