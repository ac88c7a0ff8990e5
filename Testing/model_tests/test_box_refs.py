"""Box references (medmvl_core/model/box_refs.py): the LLM names a finding's box by one token and
every decode path shows the encoder box head's box in its place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medmvl_core.errors import ConfigError
from medmvl_core.model.box_refs import add_box_ref_tokens, box_ref_token, refer_box_answers, resolve_box_refs
from medmvl_core.processing.boxes import format_box_3d as format_box
from medmvl_core.model.convvit3d import ConvViT3D

LABELS = ["nodule", "mass", "calcification", "cyst", "effusion"]
TOK = Path(__file__).resolve().parents[1] / "data" / "medmvl_reference" / "base" / "llm"  # a tokenizer without them
ENC = {"img_size": [16, 32, 32], "in_channels": 1, "stem_channels": [8, 8], "token_pool": [1, 2, 2],
       "hidden_size": 32, "mlp_dim": 64, "num_layers": 1, "num_heads": 2, "dense_stage": 2,
       "cls_pool": "max", "dense_tokens": 5, "label_features": True, "box_refs": True}


def _turns(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def test_box_answers_become_the_named_labels_reference():
    conv = (_turns("<image3d> Where is the cyst in this image? Please output the bounding box.",
                   "[0.172, 0.469, 0.375, 0.281, 0.583, 0.490]")
            + _turns("Where is the pleural effusion?", "[0.1, 0.2, 0.3, 0.4, 0.5, 0.6].")
            + _turns("Is there a nodule or a mass?", "[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]")   # two labels: kept
            + _turns("Where is the lesion?", "[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]")            # no label: kept
            + _turns("Where is the nodule in this X-ray?", "[0.1, 0.2, 0.3, 0.4]")        # a 2D box: kept
            + _turns("Where is the mass?", "A mass at [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]."))  # not only a box: kept
    out, n = refer_box_answers(conv, LABELS)
    assert n == 2
    assert out[1]["value"] == "<|box:cyst|>" and out[3]["value"] == "<|box:effusion|>"
    assert out[4:] == conv[4:] and out[0] == conv[0]
    assert conv[1]["value"].startswith("[0.172")  # the input rows are not modified


def test_resolve_writes_the_labels_box_in_the_models_format():
    boxes = torch.zeros(5, 6)
    boxes[3] = torch.tensor([0.1724, 0.46851, 0.375, 0.28, 0.583, 0.49])
    text = resolve_box_refs("It is at <|box:cyst|>", boxes, LABELS)
    assert text == "It is at [0.172, 0.469, 0.375, 0.280, 0.583, 0.490]"
    boxes[0] = torch.tensor([0, 0.0625, 0.125, 0.25, 0.5, 1])
    assert resolve_box_refs("<|box:nodule|>", boxes, LABELS) == "[0.000, 0.062, 0.125, 0.250, 0.500, 1.000]"
    assert resolve_box_refs("No box here.", boxes, LABELS) == "No box here."


def test_reference_tokens_are_one_token_each_and_survive_decoding():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOK), trust_remote_code=False)
    n0 = len(tok)
    assert add_box_ref_tokens(tok, LABELS, n0 + 5) == 5 and len(tok) == n0 + 5
    assert add_box_ref_tokens(tok, LABELS, n0 + 5) == 0  # idempotent
    ids = tok("Found: <|box:calcification|>")["input_ids"]
    assert ids[-1] == tok.convert_tokens_to_ids(box_ref_token("calcification"))
    assert tok.decode(ids, skip_special_tokens=True) == "Found: <|box:calcification|>"
    small = AutoTokenizer.from_pretrained(str(TOK), trust_remote_code=False)
    with pytest.raises(ConfigError, match="vocab_size"):
        add_box_ref_tokens(small, LABELS, len(small) + 2)


def test_encoder_box_refs_adds_no_tokens_and_finds_the_detections_boxes():
    torch.manual_seed(0)
    enc = ConvViT3D(**ENC)
    x = torch.rand(2, 1, 16, 32, 32)
    parts = enc.forward_parts(x)
    assert enc.num_detections == 0 and parts["output"].shape[1] == 1 + 4 * 4 * 4
    probs, boxes = enc.find_boxes(x)
    assert torch.allclose(probs, parts["detections"][0]) and torch.allclose(boxes, parts["detections"][1])
    assert boxes.shape == (2, 5, 6) and bool((boxes[..., :3] <= boxes[..., 3:]).all())
    with pytest.raises(ConfigError, match="not both"):
        ConvViT3D(**dict(ENC, detections=True))
    with pytest.raises(ConfigError, match="dense_tokens"):
        ConvViT3D(**dict(ENC, dense_tokens=0, label_features=False))
    with pytest.raises(ConfigError, match="no box head"):
        ConvViT3D(**dict(ENC, box_refs=False)).find_boxes(x)


def _tiny_model(box_refs=LABELS, enc=ENC):
    from medmvl_core.model import MedMVLConfig, MedMVLForConditionalGeneration

    cfg = MedMVLConfig(
        llm_config={"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 832,
                    "max_position_embeddings": 512, "tie_word_embeddings": True},
        encoder_image3d={"type": "convvit3d", "select_layer": -1, "select_feature": "cls_patch", "config": dict(enc)},
        connector_image3d={"type": "mlp", "name": "mlp2x_gelu"}, template="qwen2", max_length=512,
        preprocessing={"image3d": {"kind": "volume", "hu_window": [-160, 240], "crop_foreground": False,
                                   "size": [16, 32, 32], "orientation": "LPS", "cast_uint8": False, "channels": 1,
                                   "normalize": {"type": "minmax"}}},
        box_refs=box_refs)
    torch.manual_seed(0)
    return MedMVLForConditionalGeneration(cfg).eval()


def test_model_config_checks_box_refs():
    with pytest.raises(ConfigError, match="box_refs"):
        _tiny_model(box_refs=["nodule", "nodule"])
    with pytest.raises(ConfigError, match="box_refs: true"):
        _tiny_model(enc=dict(ENC, box_refs=False))
    with pytest.raises(ConfigError, match="dense_tokens 4"):
        _tiny_model(box_refs=LABELS[:4])
    with pytest.raises(ConfigError, match="non-empty list"):
        _tiny_model(box_refs="nodule")
    from medmvl_core.model import MedMVLConfig

    with pytest.raises(ConfigError, match="needs a convvit3d encoder"):
        MedMVLConfig(llm_config={"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1},
                     encoder_image3d={"type": "m3dclip", "config": {"in_channels": 1, "img_size": [16, 32, 32],
                                                                    "patch_size": [4, 8, 8], "hidden_size": 32}},
                     connector_image3d={"type": "mlp", "name": "mlp2x_gelu"}, box_refs=LABELS)


def test_model_resolves_references_per_volume():
    model = _tiny_model()
    vols = torch.rand(2, 1, 16, 32, 32)
    texts = model.resolve_box_refs(["<|box:mass|>", "No mass."], vols)
    want = model.encoder_image3d.encoder.vision_encoder.find_boxes(vols)[1]
    assert texts == [format_box(want[0, 1].tolist()), "No mass."]
    with pytest.raises(ConfigError, match="one image per answer"):
        model.resolve_box_refs(["<|box:mass|>"], vols)


def test_engine_shows_the_box_and_keeps_the_reference_in_the_conversation(monkeypatch):
    """The engine answers with the box head's box in place of the token the model wrote, maps it to
    the volume like any box answer, and continues the conversation from the token."""
    from transformers import AutoTokenizer

    import medmvl_core.engine.decode as decode
    from medmvl_core.engine import Engine
    from medmvl_core.imaging import Volume
    from medmvl_core.model.loader import make_processor

    model = _tiny_model()
    proc = make_processor(model, AutoTokenizer.from_pretrained(str(TOK), trust_remote_code=False))
    ref = proc.tokenizer.convert_tokens_to_ids(box_ref_token("nodule"))
    eos = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    script = iter([ref, eos, ref, eos])
    monkeypatch.setattr(decode, "choose_token", lambda logits, params, generator=None:
                        torch.tensor([next(script)]))  # the model "writes" the reference, then stops
    engine = Engine(model, proc, decode_mode="plain")
    vol = Volume(np.random.RandomState(0).randn(20, 40, 40).astype(np.float32) * 100, spacing=(2.0, 2.0, 4.0),
                 modality="CT")
    s = engine.create_session(vol)
    ans = engine.answer(vol, "Where is the nodule?", session=s)
    entry = engine.prepare(vol, vhash=s.volume_id)  # the cached input the answer used
    want = model.find_boxes(entry.tensor[None])[0, 0]
    assert ans.text.strip() == format_box(want.tolist())
    assert ans.boxes, "the resolved box is mapped to the volume like any box in an answer"
    assert s.turns[-1][1] == "<|box:nodule|>"
    follow = engine.answer(vol, "And again?", session=s)  # the next prompt holds the token, not the text
    assert follow.text.strip() == ans.text.strip()
    ids = engine.encode_prompt(engine.conversation(s.turns[:1], "x", "image3d"), "image3d")
    assert ref in ids


def test_stage2_run_trains_box_answers_as_references(tmp_path):
    """A medmvl-train run with model.box_refs: box answers become the label's token in the training
    labels, and the checkpoint keeps the labels and the tokens (its tokenizer) for inference."""
    import json

    import yaml

    from medmvl_core.model import load_checkpoint
    from training.config import load_config
    from training.data import load_train_data
    from training.recipe import run
    from training.testing import INPUTS, REPO_ROOT

    rows = [{"id": f"r{i}", "image3d": ["ct_volume.npy" if i % 2 else "ct_volume_b.npy"],
             "conversations": [{"from": "human", "value": f"<image3d>\nWhere is the {LABELS[i]}? Please output the "
                                                           "bounding box."},
                               {"from": "gpt", "value": "[0.100, 0.200, 0.300, 0.400, 0.500, 0.600]"},
                               {"from": "human", "value": "Is there a mass?"}, {"from": "gpt", "value": "No."}]}
            for i in range(4)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    cfg = {"name": "box_refs", "seed": 0,
           "model": {"llm": {"config": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
                                        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                        "vocab_size": 832, "max_position_embeddings": 512,
                                        "tie_word_embeddings": True}},
                     "tokenizer": str(TOK), "box_refs": LABELS,
                     "encoder_image3d": {"type": "convvit3d", "config": ENC,
                                         "options": {"select_layer": -1, "select_feature": "cls_patch"}},
                     "connector_image3d": {"type": "mlp", "options": {"name": "mlp2x_gelu"}},
                     "template": "qwen2", "max_length": 512},
           "tune": {"llm": "full", "encoder_image3d": "frozen", "connector_image3d": "full"},
           "data": {"datasets": [{"path": str(tmp_path / "rows.json"), "image3d_dir": str(INPUTS)}]},
           "train": {"output_dir": str(tmp_path / "run"), "epochs": 1, "micro_batch_size": 2, "lr": 1e-3,
                     "warmup_ratio": 0.0, "precision": "fp32", "save_every": 0},
           "log": {"every": 1, "tensorboard": False, "progress_bar": False}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    c = load_config(tmp_path / "cfg.yaml")
    run(c)
    model, proc = load_checkpoint(str(tmp_path / "run" / "final"))
    assert model.config.box_refs == LABELS
    ids = [proc.tokenizer.convert_tokens_to_ids(box_ref_token(l)) for l in LABELS]
    assert len(set(ids)) == 5 and proc.tokenizer.unk_token_id not in ids
    data = load_train_data(c, proc, 512, box_refs=model.config.box_refs)
    for rec, i in zip(data.records, range(4)):
        enc = data.encodings.get(rec, c.data.independent_turns)
        labels = [t for t in enc["labels"].tolist() if t != -100]
        assert ids[i] in labels and rec.conversations[1]["value"] == box_ref_token(LABELS[i])
    assert REPO_ROOT.is_dir()
