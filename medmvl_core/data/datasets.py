"""MedM-VL JSON datasets for training: records, the torch dataset, mixing by ratio.

The JSON format is MedM-VL's: a list of items ``{"id", "conversations": [{"from": "human"|"gpt",
"value": str}, ...], "image": [relative paths] | str, "image3d": [relative paths] | str}``.
Image paths are relative to the dataset's ``image_dir`` / ``image3d_dir`` and may be in any
format :func:`medmvl_core.imaging.read_image` supports (DICOM folder, NIfTI, NRRD, MHA, npy, PNG...).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from medmvl_core.data.augment import random_flip_rot90  # noqa: F401 - re-exported (dataset + tests)
from medmvl_core.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
IMAGE3D_PLACEHOLDER = "<image3d>"


@dataclass
class Record:
    """One conversation of a dataset, with image paths resolved (not read)."""

    id: str
    conversations: list
    images: list = field(default_factory=list)     # list[Path]
    images3d: list = field(default_factory=list)   # list[Path]
    source: str = ""                                # dataset file (for messages)
    index: int = 0                                  # row in that file


@dataclass
class RowProblem:
    """A problem of one row: ``kind`` is a stable name (missing_file, bad_placeholder, ...)."""

    source: str
    index: int
    id: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{Path(self.source).name}[{self.index}] (id {self.id}): {self.kind}: {self.detail}"


def _as_list(v: Any) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def read_json_list(path: str | Path, what: str = "data file", fix: str = "check the path") -> list:
    """Read a JSON file holding a list of items (``.jsonl``: one item per line) or raise DataError.

    what: how messages name the file (e.g. ``"--data"``, ``"predictions file"``); fix: what to do
    when it does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} {p} does not exist; {fix}")
    try:
        if p.suffix == ".jsonl":  # streamed line by line (no copy of the whole text in memory)
            from medmvl_core.data.streaming import JsonlIndex

            rows = list(JsonlIndex(p))
        else:
            rows = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{what} {p} is not valid JSON ({exc}); it must be a list of MedM-VL items") from None
    if not isinstance(rows, list):
        raise DataError(f"{what} {p} must hold a JSON list of items, got {type(rows).__name__}")
    return rows


def read_json_rows(path: str | Path) -> list:
    """Read a MedM-VL JSON training/validation file (a list of items; ``.jsonl`` also works)."""
    return read_json_list(path, "data file", "check data.datasets[].path")


def row_problems(row: Any, index: int, source: str, image_dir: Optional[Path], image3d_dir: Optional[Path],
                 *, require_answer: bool = True, check_files: bool = True) -> tuple[Optional[Record], list[RowProblem]]:
    """Check one JSON row's structure, placeholders and files. Returns (record or None, problems)."""
    rid = str(row.get("id", index)) if isinstance(row, dict) else str(index)
    probs: list[RowProblem] = []

    def bad(kind: str, detail: str) -> None:
        probs.append(RowProblem(source, index, rid, kind, detail))

    if not isinstance(row, dict):
        bad("bad_row", "item is not a JSON object")
        return None, probs
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        bad("bad_conversations", "'conversations' must be a non-empty list of {from, value}")
        return None, probs
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt") or not isinstance(turn.get("value"), str):
            bad("bad_conversations", f"turn {t} must be {{'from': 'human'|'gpt', 'value': str}}")
            return None, probs
        if turn["from"] != ("human" if t % 2 == 0 else "gpt"):
            bad("bad_conversations", f"turn {t} is from {turn['from']!r}; turns must alternate human, gpt, ...")
            return None, probs
    if require_answer and conv[-1]["from"] != "gpt":
        bad("no_answer", "the last turn must be from 'gpt' (nothing to learn otherwise)")
    images = _as_list(row.get("image"))
    images3d = _as_list(row.get("image3d"))
    for key, ph, files in (("image", IMAGE_PLACEHOLDER, images), ("image3d", IMAGE3D_PLACEHOLDER, images3d)):
        n_human = sum(turn["value"].count(ph) for turn in conv if turn["from"] == "human")
        n_gpt = sum(turn["value"].count(ph) for turn in conv if turn["from"] == "gpt")
        if n_gpt:
            bad("bad_placeholder", f"{ph} appears in an answer; placeholders belong in human turns")
        if n_human != len(files):
            bad("bad_placeholder", f"{n_human} {ph} placeholder(s) but {len(files)} '{key}' file(s)")
    resolved: dict[str, list[Path]] = {"image": [], "image3d": []}
    for key, files, base in (("image", images, image_dir), ("image3d", images3d, image3d_dir)):
        for f in files:
            if not isinstance(f, str) or not f:
                bad("bad_path", f"'{key}' entries must be non-empty strings")
                continue
            p = Path(f)
            if not p.is_absolute():
                if base is None:
                    bad("missing_dir", f"'{key}' path {f!r} is relative but no {key}_dir was given")
                    continue
                p = Path(base) / p
            if check_files and not p.exists():
                bad("missing_file", f"{key} file {p} does not exist")
            resolved[key].append(p)
    rec = Record(rid, conv, resolved["image"], resolved["image3d"], source, index)
    return (None if probs else rec), probs


