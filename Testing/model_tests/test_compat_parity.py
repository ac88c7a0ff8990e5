"""Parity with the original MedM-VL code on the reference fixture (golden values from MedM-VL itself).

Every checkpoint is loaded from a copy of the fixture in a temporary folder while the working
directory is elsewhere (so the relative base paths resolve against the checkpoint's parent), both
directly and after `medmvl convert`. Inputs are golden ids/labels (the single sentinel expanded to
N copies here) and golden image tensors, so these tests do not depend on the processor or imaging.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medmvl_core.model.loader import load_model_and_tokenizer

CHECKPOINTS = ["2d_tiny", "ct_chest_tiny", "ct_chest_tiny_v1_schema"]
ROUTES = ["direct", "converted"]
PAD_ID = 797


def expand(ids: list[int], labels: list[int] | None, n: int) -> tuple[list[int], list[int]]:
    """Replace each negative sentinel by n copies (label -100), as our processor does."""
    out_ids, out_lab = [], []
    for i, tok in enumerate(ids):
        if tok < 0:
            out_ids += [tok] * n
            out_lab += [-100] * n
        else:
            out_ids.append(tok)
            out_lab.append(labels[i] if labels is not None else -100)
    return out_ids, out_lab


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def fixture_copy(reference_dir: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("copy") / "fixture"
    for name in ["base", *CHECKPOINTS]:
        shutil.copytree(reference_dir / name, root / name, ignore=shutil.ignore_patterns("golden", "golden.json"))
    return root


@pytest.fixture(scope="module")
def models(fixture_copy: Path, tmp_path_factory) -> dict:
    """(name, route) -> (model, tokenizer), loaded with the CWD in an unrelated folder."""
    from medmvl_core.commands import convert

    elsewhere = tmp_path_factory.mktemp("elsewhere")
    out_root = tmp_path_factory.mktemp("converted")
    mp = pytest.MonkeyPatch()
    mp.chdir(elsewhere)
    loaded = {}
    try:
        for name in CHECKPOINTS:
            loaded[(name, "direct")] = load_model_and_tokenizer(fixture_copy / name)
            dst = out_root / name
            args = argparse.Namespace(src=str(fixture_copy / name), dst=str(dst), dtype=None, max_shard_size="5GB")
            assert convert.run(args) == 0
            loaded[(name, "converted")] = load_model_and_tokenizer(dst)
    finally:
        mp.undo()
    return loaded


def _golden(reference_dir: Path, name: str) -> dict:
    return json.loads((reference_dir / name / "golden.json").read_text())


def _kind(g: dict) -> str:
    return "image" if g["kind"] == "2d" else "image3d"


def _pixels(reference_dir: Path, g: dict, sample: dict) -> dict:
    x = torch.from_numpy(np.load(reference_dir / sample["image_tensor_npy"]))[None]
    return {"images": x} if _kind(g) == "image" else {"images3d": x}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_train_sample_logits_loss_labels(models, reference_dir, name, route):
    model, _ = models[(name, route)]
    g = _golden(reference_dir, name)
    ts = g["train_sample"]
    n = model.num_image_tokens(_kind(g))
    ids, labels = expand(ts["input_ids"], ts["labels"], n)
    assert len(ids) == ts["llm_sequence_length"]
    gold_labels = ts["llm_labels"][0] if isinstance(ts["llm_labels"][0], list) else ts["llm_labels"]
    assert labels == gold_labels
    ids_t, lab_t = torch.tensor([ids]), torch.tensor([labels])
    with torch.no_grad():
        out = model(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), labels=lab_t, **_pixels(reference_dir, g, ts))
    gold = np.load(reference_dir / ts["logits_npy"])
    assert out.logits.shape == gold.shape
    assert rel_err(out.logits.numpy(), gold) <= 1e-4
    assert abs(out.loss.item() - ts["loss"]) <= 1e-5
    gold_argmax = ts["argmax_ids"][0] if isinstance(ts["argmax_ids"][0], list) else ts["argmax_ids"]
    assert out.logits[0].argmax(-1).tolist() == gold_argmax


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_inference_samples_features_logits_greedy(models, reference_dir, name, route):
    model, tokenizer = models[(name, route)]
    g = _golden(reference_dir, name)
    kind = _kind(g)
    n = model.num_image_tokens(kind)
    for s in g["inference_samples"]:
        ids, _ = expand(s["input_ids"], None, n)
        assert len(ids) == s["llm_sequence_length"]
        pix = _pixels(reference_dir, g, s)
        x = next(iter(pix.values()))
        with torch.no_grad():
            if "vision_features_npy" in s:
                feats = model.vision_features(kind, x)
                gold = np.load(reference_dir / s["vision_features_npy"])
                assert list(feats.shape) == list(gold.shape)
                assert rel_err(feats.numpy(), gold) <= 1e-4
            proj = model.encode_images(**pix)
            gold = np.load(reference_dir / s["projected_image_tokens_npy"])
            assert list(proj.shape) == list(gold.shape)
            assert rel_err(proj.numpy(), gold) <= 1e-4
            ids_t = torch.tensor([ids])
            logits = model(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), image_embeds=proj).logits
            if "prompt_logits_npy" in s:
                gold = np.load(reference_dir / s["prompt_logits_npy"])
                assert rel_err(logits.numpy(), gold) <= 1e-4
            else:
                gold = np.load(reference_dir / s["last_position_logits_npy"])
                assert rel_err(logits[:, -1].numpy(), gold) <= 1e-4
            new = model.generate(ids_t, torch.ones_like(ids_t), **pix, **s["generate_kwargs"])
        gold_ids = s["generated_ids"][0] if isinstance(s["generated_ids"][0], list) else s["generated_ids"]
        assert new[0].tolist() == gold_ids
        text = s["generated_text"][0] if isinstance(s["generated_text"], list) else s["generated_text"]
        assert tokenizer.batch_decode(new, skip_special_tokens=True)[0] == text


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_batch_of_two_greedy(models, reference_dir, name, route, side):
    """Left padding (what inference.py uses for batches) and right padding (MedM-VL's quirk 4)."""
    model, _ = models[(name, route)]
    g = _golden(reference_dir, name)
    n = model.num_image_tokens(_kind(g))
    seqs = [expand(s["input_ids"], None, n)[0] for s in g["inference_samples"]]
    pixels = [next(iter(_pixels(reference_dir, g, s).values())) for s in g["inference_samples"]]
    width = max(map(len, seqs))
    ids, mask = [], []
    for seq in seqs:
        pad = width - len(seq)
        ids.append([PAD_ID] * pad + seq if side == "left" else seq + [PAD_ID] * pad)
        mask.append([0] * pad + [1] * len(seq) if side == "left" else [1] * len(seq) + [0] * pad)
    key = "images" if _kind(g) == "image" else "images3d"
    with torch.no_grad():
        new = model.generate(torch.tensor(ids), torch.tensor(mask), **{key: torch.cat(pixels)},
                             **g["inference_samples"][0]["generate_kwargs"])
    assert new.tolist() == g["batch2"][f"padding_side_{side}"]["generated_ids"]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_effective_settings_match_medmvl(models, reference_dir, name):
    """Attention implementation and lm_head tying as MedM-VL runs them after reload."""
    g = _golden(reference_dir, name)
    for route in ROUTES:
        model, tokenizer = models[(name, route)]
        assert model.llm.config._attn_implementation == g["effective_attn_implementation"]["llm"]
        assert model.encoder_image.encoder.config._attn_implementation == g["effective_attn_implementation"]["vision_encoder"]
        tied = model.llm.lm_head.weight.data_ptr() == model.llm.get_input_embeddings().weight.data_ptr()
        assert tied == g["lm_head"]["tied_in_this_checkpoint"]
        assert len(tokenizer) == g["tokenizer"]["len"]
        assert tokenizer.pad_token_id == g["tokenizer"]["pad_token_id"]
        assert tokenizer.eos_token_id == g["tokenizer"]["eos_token_id"]
        assert tokenizer.padding_side == g["tokenizer"]["padding_side"]
        assert tokenizer.model_max_length == g["tokenizer"]["model_max_length"]
        gen = model.llm.generation_config  # what inference.py passes to generate
        assert gen.eos_token_id == g["tokenizer"]["eos_token_id"] and gen.pad_token_id == g["tokenizer"]["pad_token_id"]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_prompt_ids_from_tokenizer(models, reference_dir, name):
    """The tokenizer loaded with the checkpoint gives MedM-VL's ids for the prompt text pieces."""
    _, tokenizer = models[(name, "direct")]
    g = _golden(reference_dir, name)
    s = g["inference_samples"][0]
    sentinel = "<image>" if _kind(g) == "image" else "<image3d>"
    before, after = s["prompt"].split(sentinel)
    ids = tokenizer(before, add_special_tokens=False).input_ids + [-1] + tokenizer(after, add_special_tokens=False).input_ids
    gold = [-1 if t < 0 else t for t in s["input_ids"]]
    assert ids == gold
