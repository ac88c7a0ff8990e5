"""``text_digits``: a 3D connector option that adds, to each detection token of a ``convvit3d``
encoder, the LLM's embedding of the digit that token shows (scaled to the detection tokens' length)."""

from __future__ import annotations

import pytest
import torch

from medmvl_core.errors import ConfigError

LLM = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
       "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 40, "max_position_embeddings": 256,
       "tie_word_embeddings": True}
ENC = {"img_size": [16, 32, 32], "stem_channels": [4, 8], "token_pool": [1, 2, 2], "hidden_size": 32,
       "mlp_dim": 64, "num_layers": 1, "num_heads": 2, "dense_stage": 1, "dense_tokens": 3,
       "cls_pool": "max", "detections": True}
DIGIT_IDS = list(range(20, 30))


def _model(enc=ENC, text_digits=DIGIT_IDS, vocab=40):
    from medmvl_core.model import MedMVLConfig, MedMVLForConditionalGeneration

    torch.manual_seed(0)
    con = {"type": "mlp", "name": "mlp2x_gelu"} | ({"text_digits": text_digits} if text_digits is not None else {})
    cfg = MedMVLConfig(llm_config=LLM | {"vocab_size": vocab},
                       encoder_image3d={"type": "convvit3d", "select_layer": -1, "select_feature": "cls_patch",
                                        "config": enc},
                       connector_image3d=con)
    return MedMVLForConditionalGeneration(cfg).eval()


def test_each_detection_token_gets_the_embedding_of_the_digit_it_shows():
    model = _model()
    vit = model.encoder_image3d.encoder.vision_encoder
    x = torch.rand(2, 1, 16, 32, 32)
    with torch.no_grad():
        vit.dense_head.weight.normal_(0, 3.0)
        vit.box_head[-1].weight.normal_(0, 2.0)  # boxes spread over the volume
        feats = model.vision_features("image3d", x)
        plain = model.connector_image3d(feats)
        got = model.project("image3d", feats)
        boxes = vit.forward_parts(x)["detections"][1]                      # [B, K, 6], the peak boxes
    n = vit.num_detections
    assert n == 3 * 6 * 2 and got.shape == plain.shape == (2, 65 + n, 32)
    assert torch.equal(got[:, :65], plain[:, :65])                          # patch and summary tokens unchanged
    # independently: the box as its text reads, "0.375" -> digits 3, 7 for (label, coordinate)
    digits = torch.tensor([[[int(f"{v:.3f}"[2 + j]) for v in boxes[b, k].tolist() for j in range(2)]
                            for k in range(3)] for b in range(2)]).view(2, n)
    assert len(set(digits.flatten().tolist())) > 5                          # a real spread: could fail
    emb = model.llm.get_input_embeddings().weight[torch.tensor(DIGIT_IDS)[digits]]   # [2, n, 32]
    det = plain[:, 65:]
    scale = det.norm(dim=-1).mean() / emb.norm(dim=-1).mean()
    assert torch.allclose(got[:, 65:] - det, scale * emb, atol=1e-5)
    # gradients reach the LLM's embedding rows of the digits shown (the text and image share them)
    model.zero_grad()
    model.project("image3d", feats)[:, 65:].sum().backward()
    grad_rows = model.llm.get_input_embeddings().weight.grad.abs().sum(-1).nonzero().flatten().tolist()
    assert set(grad_rows) == {DIGIT_IDS[d] for d in digits.flatten().tolist()}


def test_text_digits_errors():
    from medmvl_core.model.configuration import validate_connector_spec

    for bad in ([1, 2, 3], list(range(9)) + [-1], [True] * 10, "digits", list(range(9)) + [2.5]):
        with pytest.raises(ConfigError, match="token ids of the digits 0-9"):
            validate_connector_spec({"type": "mlp", "text_digits": bad}, "connector_image3d")
    with pytest.raises(ConfigError, match="needs a 3D encoder with detection tokens"):
        _model(enc=ENC | {"detections": False})
    with pytest.raises(ConfigError, match=r"outside the LLM's vocabulary \(24\)"):
        _model(vocab=24)


def test_training_config_text_digits_true_takes_the_tokenizers_digit_ids(tmp_path):
    from transformers import AutoTokenizer

    from medmvl_core.data.phantom_tokenizer import train_phantom_tokenizer
    from training.build import digit_token_ids

    train_phantom_tokenizer(["A nodule at [0.125, 0.467, 0.389, 0.250, 0.583, 0.490]."] * 20, tmp_path / "tok",
                            vocab_size=300)
    ids = digit_token_ids(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert [tok.decode([i]) for i in ids] == list("0123456789")
    assert tok.encode("[0.125,", add_special_tokens=False)[1:6] == [ids[0], tok.convert_tokens_to_ids("."), ids[1], ids[2], ids[5]]
    with pytest.raises(ConfigError, match="needs model.tokenizer"):
        digit_token_ids(tmp_path / "missing")
