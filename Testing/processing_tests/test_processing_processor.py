"""MedMVLProcessor: expansion, placeholder checks, truncation, batching, persistence and the
delegation of pixels to medmvl_core.imaging."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import medmvl_core.imaging as imaging
from medmvl_core.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    PlaceholderError,
    RegistryError,
    SequenceTooLongError,
    TokenizationMismatchError,
)
from medmvl_core.processing import IGNORE_INDEX, MedMVLProcessor, apply_medmvl_tokenizer_rules

QUESTION_3D = [{"from": "human", "value": "<image3d>\nGenerate radiology report for the CT."}]
TRAIN_2D = [
    {"from": "human", "value": "<image>\nIs there any pleural effusion?"},
    {"from": "gpt", "value": "No, there is no pleural effusion."},
]
VOLUME = torch.zeros(3, 2, 4, 4)
IMAGE = torch.zeros(3, 4, 4)


@pytest.fixture(scope="module")
def tokenizer(reference_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(reference_dir / "base" / "llm"), use_fast=True, local_files_only=True)


@pytest.fixture()
def proc(tokenizer) -> MedMVLProcessor:
    return MedMVLProcessor(tokenizer, "qwen2", {"image": 3, "image3d": 5}, max_length=512)


def test_expansion_counts_labels_and_mask(proc):
    encoded = proc.encode(QUESTION_3D, mode="generate")
    sample = proc(QUESTION_3D, image3d=VOLUME)
    ids = sample["input_ids"].tolist()
    at = encoded["input_ids"].index(-201)
    assert ids == encoded["input_ids"][:at] + [-201] * 5 + encoded["input_ids"][at + 1 :]
    assert sample["attention_mask"].tolist() == [1] * len(ids)
    assert sample["labels"] is None  # generate mode: model.generate(**batch) takes no labels
    assert encoded["labels"] == [IGNORE_INDEX] * len(encoded["input_ids"])
    assert sample["images3d"].shape == (1, 3, 2, 4, 4) and sample["images"] is None

    train = proc(TRAIN_2D, image=IMAGE, mode="train")
    labels = train["labels"].tolist()
    positions = [i for i, t in enumerate(train["input_ids"].tolist()) if t == -200]
    assert len(positions) == 3 and positions == list(range(positions[0], positions[0] + 3))
    assert all(labels[i] == IGNORE_INDEX for i in positions)
    assert proc.tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == " No, there is no pleural effusion.<|im_end|>"


def test_one_image_with_two_placeholders_raises(proc):
    doubled = [{"from": "human", "value": "<image>\n<image>\nCompare."}]
    with pytest.raises(PlaceholderError, match="2 <image> placeholder"):
        proc(doubled, image=IMAGE)


def test_placeholder_count_errors(proc):
    with pytest.raises(PlaceholderError, match="0 <image3d> placeholder"):
        proc([{"from": "human", "value": "No placeholder."}], image3d=VOLUME)
    with pytest.raises(PlaceholderError, match="1 <image3d> placeholder\\(s\\) for 0"):
        proc(QUESTION_3D)
    two = proc([{"from": "human", "value": "<image>\n<image>\nCompare."}], image=[IMAGE, IMAGE])
    assert two["images"].shape[0] == 2 and two["input_ids"].tolist().count(-200) == 6


def test_conversation_structure_is_checked_before_counts(proc):
    with pytest.raises(DataError, match="non-empty list"):
        proc("<image3d>\nA bare string", image3d=VOLUME)


def test_placeholder_of_a_kind_the_model_lacks(tokenizer):
    proc = MedMVLProcessor(tokenizer, "qwen2", {"image": 3})
    with pytest.raises(PlaceholderError, match="no num_image_tokens\\['image3d'\\]"):
        proc(QUESTION_3D, image3d=VOLUME)


def test_truncation_keeps_images_whole(tokenizer):
    full = MedMVLProcessor(tokenizer, "qwen2", {"image": 3}, max_length=None)(TRAIN_2D, image=IMAGE, mode="train")
    n = full["input_ids"].shape[0]
    cut = MedMVLProcessor(tokenizer, "qwen2", {"image": 3}, max_length=n - 4)(TRAIN_2D, image=IMAGE, mode="train")
    assert cut["input_ids"].tolist() == full["input_ids"].tolist()[: n - 4]
    assert cut["labels"].tolist() == full["labels"].tolist()[: n - 4]
    first = full["input_ids"].tolist().index(-200)
    for limit in (first + 1, first + 2, first):  # inside the run, and before it
        short = MedMVLProcessor(tokenizer, "qwen2", {"image": 3}, max_length=limit)
        with pytest.raises(SequenceTooLongError, match="max_length is %d" % limit):
            short(TRAIN_2D, image=IMAGE, mode="train")
    exact = MedMVLProcessor(tokenizer, "qwen2", {"image": 3}, max_length=first + 3)  # cut right after the run
    kept = exact(TRAIN_2D[:1], image=IMAGE)["input_ids"].tolist()
    assert kept == full["input_ids"].tolist()[: first + 3] and kept.count(-200) == 3


def test_collate_left_and_right(proc):
    short = proc(QUESTION_3D, image3d=VOLUME)
    long = proc([{"from": "human", "value": "<image3d>\nIs there a nodule in the left lung? Where?"}], image3d=VOLUME)
    n_short, n_long = short["input_ids"].shape[0], long["input_ids"].shape[0]
    pad = proc.tokenizer.pad_token_id
    right = proc.collate([short, long])
    assert set(right) == {"input_ids", "attention_mask", "images", "images3d"}
    assert right["input_ids"][0].tolist() == short["input_ids"].tolist() + [pad] * (n_long - n_short)
    assert right["attention_mask"][0].tolist() == [1] * n_short + [0] * (n_long - n_short)
    trained = proc.collate([proc(TRAIN_2D, image=IMAGE, mode="train"), proc(TRAIN_2D[:1] + [{"from": "gpt", "value": "Y"}], image=IMAGE, mode="train")])
    n0 = int(trained["attention_mask"][1].sum())
    assert trained["labels"][1, n0:].tolist() == [IGNORE_INDEX] * (trained["labels"].shape[1] - n0)
    assert trained["images"].shape == (2, 3, 4, 4)
    left = proc.collate([short, long], padding_side="left")
    assert left["input_ids"][0].tolist() == [pad] * (n_long - n_short) + short["input_ids"].tolist()
    assert left["attention_mask"][0].tolist() == [0] * (n_long - n_short) + [1] * n_short
    assert left["input_ids"][1].tolist() == long["input_ids"].tolist()
    assert left["images3d"].shape == (2, 3, 2, 4, 4) and left["images"] is None
    with pytest.raises(ConfigError, match="padding_side"):
        proc.collate([short], padding_side="middle")
    with pytest.raises(DataError, match="at least one sample"):
        proc.collate([])


def test_collate_needs_a_pad_token(reference_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(reference_dir / "base" / "llm"), use_fast=True, local_files_only=True)
    tok.pad_token = None
    proc = MedMVLProcessor(tok, "qwen2", {"image3d": 2})
    with pytest.raises(ConfigError, match="no pad token"):
        proc.collate([proc(QUESTION_3D, image3d=VOLUME)])


def test_mode_and_turn_checks(proc):
    with pytest.raises(DataError, match="needs it to be from 'gpt'"):
        proc.encode(QUESTION_3D, mode="train")
    with pytest.raises(DataError, match="needs it to be from 'human'"):
        proc.encode(TRAIN_2D, mode="generate")
    with pytest.raises(DataError, match="needs it to be from 'human'; drop the trailing answer"):
        proc.prompt(TRAIN_2D, add_generation_prompt=True)
    assert proc.prompt(TRAIN_2D).endswith("effusion.<|im_end|>")
    with pytest.raises(ValueError, match="mode"):
        proc.encode(TRAIN_2D, mode="eval")


def test_mismatch_is_raised_or_reported(proc):
    bad = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "Odd ASSISTANT: text"}]
    with pytest.raises(TokenizationMismatchError, match="MedM-VL would silently ignore every label"):
        proc(bad, image=IMAGE, mode="train")
    sample = proc(bad, image=IMAGE, mode="train", on_mismatch="mask")
    assert sample["tokenization_mismatch"] is True
    assert set(sample["labels"].tolist()) == {IGNORE_INDEX}


def test_constructor_validation(tokenizer):
    with pytest.raises(RegistryError, match="valid names"):
        MedMVLProcessor(tokenizer, "mistral")
    with pytest.raises(ConfigError, match="positive integer"):
        MedMVLProcessor(tokenizer, "qwen2", {"image": 0})
    with pytest.raises(ConfigError, match="unknown kind"):
        MedMVLProcessor(tokenizer, "qwen2", {"video": 4})
    with pytest.raises(ConfigError, match="max_length"):
        MedMVLProcessor(tokenizer, "qwen2", max_length=0)


def test_save_and_load_round_trip(proc, tmp_path):
    proc.preprocessing = {"image3d": {"kind": "volume", "size": [32, 32, 32]}}
    proc.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["template"] == "qwen2" and saved["num_image_tokens"] == {"image": 3, "image3d": 5}
    for use_fast in (False, True):
        loaded = MedMVLProcessor.from_pretrained(tmp_path, use_fast=use_fast)
        assert loaded.to_dict() == proc.to_dict()
        assert loaded(TRAIN_2D, image=IMAGE, mode="train")["labels"].tolist() == proc(TRAIN_2D, image=IMAGE, mode="train")["labels"].tolist()
    assert MedMVLProcessor.from_pretrained(tmp_path, padding_side="left").padding_side == "left"
    with pytest.raises(CheckpointError, match="processor_config.json"):
        MedMVLProcessor.from_pretrained(tmp_path / "missing")


def test_pixels_go_through_imaging_preprocess(proc, monkeypatch):
    calls = []

    def fake_preprocess(volume, spec, roi=None, augment=None):
        calls.append((volume, spec, roi, augment))
        return np.ones((3, 2, 4, 4), dtype=np.float32), {"geometry": len(calls)}

    monkeypatch.setattr(imaging, "preprocess", fake_preprocess, raising=False)
    monkeypatch.setattr(imaging, "read_image", lambda path, series_uid=None: ("read", path), raising=False)
    spec = {"kind": "volume", "hu_window": [-1000, 1000]}
    proc.preprocessing = {"image3d": spec}
    hu = np.full((6, 8, 8), -1000, dtype=np.int16)
    sample = proc(QUESTION_3D, image3d=hu, roi=(0, 0, 0, 2, 2, 2))
    volume, used_spec, roi, augment = calls[-1]
    assert used_spec is spec and roi == (0, 0, 0, 2, 2, 2) and augment is None
    assert volume.array.shape == (6, 8, 8) and volume.modality == "CT"
    assert sample["images3d"].shape == (1, 3, 2, 4, 4) and float(sample["images3d"].sum()) == 96.0
    assert sample["geometry"]["image3d"] == [{"geometry": 1}]
    proc(QUESTION_3D, image3d=hu, augment="rot90-k1")
    assert calls[-1][3] == "rot90-k1"
    n_calls = len(calls)
    with pytest.raises(PlaceholderError, match="0 <image3d> placeholder"):  # text is checked before preprocessing
        proc([{"from": "human", "value": "No placeholder."}], image3d=hu)
    assert len(calls) == n_calls
    proc.preprocess_volume("/data/ct.nii.gz")
    assert calls[-1][0] == ("read", "/data/ct.nii.gz")
    with pytest.raises(ConfigError, match="no preprocessing spec for 'image'"):
        proc.preprocess_image(np.zeros((4, 4)))
    with pytest.raises(DataError, match="volume array must be"):
        proc.preprocess_volume(np.zeros((4, 4)))


def test_medmvl_pad_rules(reference_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(reference_dir / "base" / "llm"), use_fast=True, local_files_only=True)
    assert apply_medmvl_tokenizer_rules(tok, "qwen2").pad_token == "<|endoftext|>"
    assert apply_medmvl_tokenizer_rules(tok, "llama3").pad_token_id == tok.eos_token_id


def test_pad_equal_to_eos_keeps_eos_tokens_attended(reference_dir):
    # MedM-VL (Llama-3: pad == eos) swaps eos for -300 before deriving the mask from the pad id, so
    # the eos tokens inside the text stay attended; only the padding is masked.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(reference_dir / "base" / "llm"), use_fast=True, local_files_only=True)
    apply_medmvl_tokenizer_rules(tok, "llama3")
    proc = MedMVLProcessor(tok, "qwen2", {"image": 2})
    long = proc(TRAIN_2D + [{"from": "human", "value": "And the heart?"}, {"from": "gpt", "value": "Normal."}], image=IMAGE, mode="train")
    short = proc(TRAIN_2D, image=IMAGE, mode="train")
    batch = proc.collate([long, short])
    eos = tok.eos_token_id
    n_short = short["input_ids"].shape[0]
    assert long["input_ids"].tolist().count(eos) == 2
    assert batch["attention_mask"][0].tolist() == [1] * long["input_ids"].shape[0]
    assert batch["attention_mask"][1].tolist() == [1] * n_short + [0] * (batch["input_ids"].shape[1] - n_short)
    assert batch["input_ids"][1, n_short:].eq(eos).all() and batch["labels"][1, n_short:].eq(IGNORE_INDEX).all()
    assert batch["labels"][0].tolist().count(eos) == 2  # both end-of-answer tokens are supervised


def test_pretrain_template_counts_its_own_placeholder(tokenizer):
    # MedM-VL's pretrain template replaces the question by "<image3d>", whatever the text says.
    proc = MedMVLProcessor(tokenizer, "pretrain_image3d", {"image3d": 2})
    caption = [{"from": "human", "value": "Describe the scan."}, {"from": "gpt", "value": "A chest CT."}]
    sample = proc(caption, image3d=VOLUME, mode="train")
    caption_ids = tokenizer("A chest CT.").input_ids
    assert sample["input_ids"].tolist() == [-201, -201] + caption_ids
    assert sample["labels"].tolist() == [IGNORE_INDEX, IGNORE_INDEX] + caption_ids
    with pytest.raises(PlaceholderError, match=r"1 <image3d> placeholder\(s\) for 0 image3d"):
        proc(caption, mode="train")