def load_records(path: str | Path, image_dir: Optional[str | Path] = None, image3d_dir: Optional[str | Path] = None,
                 *, on_bad_row: str = "error", require_answer: bool = True,
                 problems_out: Optional[list] = None) -> list[Record]:
    """Read a MedM-VL JSON file into :class:`Record` s, checking structure, placeholders and files.

    ``on_bad_row="error"`` raises :class:`DataError` listing the first problems; ``"skip"`` drops
    the bad rows, logs how many and why, and appends the problems to ``problems_out``.
    """
    rows = read_json_rows(path)
    idir = Path(image_dir) if image_dir else None
    i3dir = Path(image3d_dir) if image3d_dir else None
    records: list[Record] = []
    problems: list[RowProblem] = []
    for i, row in enumerate(rows):
        rec, probs = row_problems(row, i, str(path), idir, i3dir, require_answer=require_answer)
        problems.extend(probs)
        if rec is not None:
            records.append(rec)
    if problems:
        _report_problems(problems, on_bad_row, len(rows), str(path))
        if problems_out is not None:
            problems_out.extend(problems)
    return records


def _report_problems(problems: list[RowProblem], on_bad_row: str, total: int, what: str) -> None:
    rows = {(p.source, p.index) for p in problems}
    shown = "\n  ".join(str(p) for p in problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    if on_bad_row == "error":
        raise DataError(f"{len(rows)} of {total} rows of {what} are bad:\n  {shown}{more}\n"
                        "Fix them (medmvl-train validate --data FILE shows all), or set data.on_bad_row=skip "
                        "to skip and count them.")
    kinds: dict[str, int] = {}
    for p in problems:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    logger.warning("skipping %d of %d rows of %s (%s)", len(rows), total, what,
                   ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())))


def mixture_plan(sizes: Sequence[int], ratios: Sequence[float], epoch: int, seed: int) -> list[tuple[int, int]]:
    """The (dataset, row) order of one epoch of a mixture.

    Dataset ``d`` contributes ``round(ratio_d * size_d)`` rows: whole repetitions of a fresh
    permutation plus a random subset for the fractional part, drawn from ``seed`` and ``epoch``;
    then all rows are shuffled together. Deterministic: the same (sizes, ratios, epoch, seed)
    always gives the same list, which is what makes resuming exact.
    """
    if len(sizes) != len(ratios):
        raise DataError("mixture_plan: one ratio per dataset")
    rng = np.random.Generator(np.random.PCG64([seed, epoch, 0x6D6978]))
    plan: list[tuple[int, int]] = []
    for d, (n, r) in enumerate(zip(sizes, ratios)):
        if n == 0:
            continue
        want = int(round(r * n))
        full, rest = divmod(want, n)
        for _ in range(full):
            plan.extend((d, int(i)) for i in rng.permutation(n))
        if rest:
            plan.extend((d, int(i)) for i in rng.permutation(n)[:rest])
    order = rng.permutation(len(plan))
    return [plan[i] for i in order]


