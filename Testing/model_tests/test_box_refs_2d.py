"""The 2D half of box references: a ``convvit3d`` encoder with img_size [1, H, W] in the 2D slot
(the radiograph demo model) takes single images only, and its box head's boxes reach the answer in
MedM-VL's 2D box format ``{<x1><y1><x2><y2>}`` (0-100) in every decode path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medmvl_core.errors import ConfigError
from medmvl_core.model.box_refs import box_ref_token, box_text, refer_box_answers, resolve_box_refs
from medmvl_core.model.convvit3d import ConvViT3D

LABELS = ["nodule", "mass", "calcification", "cyst", "effusion"]
TOK = Path(__file__).resolve().parents[1] / "data" / "medmvl_reference" / "base" / "llm"
ENC2D = {"img_size": [1, 32, 32], "in_channels": 3, "stem_channels": [8, 8], "token_pool": [1, 2, 2],
         "hidden_size": 32, "mlp_dim": 64, "num_layers": 1, "num_heads": 2, "dense_stage": 2,
         "cls_pool": "max", "dense_tokens": 5, "label_features": True, "box_refs": True}
SPEC = {"kind": "image", "normalize": {"type": "image_processor", "image_size": 32, "resample": 3,
                                       "rescale": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3}}


def test_one_slice_encoder_takes_2d_images():
    torch.manual_seed(0)
    enc = ConvViT3D(**ENC2D).eval()
    assert enc.grid == [1, 4, 4] and enc.dense_grid == [1, 8, 8]     # depth is never pooled
    x = torch.rand(2, 3, 32, 32)
    a, b = enc.forward_parts(x), enc.forward_parts(x[:, :, None])
    assert torch.equal(a["output"], b["output"]) and a["output"].shape == (2, 17, 32 + 5)
    _, boxes = enc.find_boxes(x)
    assert boxes.shape == (2, 5, 6)
    with pytest.raises(ConfigError, match="divisible"):
        ConvViT3D(**dict(ENC2D, img_size=[2, 32, 32]))
    with pytest.raises(ConfigError, match="spatial size"):
        enc.find_boxes(torch.rand(1, 3, 16, 16))


def test_2d_box_text_and_training_rows():
    # [z1, y1, x1, z2, y2, x2] in 0-1 -> {<x1><y1><x2><y2>} in 0-100 (z, the one slice, is dropped)
    assert box_text([0.0, 0.2, 0.104, 1.0, 0.6, 0.5], "image") == "{<10><20><50><60>}"
    assert box_text([0.0, 0.2, 0.1, 1.0, 0.6, 0.5], "image3d") == "[0.000, 0.200, 0.100, 1.000, 0.600, 0.500]"
    boxes = torch.zeros(5, 6)
    boxes[4] = torch.tensor([0, 0.5, 0.25, 1, 1, 0.75])
    assert resolve_box_refs("<|box:effusion|>", boxes, LABELS, "image") == "{<25><50><75><100>}"
    conv = [{"from": "human", "value": "<image>\nWhere is the nodule in this image? Please output the bounding box."},
            {"from": "gpt", "value": "{<23><45><30><52>}"},
            {"from": "human", "value": "What is in the region {<23><45><30><52>}? Describe it."},
            {"from": "gpt", "value": "In the left lower lobe: a nodule."}]
    out, n = refer_box_answers(conv, LABELS)
    assert n == 1 and out[1]["value"] == box_ref_token("nodule") and out[2:] == conv[2:]


def _tiny_2d_model(box_refs=LABELS):
    from medmvl_core.model import MedMVLConfig, MedMVLForConditionalGeneration

    cfg = MedMVLConfig(
        llm_config={"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 832,
                    "max_position_embeddings": 512, "tie_word_embeddings": True},
        encoder_image={"type": "convvit3d", "select_layer": -1, "select_feature": "cls_patch", "config": dict(ENC2D)},
        connector_image={"type": "mlp", "name": "mlp2x_gelu"}, template="qwen2", max_length=512,
        preprocessing={"image": SPEC}, box_refs=box_refs)
    torch.manual_seed(0)
    return MedMVLForConditionalGeneration(cfg).eval()


def test_2d_model_takes_images_only_and_resolves_2d_boxes():
    from medmvl_core.engine.engine import supported_kinds

    model = _tiny_2d_model()
    assert model.box_ref_kind == "image" and supported_kinds(model) == ("image",)
    with pytest.raises(ConfigError, match="single images only"):
        model.num_image_tokens("image3d")
    imgs = torch.rand(2, 3, 32, 32)
    want = model.encoder_image.encoder.vision_encoder.find_boxes(imgs)[1]
    texts = model.resolve_box_refs(["<|box:mass|>", "No mass."], imgs)
    assert texts == [box_text(want[0, 1].tolist(), "image"), "No mass."] and texts[0].startswith("{<")


def test_engine_maps_a_2d_reference_to_pixels(monkeypatch):
    """The worker's engine on a radiograph: the reference token becomes a 2D box, mapped to the
    uploaded image's pixels like any 2D box answer."""
    from transformers import AutoTokenizer

    import medmvl_core.engine.decode as decode
    from medmvl_core.engine import Engine
    from medmvl_core.engine.tasks import map_box
    from medmvl_core.imaging import Volume
    from medmvl_core.model.loader import make_processor
    from medmvl_core.processing.boxes import parse_box_2d

    model = _tiny_2d_model()
    proc = make_processor(model, AutoTokenizer.from_pretrained(str(TOK), trust_remote_code=False))
    ref = proc.tokenizer.convert_tokens_to_ids(box_ref_token("cyst"))
    eos = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    script = iter([ref, eos])
    monkeypatch.setattr(decode, "choose_token", lambda logits, params, generator=None: torch.tensor([next(script)]))
    engine = Engine(model, proc, decode_mode="plain")
    img = Volume(np.random.RandomState(0).randint(0, 255, (1, 64, 48)).astype(np.uint8), spacing=(0.5, 0.25, 1.0),
                 modality="XR")
    s = engine.create_session(img)
    ans = engine.answer(img, "Where is the cyst in this image? Please output the bounding box.", session=s)
    entry = engine.prepare(img, vhash=s.volume_id)
    want = box_text(model.find_boxes(entry.tensor[None])[0, 3].tolist(), "image")
    assert ans.text.strip() == want
    assert len(ans.boxes) == 1
    expected = map_box(list(parse_box_2d(want)), entry.geom, img, "image")
    assert ans.boxes[0]["voxel"] == expected["voxel"] and len(ans.boxes[0]["voxel"]) == 4
