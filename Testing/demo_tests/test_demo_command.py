"""``medmvl demo``: end to end through a real worker on a tiny (untrained) checkpoint, and its errors."""

from __future__ import annotations

import json
import re

import pytest

from medmvl_core.cli import main
from medmvl_core.data.phantoms import make_ct_phantom


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A small random model in our format with the demo's preprocessing and a phantom tokenizer."""
    import torch

    from medmvl_core.data.phantom_dataset import phantom_entries
    from medmvl_core.data.phantom_tokenizer import train_phantom_tokenizer
    from medmvl_core.model import MedMVLConfig, MedMVLForConditionalGeneration
    from medmvl_core.model.loader import save_checkpoint
    from medmvl_core.processing import MedMVLProcessor

    root = tmp_path_factory.mktemp("demo_ckpt")
    texts = [t["value"] for i in range(6)
             for t in phantom_entries(make_ct_phantom(5, "train", i), "x", None, True)[0]["conversations"]]
    tok = train_phantom_tokenizer(texts * 4, root / "tok", vocab_size=300)
    spec = {"kind": "volume", "hu_window": [-1000, 400], "crop_foreground": False, "size": [32, 64, 64],
            "orientation": "LPS", "cast_uint8": False, "channels": 1, "normalize": {"type": "minmax"}}
    torch.manual_seed(0)
    cfg = MedMVLConfig(
        llm_config={"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": len(tok),
                    "max_position_embeddings": 1024},
        encoder_image3d={"type": "m3dclip", "select_feature": "patch",
                         "config": {"img_size": [32, 64, 64], "patch_size": [8, 16, 16], "hidden_size": 32,
                                    "mlp_dim": 64, "num_layers": 1, "num_heads": 2, "in_channels": 1}},
        connector_image3d={"type": "mlp", "name": "mlp2x_gelu"},
        preprocessing={"image3d": spec}, max_length=1024)
    model = MedMVLForConditionalGeneration(cfg).eval()
    proc = MedMVLProcessor(tok, "qwen2", {"image3d": model.num_image_tokens("image3d")}, {"image3d": spec},
                           max_length=1024)
    out = root / "ckpt"
    save_checkpoint(model, proc, out)
    return out


def test_demo_runs_through_a_worker_and_prints_truth(tiny_checkpoint, capsys):
    assert main(["demo", "--checkpoint", str(tiny_checkpoint), "--n", "1", "--start", "1",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    ph = make_ct_phantom(0, "test", 1)
    assert ph.id in out
    assert "REPORT" in out and "DESCRIBE" in out and "Summary over 1 unseen phantoms" in out
    # every answer line is followed or accompanied by the truth
    assert out.count("truth:") >= 4
    truth_report = re.search(r"REPORT.*\n  model: .*\n  truth: (.*)", out).group(1)
    assert truth_report.startswith("Findings: ")
    for f in ph.findings:
        assert f.location in out
    if ph.findings:
        assert "IoU" in out


def test_demo_without_checkpoint_says_how_to_rebuild(tmp_path, capsys):
    assert main(["demo", "--checkpoint", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert "config.json missing" in err and "Resources/demo_model/README.md" in err  # the model card says how


def test_demo_rejects_kind_the_checkpoint_lacks(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"encoder_image3d": {"type": "m3dclip"},
                                                      "preprocessing": {"image3d": {}}}))
    assert main(["demo", "--checkpoint", str(tmp_path), "--kind", "xray"]) == 1
    assert "does not take xray" in capsys.readouterr().err