def file_digest(path: Path, extra: str = "") -> str:
    """sha256 of a file's bytes (or of every file of a folder, e.g. a DICOM series) + ``extra``."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    h.update(extra.encode())
    return h.hexdigest()


class TrainEncodings:
    """Train-mode text encodings of records, per (record, packed or plain), as int32 arrays, each
    computed once and then reused: by the start-up row check (``training.data.check_rows``), every
    epoch of the dataset, and every evaluation pass.

    ``packed`` rows use :func:`encode_train_turns`; with ``independent_turns`` a plain row (one kept
    multi-turn by ``multi_turn_share``) also gets position ids and a single segment. Re-tokenizing a
    packed demo row costs 5.8 ms (2.4 ms plain), ~45 ms of a ~270 ms 8-row demo stage-2 step on a
    2-core CPU. At most ``MAX_BYTES`` are kept, so that large datasets do not grow memory; rows
    beyond that are encoded each time. Callers must not modify the returned arrays.
    """

    MAX_BYTES = 256 * 2 ** 20

    def __init__(self, processor: Any, independent_turns: bool = False):
        self.processor = processor
        self.independent_turns = independent_turns
        self._memo: dict[tuple, dict] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._memo)

    def get(self, rec: Record, packed: bool, n_images: Optional[dict] = None) -> dict:
        """The encoding of ``rec`` (``n_images``: also check the image placeholders, see encode_train)."""
        key = (rec.source, rec.index, rec.id, bool(packed))
        enc = self._memo.get(key)
        if enc is None:
            enc = self.encode(rec.conversations, packed, n_images)
            size = sum(v.nbytes for v in enc.values())
            if self._bytes + size <= self.MAX_BYTES:
                self._memo[key] = enc
                self._bytes += size
        return enc

    def encode(self, conversations: list, packed: bool, n_images: Optional[dict] = None) -> dict:
        """The encoding of ``conversations``, not kept (a per-epoch variant of a row)."""
        enc = (encode_train_turns if packed else encode_train)(self.processor, conversations, n_images)
        if self.independent_turns and not packed:  # a plain row among packed ones: one segment, causal
            n = len(enc["input_ids"])
            enc = dict(enc, position_ids=list(range(n)), segments=[1] * n)
        return {k: np.asarray(v, dtype=np.int32) for k, v in enc.items()}


_OPTION = re.compile(r"\(([a-h])\) ")
_ANSWER_LETTER = re.compile(r"^(\s*)\(([a-h])\)")


def shuffle_choice_options(conversations: list, rng: np.random.Generator) -> tuple[list, int]:
    """The conversation with the options of its multiple-choice questions in a new random order.

    A question qualifies when it ends in lettered options ``(a) X (b) Y ...`` (consecutive letters
    from ``a``, at least two) and the answer that follows starts with one of those letters
    (``(b) cyst.``): the options are permuted and the answer's letter follows its option. Other
    turns are kept as they are. Returns the new list (the input is not modified) and the number
    of questions shuffled.
    """
    out, n = list(conversations), 0
    for t in range(len(out) - 1):
        q, a = out[t], out[t + 1]
        if q.get("from") != "human" or a.get("from") != "gpt":
            continue
        text = str(q.get("value", ""))
        marks = list(_OPTION.finditer(text))
        start = next((k for k, m in enumerate(marks) if m.group(1) == "a"), None)
        if start is None:
            continue
        marks = marks[start:]
        if len(marks) < 2 or [m.group(1) for m in marks] != list("abcdefgh"[:len(marks)]):
            continue
        options = [text[m.end():(marks[k + 1].start() if k + 1 < len(marks) else len(text))].strip()
                   for k, m in enumerate(marks)]
        answer = str(a.get("value", ""))
        am = _ANSWER_LETTER.match(answer)
        if am is None or not all(options) or ord(am.group(2)) - ord("a") >= len(options):
            continue
        order = rng.permutation(len(options))
        new_letter = "abcdefgh"[int(np.nonzero(order == ord(am.group(2)) - ord("a"))[0][0])]
        head = text[:marks[0].start()]
        out[t] = dict(q, value=head + " ".join(f"({l}) {options[j]}" for l, j in zip("abcdefgh", order)))
        out[t + 1] = dict(a, value=f"{am.group(1)}({new_letter})" + answer[am.end():])
        n += 1
    return out, n


class MedMVLDataset:
    """Torch-style dataset over records: item ``i`` -> one training sample.

    A sample is ``{"input_ids": LongTensor[L], "labels": LongTensor[L], "images": FloatTensor[n, 3, H, W]
    or None, "images3d": FloatTensor[m, C, D, H, W] or None, "image_keys": list[str], "id": str}``
    (placeholders already expanded by the processor, labels -100 outside answers); with
    ``independent_turns`` also ``"position_ids"`` and ``"segments"`` (see :func:`encode_train_turns`),
    except for a ``multi_turn_share`` of the rows (drawn per row and epoch), which keep their plain
    multi-turn encoding (one segment) so that follow-up questions are still trained. With
    ``shuffle_choices`` the options of multiple-choice questions are put in a new order per row and
    epoch (:func:`shuffle_choice_options`), so that the letter must be looked up in the question
    rather than remembered with the image.
    ``image_keys`` are content hashes (file bytes + preprocessing spec) used by the encoder cache;
    when ``skip_pixels(key)`` returns True for every image of a sample the pixels are not read.
    """

    def __init__(self, records: Sequence[Record], processor: Any, *, max_length: Optional[int] = None, augment: bool = False, seed: int = 0,
                 skip_pixels: Optional[Callable[[str], bool]] = None, independent_turns: bool = False,
                 multi_turn_share: float = 0.0, encodings: Optional[TrainEncodings] = None,
                 shuffle_choices: bool = False, augment_flip_p: float = 0.5, augment_intensity: bool = False,
                 pixel_cache: Optional[Any] = None):
        self.records = list(records)
        self.pixel_cache = pixel_cache  # medmvl_core.data.streaming.PixelCache: preprocessed arrays on disk
        self.augment_flip_p = augment_flip_p
        self.augment_intensity = augment_intensity
        self.shuffle_choices = shuffle_choices
        self.independent_turns = independent_turns
        self.multi_turn_share = multi_turn_share
        self.processor = processor
        self.max_length = max_length
        self.augment = augment
        self.seed = seed
        self.skip_pixels = skip_pixels
        self.epoch = 0
        self._key_memo: dict[str, str] = {}
        if encodings is not None and encodings.independent_turns != independent_turns:
            raise ValueError("encodings were made with a different independent_turns setting than the dataset's")
        self.encodings = encodings if encodings is not None else TrainEncodings(processor, independent_turns)

    def __len__(self) -> int:
        return len(self.records)

    def independent(self, i: int) -> bool:
        """Whether row ``i`` trains with independent turns this epoch (see ``multi_turn_share``)."""
        if not self.independent_turns:
            return False
        if self.multi_turn_share <= 0:
            return True
        rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch, i, 7]))
        return bool(rng.random() >= self.multi_turn_share)

    def encode_text(self, rec: Record, independent: Optional[bool] = None) -> dict:
        """input_ids / labels (and position_ids / segments) of a record as int32 arrays (see
        :class:`TrainEncodings`; callers must not modify them)."""
        turns = self.independent_turns if independent is None else independent
        enc = self.encodings.get(rec, turns)
        if self.max_length is not None and len(enc["input_ids"]) > self.max_length:
            raise DataError(f"{Path(rec.source).name}[{rec.index}] (id {rec.id}) has {len(enc['input_ids'])} tokens "
                            f"(with image tokens), more than model.max_length={self.max_length}; raise max_length, "
                            "shorten the sample, or set data.on_bad_row=skip")
        return enc

    def image_key(self, path: Path, kind: str) -> str:
        memo = f"{kind}:{path}"
        if memo not in self._key_memo:
            spec = getattr(self.processor, "preprocessing", {}) or {}
            self._key_memo[memo] = file_digest(path, json.dumps(spec.get(kind, {}), sort_keys=True) + kind)
        return self._key_memo[memo]

    def _pixels(self, path: Path, kind: str) -> np.ndarray:
        """The preprocessed float32 array of one image (from the pixel cache when it has it)."""
        cache, key = self.pixel_cache, None
        if cache is not None:
            spec = (getattr(self.processor, "preprocessing", {}) or {}).get(kind, {})
            key = cache.key_for(path, spec, kind)
            hit = cache.get(key)
            if hit is not None:
                return np.array(hit, dtype=np.float32)  # a private copy: augmentation may change it
        if kind == "image":
            arr, _ = self.processor.preprocess_image(str(path))
        else:
            arr, _ = self.processor.preprocess_volume(str(path))
        arr = np.asarray(arr, dtype=np.float32)
        if cache is not None:
            cache.put(key, arr)
        return arr

    def __getitem__(self, i: int) -> dict:
        import torch

        rec = self.records[i]
        independent = self.independent(i)
        enc = self.encode_text(rec, independent)
        if self.shuffle_choices:  # the options in a new order each epoch (the row's usual length checked)
            rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch, i, 11]))
            convs, n = shuffle_choice_options(rec.conversations, rng)
            if n:
                shuffled = self.encodings.encode(convs, independent)
                if self.max_length is None or len(shuffled["input_ids"]) <= self.max_length:
                    enc = shuffled
        sample: dict = {"id": rec.id,
                        "input_ids": torch.as_tensor(enc["input_ids"], dtype=torch.long),
                        "labels": torch.as_tensor(enc["labels"], dtype=torch.long),
                        "images": None, "images3d": None, "image_keys": []}
        for key in ("position_ids", "segments"):  # independent turns (see encode_train_turns)
            if key in enc:
                sample[key] = torch.as_tensor(enc[key], dtype=torch.long)
        use_keys = self.skip_pixels is not None and not self.augment
        for kind, paths, out_key in (("image", rec.images, "images"), ("image3d", rec.images3d, "images3d")):
            if not paths:
                continue
            keys = [self.image_key(p, kind) for p in paths] if use_keys else []
            sample["image_keys"].extend(keys)
            if keys and all(self.skip_pixels(k) for k in keys):
                sample[out_key] = keys  # pixels not needed: the encoder cache has them
                continue
            arrays = []
            for j, p in enumerate(paths):
                arr = self._pixels(p, kind)
                if self.augment and kind == "image3d":
                    rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch, i, j]))
                    arr = random_flip_rot90(arr, rng, self.augment_flip_p, self.augment_intensity)
                arrays.append(torch.from_numpy(arr))
            sample[out_key] = torch.stack(arrays)
        return sample


_LEADING_IMAGES = re.compile(r"^(?:\s*<image(?:3d)?>)+\s*")


def encode_train_turns(processor: Any, conversations: list, n_images: Optional[dict] = None) -> dict:
    """Train-mode encoding with every question-answer turn *independent*: each turn is encoded as a
    single-turn conversation with the row's images (as a model is asked at inference), and all are
    packed after their shared prefix (system prompt, images, any common question start).

    Returns ``input_ids`` / ``labels`` as :func:`encode_train` plus ``position_ids`` (each turn
    continues from the prefix, as if alone) and ``segments`` (0 = shared prefix, i = turn i). The
    training step lets a token see the prefix and its own turn only, so the packed row trains
    exactly what its turns would train one by one, at the cost of one copy of the image tokens —
    and no answer can be copied from an earlier turn instead of read from the image.

    The images must lead the first question (``"<image3d>\nQuestion"``, as MedM-VL data has them);
    later questions must not hold placeholders of their own.
    """
    turns = [conversations[i:i + 2] for i in range(0, len(conversations), 2)]
    first = str(turns[0][0].get("value", "")) if turns and turns[0] else ""
    lead = _LEADING_IMAGES.match(first)
    if lead is None:
        raise DataError("data.independent_turns: the first question must start with the image placeholder(s) "
                        "(e.g. '<image3d>\\nQuestion'); move them there or set data.independent_turns=false")
    lead_text = first[:lead.end()]
    parts = []
    for n, turn in enumerate(turns):
        if len(turn) != 2:
            raise DataError("data.independent_turns: every question needs its answer (human/gpt pairs)")
        q = str(turn[0].get("value", ""))
        if n and re.search(r"<image(?:3d)?>", q):
            raise DataError(f"data.independent_turns: question {n + 1} holds an image placeholder; only the first "
                            "question may (all turns share its images)")
        human = dict(turn[0], value=q if n == 0 else lead_text + q)
        parts.append(encode_train(processor, [human, turn[1]], n_images))
    ids = [p["input_ids"] for p in parts]
    common = len(os.path.commonprefix(ids))  # the longest prefix all turns share
    if any(v in (-200, -201) for p in parts for v in p["input_ids"][common:]):
        raise DataError("data.independent_turns: the turns do not share their image tokens; check the template")
    out = {"input_ids": list(ids[0][:common]), "labels": list(parts[0]["labels"][:common]),
           "position_ids": list(range(common)), "segments": [0] * common}
    for n, p in enumerate(parts, 1):
        k = len(p["input_ids"]) - common
        out["input_ids"] += p["input_ids"][common:]
        out["labels"] += p["labels"][common:]
        out["position_ids"] += range(common, common + k)
        out["segments"] += [n] * k
    return out


def placeholder_runs(ids: Sequence[int]) -> dict:
    """Number of image positions per kind: runs of consecutive -200 ("image") / -201 ("image3d") ids."""
    runs = {"image": 0, "image3d": 0}
    prev = None
    for v in ids:
        if v in (-200, -201) and v != prev:
            runs["image" if v == -200 else "image3d"] += 1
        prev = v
    return runs


def encode_train(processor: Any, conversations: list, n_images: Optional[dict] = None) -> dict:
    """Train-mode ``{"input_ids", "labels"}`` (lists of int) with every placeholder expanded into
    ``processor.num_image_tokens[kind]`` copies of its negative id (labels -100 there).

    With ``n_images`` (``{"image": n, "image3d": m}``, the files of the row) the number of image
    positions the template produced must match, else :class:`DataError` (e.g. a pretrain template,
    which puts the image in every human turn, on multi-turn data).
    """
    enc = processor.encode(conversations, mode="train")
    ids, labels = list(enc["input_ids"]), list(enc["labels"])
    sentinels = sum(1 for v in ids if v in (-200, -201))
    if sentinels and sentinels == sum(placeholder_runs(ids).values()) and hasattr(processor, "expand"):
        ids, labels = processor.expand(ids, labels)  # one sentinel per image: not expanded yet
    if n_images is not None:
        runs = placeholder_runs(ids)
        for kind in ("image", "image3d"):
            if runs[kind] != n_images.get(kind, 0):
                raise DataError(f"the template gives {runs[kind]} {kind} position(s) for {n_images.get(kind, 0)} "
                                f"{kind} file(s); check the placeholders (a pretrain template expects one "
                                "human/gpt pair per row)")
    return {"input_ids": ids, "labels": labels}
