"""Tiny models from configs: every encoder x connector x LLM type runs forward, backward and generate."""

from __future__ import annotations

import pytest
import torch

from medmvl_core.model import IMAGE3D_TOKEN_INDEX, IMAGE_TOKEN_INDEX, MedMVLConfig, MedMVLForConditionalGeneration

VOCAB = 128
LLMS = {
    "qwen2": dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
    "llama": dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False),
    "phi": dict(model_type="phi", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=256, partial_rotary_factor=0.5, bos_token_id=1,
                eos_token_id=2),
    "phi3": dict(model_type="phi3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2),
}
SIGLIP = dict(model_type="siglip_vision_model", image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
              num_hidden_layers=2, num_attention_heads=2)
CLIP = dict(model_type="clip_vision_model", image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=2, projection_dim=16)
M3D = dict(in_channels=1, img_size=[8, 16, 16], patch_size=[4, 8, 8], hidden_size=16, mlp_dim=32, num_layers=2,
           num_heads=2, pos_embed="perceptron")
MEDM = dict(image_size=16, image_patch_size=8, frame_size=8, frame_patch_size=4, hidden_size=16, image_num_heads=2,
            image_mlp_dim=32, image_num_layers=2)
ENCODERS = {"siglip": (SIGLIP, False, False), "clip": (CLIP, False, True),
            "m3dclip": (M3D, True, True), "medmclip": (MEDM, True, True)}  # config, is_3d, has_cls
CONNECTORS = ["mlp", "spatial_pooling", "attn_pooling"]


def tiny_config(llm: str, encoder: str, connector: str, slices: int = 4) -> MedMVLConfig:
    cfg, is_3d, has_cls = ENCODERS[encoder]
    # spatial pooling needs exactly the patch grid: drop the CLS token where there is one
    feature = "patch" if (connector == "spatial_pooling" and has_cls) else "cls_patch"
    enc = {"type": encoder, "select_layer": -1, "select_feature": feature, "config": cfg}
    con = {"type": connector, "name": "mlp2x_gelu"}
    kw = {"encoder_image3d": enc, "connector_image3d": con} if is_3d else {"encoder_image": enc, "connector_image": con}
    return MedMVLConfig(llm_config=LLMS[llm], template="qwen2", max_length=256,
                        preprocessing={"image3d": {"kind": "volume", "size": [slices, 16, 16]}}, **kw)


def build(llm: str, encoder: str, connector: str, seed: int = 0) -> MedMVLForConditionalGeneration:
    torch.manual_seed(seed)
    return MedMVLForConditionalGeneration(tiny_config(llm, encoder, connector)).eval()


def sample_inputs(model: MedMVLForConditionalGeneration, kind: str, batch: int = 2, slices: int = 4):
    """input_ids with n placeholder copies after a short prefix; labels on the suffix."""
    n = model.num_image_tokens(kind)
    pid = IMAGE_TOKEN_INDEX if kind == "image" else IMAGE3D_TOKEN_INDEX
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, VOCAB, (batch, 3), generator=g)
    suffix = torch.randint(3, VOCAB, (batch, 5), generator=g)
    ids = torch.cat([prefix, torch.full((batch, n), pid), suffix], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -5:] = suffix
    if kind == "image":
        pix = {"images": torch.randn(batch, 3, 16, 16, generator=g)}
    else:
        channels = 3 if model.encoder_image3d is None else 1
        depth = slices if model.encoder_image3d is None else 8
        pix = {"images3d": torch.randn(batch, channels, depth, 16, 16, generator=g)}
    return ids, labels, pix


def _pairwise() -> list[tuple[str, str, str]]:
    """16 combinations covering every (encoder, connector), (encoder, LLM) and (connector, LLM) pair
    (the full 48-way product costs about 3x the time and exercises nothing more per module)."""
    enc, con, llm = list(ENCODERS), CONNECTORS, list(LLMS)
    combos = [(enc[i], con[j], llm[(i + j) % 4]) for i in range(4) for j in range(3)]
    combos += [(enc[i], con[i % 3], llm[(i + 3) % 4]) for i in range(4)]
    return combos


