"""Batch inference over MedM-VL's inference JSON: sharded, length-batched, resumable.

Input (MedM-VL ``lvlm/inference.py`` format): a JSON list of items with ``conversations``
(human/gpt turns), optional ``image`` / ``image3d`` (a path or a list of paths, relative to
``image_dir`` / ``image3d_dir``; ``.npy`` volumes are in HU). As MedM-VL does, a trailing gpt
turn is moved into ``answer`` (the reference) before generation, and ``answer`` is set to ""
when there is none. Output: the same items, in input order, with the generated answer appended
as ``{"from": "gpt", "value": text}`` (``json.dump(indent=4, ensure_ascii=False)``).

Resuming: an item counts as done when an item with the same :func:`item_key` is already in the
output file or in a shard part file (``OUT.json.part-<rank>-of-<world>.json``); re-running the
same command only generates the rest. Files are replaced atomically (write + ``os.replace``).

Data parallel: each rank takes every ``world``-th pending item (after sorting by length, so the
shards are balanced), writes its own part file, and rank 0 merges everything in input order.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from medmvl_core.errors import DataError

logger = logging.getLogger(__name__)

PART_GLOB = "{name}.part-*-of-*.json"


# ----------------------------------------------------------------------------- items


def prepare_items(data: Sequence[Any]) -> list[dict]:
    """MedM-VL's rule: a trailing gpt turn becomes ``answer``; ``answer`` defaults to ""."""
    out = []
    for i, d in enumerate(data):
        if not isinstance(d, dict) or not isinstance(d.get("conversations"), list) or not d["conversations"]:
            raise DataError(f"item {i} has no 'conversations' list; every item needs "
                            "[{'from': 'human', 'value': '<image3d>\\n...'}, ...]")
        d = copy.deepcopy(d)
        answer = ""
        last = d["conversations"][-1]
        if isinstance(last, dict) and last.get("from") == "gpt":
            answer = last.get("value", "")
            d["conversations"] = d["conversations"][:-1]
        d.setdefault("answer", answer)
        out.append(d)
    return out


def _media(v: Any) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def item_key(item: dict, generated: bool = False) -> str:
    """A content key of an input item (id, prompt turns, media paths); ``generated=True`` for an
    output item, whose last gpt turn is dropped first."""
    convs = item.get("conversations") or []
    if generated and convs and isinstance(convs[-1], dict) and convs[-1].get("from") == "gpt":
        convs = convs[:-1]
    blob = json.dumps({"id": item.get("id"), "c": convs, "i": _media(item.get("image")),
                       "v": _media(item.get("image3d"))}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def keys_with_counts(keys: Iterable[str]) -> list[str]:
    """Make duplicate keys distinct by occurrence (``key#0``, ``key#1``, ...)."""
    seen: Counter = Counter()
    out = []
    for k in keys:
        out.append(f"{k}#{seen[k]}")
        seen[k] += 1
    return out


def media_paths(item: dict, image_dir: str | None, image3d_dir: str | None) -> tuple[list[str], list[str]]:
    def resolve(p: str, base: str | None) -> str:
        return str(Path(base) / p) if base and not os.path.isabs(p) else str(p)

    return ([resolve(p, image_dir) for p in _media(item.get("image"))],
            [resolve(p, image3d_dir) for p in _media(item.get("image3d"))])


def check_media(items: Sequence[dict], image_dir: str | None, image3d_dir: str | None) -> None:
    """Fail before loading the model when referenced image files are missing."""
    missing = []
    for i, it in enumerate(items):
        imgs, vols = media_paths(it, image_dir, image3d_dir)
        missing += [(i, p) for p in imgs + vols if not os.path.exists(p)]
    if missing:
        shown = ", ".join(f"item {i}: {p}" for i, p in missing[:5])
        raise DataError(f"{len(missing)} image file(s) not found ({shown}{', ...' if len(missing) > 5 else ''}); "
                        "check --image-dir / --image3d-dir (paths in the JSON are relative to them)")


# --------------------------------------------------------------------------- files


def atomic_write_json(path: Path, data: Any, indent: int | None = 4) -> None:
    """Write JSON to ``path`` atomically (a reader never sees a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def part_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.part-{rank}-of-{world}.json")


def part_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(PART_GLOB.format(name=out.name)))


def load_done(out: Path) -> dict[str, dict]:
    """Answered items by their key: from ``out`` (a JSON list) and any part files."""
    done: dict[str, dict] = {}
    if out.is_file():
        try:
            prev = json.loads(out.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataError(f"existing output {out} is not valid JSON ({exc}); move it away to start over") from None
        if not isinstance(prev, list):
            raise DataError(f"existing output {out} is not a JSON list; move it away to start over")
        for key, item in zip(keys_with_counts(item_key(x, generated=True) for x in prev), prev):
            done[key] = item
    for p in part_files(out):
        try:
            entries = json.loads(p.read_text(encoding="utf-8"))
        except ValueError:
            logger.warning("ignoring unreadable part file %s", p.name)
            continue
        for e in entries:
            done.setdefault(e["key"], e["item"])
    return done


def merge(keys: Sequence[str], done: dict[str, dict]) -> list[dict]:
    """Answered items in input order (unanswered ones are left out)."""
    return [done[k] for k in keys if k in done]


# ------------------------------------------------------------------------- batching


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """Every ``world``-th index starting at ``rank`` (indices already sorted by length)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    return list(indices[rank::world])


def length_batches(indices: Sequence[int], lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group indices into batches of similar length, longest first (OOM shows up at once)."""
    order = sorted(indices, key=lambda i: (-lengths[i], i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


# ---------------------------------------------------------------------------- runner


def run_shard(items: Sequence[dict], keys: Sequence[str], todo: Sequence[int], generate_batch: Callable,
              lengths: Sequence[int], batch_size: int, out: Path, rank: int, world: int,
              save_every_s: float = 30.0, progress: Any = None, on_save: Callable | None = None) -> dict[str, dict]:
    """Generate the items ``todo`` (this rank's shard) in length batches; write the part file.

    ``generate_batch(list_of_items) -> list_of_texts``. Returns this rank's new answers by key.
    The part file is rewritten atomically at most every ``save_every_s`` seconds and at the end
    (also when interrupted), and ``on_save`` (rank 0, one process) merges into ``out``.
    """
    new: dict[str, dict] = {}
    ppath = part_path(out, rank, world)
    last = time.monotonic()

    def save() -> None:
        atomic_write_json(ppath, [{"key": k, "item": v} for k, v in new.items()], indent=None)
        if on_save is not None:
            on_save(new)

    try:
        for batch in length_batches(todo, lengths, batch_size):
            texts = generate_batch([items[i] for i in batch])
            for i, text in zip(batch, texts):
                item = copy.deepcopy(items[i])
                item["conversations"].append({"from": "gpt", "value": text})
                new[keys[i]] = item
            if progress is not None:
                progress.update(len(batch))
            if time.monotonic() - last >= save_every_s:
                save()
                last = time.monotonic()
    finally:
        if new:
            save()
    return new
