"""The processor against the MedM-VL reference fixture (template qwen2): exact prompts, ids,
labels, collated batches, and the LLM-side labels / attention masks after image expansion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medmvl_core.processing import IMAGE3D_TOKEN_INDEX, IMAGE_TOKEN_INDEX, MedMVLProcessor

CHECKPOINTS = ["ct_chest_tiny", "2d_tiny", "ct_chest_tiny_v1_schema"]
HEAD_CHECKPOINTS = ["ct_chest_tiny", "2d_tiny"]  # the v1 golden has no collated train batch / LLM masks


@pytest.fixture(scope="module", params=["slow", "fast"])
def tokenizer(request, reference_dir: Path):
    from transformers import AutoTokenizer

    # MedM-VL loads the slow tokenizer from base/llm; the fast one must give the same ids.
    return AutoTokenizer.from_pretrained(
        str(reference_dir / "base" / "llm"), use_fast=request.param == "fast", local_files_only=True
    )


def _golden(reference_dir: Path, name: str) -> dict:
    return json.loads((reference_dir / name / "golden.json").read_text())


def _conversation(reference_dir: Path, json_path: str, index: int = 0) -> list[dict]:
    return json.loads((reference_dir / json_path).read_text())[index]["conversations"]


def _kind(golden: dict) -> str:
    return "image3d" if golden["kind"] == "ct" else "image"


def _num_tokens(golden: dict) -> int:
    # Q = connector output rows, recorded by the fixture for the inference sample.
    return golden["inference_samples"][0]["projected_image_tokens_shape"][1]


def _batch_key(kind: str) -> str:
    return {"image": "images", "image3d": "images3d"}[kind]


def _dummy_pixels(kind: str) -> torch.Tensor:
    return torch.zeros(3, 4, 4) if kind == "image" else torch.zeros(3, 2, 4, 4)


def _inference_conversations(reference_dir: Path, golden: dict, ids: list[str]) -> list[list[dict]]:
    by_id = {s["id"]: s for s in golden["inference_samples"]}
    return [_conversation(reference_dir, by_id[i]["json"], by_id[i]["json_index"]) for i in ids]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_train_sample_prompt_ids_labels(reference_dir, tokenizer, name):
    golden = _golden(reference_dir, name)
    train = golden["train_sample"]
    proc = MedMVLProcessor(tokenizer, "qwen2", max_length=golden["tokenizer"]["model_max_length"])
    encoded = proc.encode(_conversation(reference_dir, train["json"]), mode="train")
    assert encoded["prompt"] == train["prompt"]
    assert encoded["input_ids"] == train["input_ids"]
    assert encoded["labels"] == train["labels"]
    assert encoded["tokenization_mismatch"] is False
    sentinel = IMAGE3D_TOKEN_INDEX if golden["kind"] == "ct" else IMAGE_TOKEN_INDEX
    assert encoded["input_ids"].count(sentinel) == 1


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_inference_samples_generation_prompt_and_ids(reference_dir, tokenizer, name):
    golden = _golden(reference_dir, name)
    proc = MedMVLProcessor(tokenizer, "qwen2")
    for sample in golden["inference_samples"]:
        conversations = _conversation(reference_dir, sample["json"], sample["json_index"])
        assert proc.prompt(conversations, add_generation_prompt=True) == sample["prompt"]
        encoded = proc.encode(conversations, mode="generate")
        assert encoded["prompt"] == sample["prompt"]
        assert encoded["input_ids"] == sample["input_ids"]


@pytest.mark.parametrize("name", HEAD_CHECKPOINTS)
def test_collated_train_batch_without_expansion(reference_dir, tokenizer, name):
    # With one placeholder token per image the expanded ids are MedM-VL's ids, so the batch must
    # equal MedM-VL's collator output exactly.
    golden = _golden(reference_dir, name)
    kind = _kind(golden)
    train = golden["train_sample"]
    proc = MedMVLProcessor(tokenizer, "qwen2", {kind: 1})
    sample = proc(_conversation(reference_dir, train["json"]), mode="train", **{kind: _dummy_pixels(kind)})
    batch = proc.collate([sample])
    assert batch["input_ids"].tolist() == train["collated"]["input_ids"]
    assert batch["attention_mask"].tolist() == [[int(v) for v in row] for row in train["collated"]["attention_mask"]]
    assert batch["labels"].tolist() == train["collated"]["labels"]
    assert batch[_batch_key(kind)].shape[0] == 1


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_expanded_train_labels_equal_llm_labels(reference_dir, tokenizer, name):
    golden = _golden(reference_dir, name)
    kind = _kind(golden)
    train = golden["train_sample"]
    proc = MedMVLProcessor(tokenizer, "qwen2", {kind: _num_tokens(golden)})
    sample = proc(_conversation(reference_dir, train["json"]), mode="train", **{kind: _dummy_pixels(kind)})
    assert sample["input_ids"].shape[0] == train["llm_sequence_length"]
    assert sample["labels"].tolist() == train["llm_labels"]
    if "llm_attention_mask" in train:
        assert sample["attention_mask"].tolist() == [int(v) for v in train["llm_attention_mask"]]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_batch_of_two_collated_ids_and_masks(reference_dir, tokenizer, name):
    golden = _golden(reference_dir, name)
    kind = _kind(golden)
    batch2 = golden["batch2"]
    conversations = _inference_conversations(reference_dir, golden, batch2["sample_ids"])

    # MedM-VL's collator (text ids, right padding with the pad id)
    proc1 = MedMVLProcessor(tokenizer, "qwen2", {kind: 1})
    batch = proc1.collate([proc1(c, **{kind: _dummy_pixels(kind)}) for c in conversations], padding_side="right")
    assert batch["input_ids"].tolist() == batch2["collated_input_ids"]
    assert batch["attention_mask"].tolist() == [[int(v) for v in r] for r in batch2["collated_attention_mask"]]

    if "llm_attention_mask" not in batch2["padding_side_left"]:
        return  # v1 golden: no LLM-side masks recorded

    # What the LLM sees after MedM-VL splices the image in and re-pads on either side
    proc = MedMVLProcessor(tokenizer, "qwen2", {kind: _num_tokens(golden)})
    samples = [proc(c, **{kind: _dummy_pixels(kind)}) for c in conversations]
    for side in ("right", "left"):
        batch = proc.collate(samples, padding_side=side)
        expected = [[int(v) for v in r] for r in batch2[f"padding_side_{side}"]["llm_attention_mask"]]
        assert batch["attention_mask"].tolist() == expected
        assert list(batch[_batch_key(kind)].shape[:1]) == batch2["image_batch_shape"][:1]
        pad = golden["tokenizer"]["pad_token_id"]
        assert ((batch["input_ids"] == pad) == (batch["attention_mask"] == 0)).all()


@pytest.mark.parametrize("name,kind", [("ct_chest_tiny", "image3d"), ("2d_tiny", "image")])
def test_pixels_through_imaging_match_dataset_tensors(reference_dir, tokenizer, monkeypatch, name, kind):
    # The processor hands files to medmvl_core.imaging with the checkpoint's spec; the batch must
    # hold MedM-VL's dataset tensors (eval mode) bit for bit, in sample order.
    import numpy as np

    from medmvl_core.imaging import spec_from_checkpoint

    monkeypatch.chdir(reference_dir)  # MedM-VL configs name base/siglip relative to this folder
    golden = _golden(reference_dir, name)
    proc = MedMVLProcessor(tokenizer, "qwen2", {kind: _num_tokens(golden)}, {kind: spec_from_checkpoint(name, kind)})
    samples, expected = [], []
    for sample in golden["inference_samples"]:
        item = json.loads((reference_dir / sample["json"]).read_text())[sample["json_index"]]
        path = reference_dir / "inputs" / item[kind][0]
        pixels = np.load(path) if path.suffix == ".npy" else str(path)
        samples.append(proc(item["conversations"], **{kind: pixels}))
        expected.append(np.load(reference_dir / sample["image_tensor_npy"]))
        geom = samples[-1]["geometry"][kind][0]  # the record maps the model grid the tensor is on
        spatial = expected[-1].shape[1:]
        assert tuple(geom.model_shape) == (tuple(spatial) if kind == "image3d" else (1, *spatial))
    batch = proc.collate(samples, padding_side="left")
    assert np.array_equal(batch[_batch_key(kind)].numpy(), np.stack(expected))
