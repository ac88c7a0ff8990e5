"""Label masking: only answer tokens contribute to the loss, checked token by token against the
reference fixture (MedM-VL's own labels for the CT train sample) and through the gradient."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medmvl_core.data.datasets import MedMVLDataset, load_records
from training.data import KeyedCollator, move_batch
from training.step import TrainStepModule, token_losses
from training.testing import INPUTS, REFERENCE


@pytest.fixture(scope="module")
def ct():
    from medmvl_core.model import load_checkpoint

    golden = json.loads((REFERENCE / "ct_chest_tiny" / "golden.json").read_text())["train_sample"]
    model, proc = load_checkpoint(str(REFERENCE / "ct_chest_tiny"))
    recs = load_records(INPUTS / "ct_finetune.json", image3d_dir=INPUTS)
    sample = MedMVLDataset(recs, proc, max_length=512)[0]
    return golden, model.eval(), proc, sample


def test_labels_equal_medmvl_token_by_token(ct):
    golden, _, _, sample = ct
    labels = sample["labels"].tolist()
    assert len(labels) == golden["llm_sequence_length"]
    assert labels == golden["llm_labels"]                       # MedM-VL's labels after splicing the image
    assert sum(v != -100 for v in labels) == golden["num_supervised_tokens"]


def test_loss_and_gradient_only_on_answer_tokens(ct):
    golden, model, proc, sample = ct
    # MedM-VL's train tensor (its recorded augmentation) instead of our own preprocessing
    sample = dict(sample, images3d=torch.from_numpy(np.load(REFERENCE / golden["image_tensor_npy"]))[None])
    batch = KeyedCollator(proc)([sample])
    inputs, _ = move_batch(batch, torch.device("cpu"), None)
    step = TrainStepModule(model)
    loss_sum, n, _ = step(**inputs)
    assert int(n) == golden["num_supervised_tokens"]
    assert float(loss_sum.detach() / n) == pytest.approx(golden["loss"], abs=1e-5)

    vis, _ = step.vision_embeds(inputs["vision"])
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   image_embeds=vis).logits.detach().requires_grad_(True)
    token_losses(logits, inputs["labels"]).sum().backward()
    has_grad = logits.grad[0].abs().sum(-1) > 0                 # position t predicts labels[t + 1]
    expected = torch.tensor([v != -100 for v in golden["llm_labels"][1:]] + [False])
    assert torch.equal(has_grad, expected)
