"""The 3D ViTs against their references: MONAI's ViT (M3D-CLIP's vision encoder is MONAI 1.3's) and
an element-wise statement of MedM-CLIP's einops patch layout; connectors against direct formulas."""

from __future__ import annotations

import pytest
import torch

from medmvl_core.model.connectors import build_connector
from medmvl_core.model.vit3d import M3DViT, MedMViT

CFG = dict(in_channels=1, img_size=[8, 16, 16], patch_size=[4, 8, 8], hidden_size=16, mlp_dim=32, num_layers=2,
           num_heads=2, pos_embed="perceptron")


@pytest.mark.parametrize("proj", ["perceptron", "conv"])
def test_m3d_vit_matches_monai_vit(proj):
    monai_vit = pytest.importorskip("monai.networks.nets").ViT
    torch.manual_seed(0)
    ref = monai_vit(in_channels=1, img_size=(8, 16, 16), patch_size=(4, 8, 8), hidden_size=16, mlp_dim=32,
                    num_layers=2, num_heads=2, proj_type=proj, classification=True).eval()
    with torch.no_grad():  # MONAI initialises these to zeros; make them matter
        ref.cls_token.normal_()
        ref.patch_embedding.position_embeddings.normal_()
    ours = M3DViT.from_config({**CFG, "pos_embed": proj}).eval()
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("classification_head")}
    result = ours.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 1, 8, 16, 16)
    with torch.no_grad():
        _, ref_hidden = ref(x)
        out, hidden = ours(x)
    assert len(hidden) == len(ref_hidden) == 2
    for a, b in zip(hidden, ref_hidden):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref.norm(ref_hidden[-1]), atol=1e-5, rtol=1e-5)


def test_medm_vit_patch_layout_and_keys():
    """'b c (f pf) (h p1) (w p2) -> b (f h w) (p1 p2 pf c)' stated element by element."""
    torch.manual_seed(0)
    vit = MedMViT(image_size=16, image_patch_size=8, frames=8, frame_patch_size=4, dim=16, depth=1, heads=2,
                  mlp_dim=32, channels=2).eval()
    x = torch.randn(1, 2, 8, 16, 16)
    captured = {}
    norm = getattr(vit.to_patch_embedding, "1")
    norm.register_forward_hook(lambda m, inp, out: captured.setdefault("patches", inp[0]))
    with torch.no_grad():
        vit(x)
    patches = captured["patches"]
    assert patches.shape == (1, 2 * 2 * 2, 8 * 8 * 4 * 2)
    for f in range(2):
        for h in range(2):
            for w in range(2):
                row = patches[0, f * 4 + h * 2 + w].view(8, 8, 4, 2)  # p1 p2 pf c
                block = x[0, :, f * 4:(f + 1) * 4, h * 8:(h + 1) * 8, w * 8:(w + 1) * 8]  # c pf p1 p2
                torch.testing.assert_close(row, block.permute(2, 3, 1, 0))
    einops = pytest.importorskip("einops")
    ref = einops.rearrange(x, "b c (f pf) (h p1) (w p2) -> b (f h w) (p1 p2 pf c)", p1=8, p2=8, pf=4)
    assert torch.equal(patches, ref)
    keys = set(vit.state_dict())
    assert {"to_patch_embedding.1.weight", "to_patch_embedding.2.weight", "to_patch_embedding.3.weight",
            "pos_embedding", "cls_token", "transformer_layers.0.self_attn.in_proj_weight",
            "transformer_layers.0.linear1.weight", "mlp_head.1.weight"} <= keys


def test_spatial_pooling_is_block_average_then_mlp():
    torch.manual_seed(0)
    con = build_connector({"type": "spatial_pooling", "name": "mlp1x_gelu"}, 4, 6, [2, 4, 4])
    x = torch.randn(1, 2 * 4 * 4, 4)
    grid = x.view(2, 4, 4, 4)  # (d h w) c
    pooled = torch.stack([grid[0:2, h:h + 2, w:w + 2].mean(dim=(0, 1, 2)) for h in (0, 2) for w in (0, 2)])
    lin = con.connector[0]
    torch.testing.assert_close(con(x)[0], pooled @ lin.weight.T + lin.bias)
    assert con.num_tokens(32) == 4


def test_attn_pooling_matches_attention_formula():
    torch.manual_seed(0)
    con = build_connector({"type": "attn_pooling", "name": "mlp2x_gelu", "num_queries": 3}, 16, 8, None)
    assert con.attn.num_heads == 8 and con.attn.batch_first
    x = torch.randn(2, 5, 16)
    w, b = con.attn.in_proj_weight, con.attn.in_proj_bias
    q = con.query @ w[:16].T + b[:16]
    k = x @ w[16:32].T + b[16:32]
    v = x @ w[32:].T + b[32:]
    heads = lambda t: t.reshape(*t.shape[:-1], 8, 2).transpose(-2, -3)  # noqa: E731
    att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 2 ** 0.5, dim=-1) @ heads(v)
    pooled = att.transpose(-2, -3).reshape(2, 3, 16) @ con.attn.out_proj.weight.T + con.attn.out_proj.bias
    torch.testing.assert_close(con(x), con.connector(pooled), atol=1e-5, rtol=1e-5)