COMBOS = _pairwise()


@pytest.mark.parametrize("encoder,connector,llm", COMBOS)
def test_forward_backward_generate(encoder, connector, llm):
    model = build(llm, encoder, connector)
    kind = "image3d" if ENCODERS[encoder][1] else "image"
    ids, labels, pix = sample_inputs(model, kind)
    with torch.no_grad():
        feats = model.encode_images(**pix)
    assert feats.shape == (2, model.num_image_tokens(kind), 32)
    model.train()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **pix)
    assert out.logits.shape == (2, ids.shape[1], VOCAB)
    # the loss is transformers' mean shifted cross-entropy over the supervised positions
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB).float(), labels[:, 1:].reshape(-1),
                                            ignore_index=-100)
    assert torch.allclose(out.loss, ref, atol=1e-5)
    out.loss.backward()
    con = model.connector_image if kind == "image" else model.connector_image3d
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in con.parameters())
    assert model.get_input_embeddings().weight.grad is not None
    model.eval()
    new = model.generate(ids, torch.ones_like(ids), **pix, max_new_tokens=2, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    assert new.shape == (2, 2) and new.dtype == torch.long


@pytest.mark.parametrize("connector", ["mlp", "attn_pooling"])
def test_2d_encoder_per_slice_on_volumes(connector):
    """MedM-VL-CT-Chest: a volume through the 2D SigLIP slice by slice, slice tokens concatenated."""
    model = build("qwen2", "siglip", connector)
    ids, labels, pix = sample_inputs(model, "image3d")
    per_slice = model.vision_features("image3d", pix["images3d"])
    assert per_slice.shape == (2 * 4, 4, 16)  # B*D slices, 4 patches, hidden 16
    # slice d of sample b is the same as encoding that slice alone as a 2D image
    one = model.vision_features("image", pix["images3d"][1, :, 2][None])
    torch.testing.assert_close(per_slice[1 * 4 + 2], one[0])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **pix)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_generate_greedy_equals_argmax_loop_and_returns_only_new_tokens():
    model = build("qwen2", "siglip", "mlp")
    ids, _, pix = sample_inputs(model, "image", batch=1)
    new = model.generate(ids, torch.ones_like(ids), **pix, max_new_tokens=4, do_sample=False, eos_token_id=None)
    emb = model.encode_images(**pix)
    seq = ids
    expected = []
    with torch.no_grad():
        for _ in range(4):
            nxt = model(input_ids=seq, attention_mask=torch.ones_like(seq), image_embeds=emb).logits[0, -1].argmax()
            expected.append(int(nxt))
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert new[0].tolist() == expected


def test_generate_sampling_and_beam():
    model = build("llama", "clip", "attn_pooling")
    ids, _, pix = sample_inputs(model, "image", batch=2)
    mask = torch.ones_like(ids)
    torch.manual_seed(0)
    a = model.generate(ids, mask, **pix, max_new_tokens=5, do_sample=True, top_k=0, temperature=1.5, eos_token_id=None)
    torch.manual_seed(0)
    b = model.generate(ids, mask, **pix, max_new_tokens=5, do_sample=True, top_k=0, temperature=1.5, eos_token_id=None)
    assert a.shape == (2, 5) and torch.equal(a, b)
    beam = model.generate(ids, mask, **pix, max_new_tokens=5, num_beams=3, do_sample=False, eos_token_id=None)
    assert beam.shape == (2, 5)
    out = model.generate(ids, mask, **pix, max_new_tokens=5, num_beams=3, num_return_sequences=2, eos_token_id=None)
    assert out.shape == (4, 5)
    torch.testing.assert_close(out[0::2], beam, rtol=0, atol=0)  # the best beam is the num_return_sequences=1 answer
    # the beams come back best first: teacher-forced log-probability of the new tokens, per sample
    emb = model.encode_images(**pix)
    with torch.no_grad():
        for b in range(2):
            scores = []
            for r in range(2):
                seq = torch.cat([ids[b:b + 1], out[2 * b + r][None]], dim=1)
                logp = model(input_ids=seq, attention_mask=torch.ones_like(seq),
                             image_embeds=emb[b:b + 1]).logits[0].log_softmax(-1)
                scores.append(sum(float(logp[ids.shape[1] - 1 + t, out[2 * b + r, t]]) for t in range(5)))
            assert scores[0] >= scores[1] - 1e-4 and not torch.equal(out[2 * b], out[2 * b + 1])


