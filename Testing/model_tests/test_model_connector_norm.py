"""The optional connector ``output_norm`` (not in MedM-VL; default off): LayerNorm at the connector's end."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from medmvl_core.errors import ConfigError
from medmvl_core.model import MedMVLConfig, MedMVLForConditionalGeneration, load_checkpoint
from medmvl_core.model.connectors import build_connector
from medmvl_core.model.configuration import validate_connector_spec
from medmvl_core.model.loader import save_checkpoint

from test_model_tiny import build, sample_inputs, tiny_config  # noqa: E402


def _normed_model(connector: str, scale: float | None = None, seed: int = 0) -> MedMVLForConditionalGeneration:
    cfg = tiny_config("qwen2", "m3dclip", connector).to_dict()
    spec = dict(cfg["connector_image3d"], output_norm="layernorm")
    if scale is not None:
        spec["output_scale"] = scale
    cfg["connector_image3d"] = spec
    cfg.pop("model_type", None)
    torch.manual_seed(seed)
    return MedMVLForConditionalGeneration(MedMVLConfig(**cfg)).eval()


@pytest.mark.parametrize("connector", ["mlp", "spatial_pooling", "attn_pooling"])
def test_layernorm_output_is_standardised_per_token(connector):
    model = _normed_model(connector)
    con = model.connector_image3d
    x = torch.randn(2, 2 * 2 * 2, con.connector[0].in_features) * 5 + 3
    seen = []
    hook = con.connector.register_forward_hook(lambda _m, _i, out: seen.append(out))  # the MLP's output
    with torch.no_grad():
        y = con(x)
    hook.remove()
    raw = seen[0]
    assert y.shape == raw.shape and not torch.equal(y, raw)
    # reference: torch's layer_norm of the MLP output (the affine starts as weight=1, bias=0)
    assert torch.allclose(y, F.layer_norm(raw, raw.shape[-1:], eps=1e-5), atol=1e-5)
    # per token: mean 0 and (biased) variance v / (v + eps) over the hidden dim, v = the MLP output's variance
    v = raw.var(-1, unbiased=False)
    assert torch.allclose(y.mean(-1), torch.zeros(y.shape[:-1]), atol=1e-5)
    assert torch.allclose(y.var(-1, unbiased=False), v / (v + 1e-5), rtol=1e-3)


def test_output_scale_sets_the_per_token_norm():
    model = _normed_model("mlp", scale=0.07)
    con = model.connector_image3d
    assert torch.allclose(con.output_norm.weight, torch.full_like(con.output_norm.weight, 0.07))
    with torch.no_grad():
        y = con(torch.randn(1, 5, con.connector[0].in_features) * 10)
    hidden = y.shape[-1]
    # 0.07 * sqrt(hidden), up to the LayerNorm eps (which shrinks small-variance tokens by a hair)
    assert torch.allclose(y.norm(dim=-1), torch.full(y.shape[:-1], 0.07 * hidden ** 0.5), rtol=0.02)


def test_default_is_off_and_parameter_names_unchanged():
    model = build("qwen2", "m3dclip", "mlp")
    assert model.connector_image3d.output_norm is None
    assert not any("output_norm" in n for n, _ in model.named_parameters())
    normed = _normed_model("mlp")
    names = {n for n, _ in normed.named_parameters() if "output_norm" in n}
    assert names == {"connector_image3d.output_norm.weight", "connector_image3d.output_norm.bias"}


def test_normed_model_survives_save_load(tmp_path, reference_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(reference_dir / "base" / "llm"))
    model = _normed_model("mlp", scale=0.07)
    with torch.no_grad():  # make the affine non-trivial so a dropped norm would show
        model.connector_image3d.output_norm.bias.uniform_(-0.5, 0.5)
    ids, labels, pix = sample_inputs(model, "image3d")
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **pix)
    save_checkpoint(model, tok, tmp_path / "ckpt")
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config.connector_image3d["output_norm"] == "layernorm"
    assert loaded.config.connector_image3d["output_scale"] == 0.07
    with torch.no_grad():
        after = loaded(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **pix)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(loaded.connector_image3d.output_norm.bias, model.connector_image3d.output_norm.bias)


@pytest.mark.parametrize("spec,match", [
    ({"type": "mlp", "output_norm": "rmsnorm"}, "output_norm"),
    ({"type": "mlp", "output_norm": True}, "output_norm"),
    ({"type": "mlp", "output_scale": 0.1}, "needs output_norm"),
    ({"type": "mlp", "output_norm": "layernorm", "output_scale": 0}, "positive number"),
    ({"type": "mlp", "output_norm": "layernorm", "output_scale": "big"}, "positive number"),
])
def test_bad_output_norm_specs_raise_config_error(spec, match):
    with pytest.raises(ConfigError, match=match):
        validate_connector_spec(spec, "connector_image3d")


def test_unknown_output_norm_raises_in_builder_too():
    with pytest.raises(ConfigError, match="layernorm"):
        build_connector({"type": "mlp", "name": "mlp2x_gelu", "output_norm": "batchnorm"}, 8, 16, None)
