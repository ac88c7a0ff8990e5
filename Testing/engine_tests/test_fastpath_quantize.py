"""8-bit / 4-bit LLM weights (bitsandbytes CPU backend): a forward runs and roughly agrees."""

from __future__ import annotations

import copy

import pytest
import torch

from medmvl_core.engine.fast_decode import FastDecoder
from medmvl_core.engine.quantize import QuantizationError, quantize_model, weight_bytes


@pytest.fixture(scope="module")
def model(reference_dir):
    from medmvl_core.model import load_checkpoint

    torch.set_num_threads(2)
    m, _ = load_checkpoint(reference_dir / "ct_chest_tiny")
    return m.eval()


@pytest.mark.parametrize("mode,min_cos", [("8bit", 0.99), ("4bit", 0.9)])
def test_quantized_forward_agrees(model, mode, min_cos):
    pytest.importorskip("bitsandbytes")
    ids = torch.randint(0, 800, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.llm(input_ids=ids).logits
    q = quantize_model(copy.deepcopy(model), mode, device="cpu")
    layer = q.llm.model.layers[0].self_attn.q_proj
    assert type(layer).__module__.startswith("bitsandbytes")
    assert type(q.llm.lm_head) is torch.nn.Linear  # the head stays float
    assert weight_bytes(q) < weight_bytes(model)
    with torch.no_grad():
        out = q.llm(input_ids=ids).logits
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.equal(out, ref)  # the weights really changed
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > min_cos
    dec = FastDecoder(q, buckets=(64,))  # the fast path runs on the quantized model
    lg = dec.prefill(q.llm.get_input_embeddings()(ids), max_new_tokens=3)
    assert torch.isfinite(dec.step(int(lg.argmax(-1)[0]))).all()


def test_bad_mode_and_none(model):
    with pytest.raises(QuantizationError, match="not known"):
        quantize_model(model, "3bit")
    assert quantize_model(model, "none") is model