def test_text_only_and_cache_continuation():
    """No image: plain LLM; a KV-cache continuation gives the same logits as a full forward."""
    model = build("phi3", "siglip", "mlp")
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        first = model(input_ids=ids[:, :7], attention_mask=torch.ones_like(ids[:, :7]), use_cache=True)
        rest = model(input_ids=ids[:, 7:], attention_mask=torch.ones_like(ids), past_key_values=first.past_key_values,
                     use_cache=True).logits
    torch.testing.assert_close(rest, full[:, 7:], atol=1e-5, rtol=1e-4)


def test_both_kinds_in_one_sample():
    """A model with a 2D and a 3D encoder fills <image> and <image3d> positions from their own features."""
    cfg = tiny_config("qwen2", "siglip", "mlp")
    cfg3 = tiny_config("qwen2", "m3dclip", "spatial_pooling")
    torch.manual_seed(0)
    model = MedMVLForConditionalGeneration(MedMVLConfig(
        llm_config=cfg.llm_config.to_dict(), encoder_image=cfg.encoder_image, connector_image=cfg.connector_image,
        encoder_image3d=cfg3.encoder_image3d, connector_image3d=cfg3.connector_image3d)).eval()
    n2, n3 = model.num_image_tokens("image"), model.num_image_tokens("image3d")
    ids = torch.tensor([[5] + [IMAGE3D_TOKEN_INDEX] * n3 + [6] + [IMAGE_TOKEN_INDEX] * n2 + [7]])
    images, images3d = torch.randn(1, 3, 16, 16), torch.randn(1, 1, 8, 16, 16)
    emb = model.embed_inputs(ids, model.encode_images(images=images, images3d=images3d))
    torch.testing.assert_close(emb[0, 1:1 + n3], model.encode_images(images3d=images3d)[0])
    torch.testing.assert_close(emb[0, 2 + n3:2 + n3 + n2], model.encode_images(images=images)[0])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), images=images, images3d=images3d)
    assert out.logits.shape == (1, ids.shape[1], VOCAB)


def test_lora_wrapping_and_gradient_checkpointing():
    """PEFT's causal-LM wrapper and transformers' gradient checkpointing work on the composite model."""
    from peft import LoraConfig, get_peft_model

    model = build("qwen2", "siglip", "attn_pooling").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.llm.model.gradient_checkpointing
    ids, labels, pix = sample_inputs(model, "image3d")
    plain = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **pix).loss
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    out = peft(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **pix)
    torch.testing.assert_close(out.loss, plain)  # LoRA B starts at zero
    out.loss.backward()
    lora_grads = [p.grad for n, p in peft.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    new = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **pix, max_new_tokens=2, eos_token_id=None)
    assert new.shape == (2, 2)


def test_slice_fusion_mean_averages_per_slice_connector_outputs():
    """The 'mean' fusion (an intermediate MedM-VL commit): connector per slice, then the mean over slices."""
    cfg = tiny_config("qwen2", "siglip", "mlp")
    cfg.image3d_slice_fusion = "mean"
    torch.manual_seed(0)
    model = MedMVLForConditionalGeneration(cfg).eval()
    vol = torch.randn(2, 3, 4, 16, 16)
    with torch.no_grad():
        out = model.encode_images(images3d=vol)
        per_slice = torch.stack([model.encode_images(images=vol[:, :, d]) for d in range(4)], dim=1)
    assert out.shape == (2, model.num_image_tokens("image3d"), 32) == (2, 4, 32)
    torch.testing.assert_close(out, per_slice.mean(dim=1))
