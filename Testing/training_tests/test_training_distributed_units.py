"""training/distributed.py and the sharded-checkpoint helper without launching processes: the
engine check, FSDP wrap classes, peer-loss detection and message, zero optimizer state."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from medmvl_core.errors import ConfigError
from training.distributed import enable_requested_engine, fit_fsdp_wrap_classes, is_peer_failure, peer_lost, \
    requested_engine
from training.state import fill_optimizer_state


def test_requested_engine_from_launch_environment(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert requested_engine() == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert requested_engine() == "deepspeed"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "TRUE")
    assert requested_engine() == "fsdp"


@pytest.mark.parametrize("engine,var", [("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")])
def test_engine_that_cannot_run_is_refused_not_replaced(monkeypatch, engine, var):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv(var, "true")
    acc = SimpleNamespace(distributed_type=DistributedType.NO)  # e.g. launched as one plain process
    with pytest.raises(ConfigError, match=f"asked for {engine}"):
        enable_requested_engine(acc)


def test_fsdp_wrap_classes_fitted_to_the_model():
    class Qwen2DecoderLayer(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(Qwen2DecoderLayer(2, 2))
    plugin = SimpleNamespace(transformer_cls_names_to_wrap=["Qwen2DecoderLayer", "LlamaDecoderLayer"])
    acc = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))
    fit_fsdp_wrap_classes(acc, model)
    assert plugin.transformer_cls_names_to_wrap == ["Qwen2DecoderLayer"]
    plugin.transformer_cls_names_to_wrap = ["Phi3DecoderLayer"]
    with pytest.raises(ConfigError, match="none of the wrap classes"):
        fit_fsdp_wrap_classes(acc, model)


def test_peer_failure_detection_and_message():
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:10651. x\nmore")
    assert is_peer_failure(gloo)
    assert not is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_peer_failure(ValueError("Connection closed by peer"))
    err = peer_lost(gloo, 0, 2, 3, "runs/x/checkpoints/step-2")
    text = str(err)
    assert "process 0 of 2" in text and "step 4" in text and "Connection closed by peer" in text
    assert "runs/x/checkpoints/step-2" in text and "--resume" in text and "more" not in text
    assert "No checkpoint was written yet" in str(peer_lost(gloo, 1, 2, 0, None))


def test_zero_optimizer_state_for_never_updated_parameters():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))
    opt = torch.optim.AdamW([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[a].items()}
    assert fill_optimizer_state(opt) == 1 and fill_optimizer_state(opt) == 0
    assert all(torch.equal(opt.state[a][k], v) for k, v in before.items())  # existing state untouched
    assert float(opt.state[b]["step"]) == 0 and not opt.state[b]["exp_avg"].any()
    # a zero state is what AdamW makes on the first gradient: the update equals a fresh optimizer's
    ref_p = torch.nn.Parameter(torch.ones(2, 2))
    ref = torch.optim.AdamW([ref_p], lr=0.1)
    for p in (b, ref_p):
        p.grad = torch.full((2, 2), 0.5)
    opt.step()
    ref.step()
    assert torch.allclose(b, ref_p)
