"""Throughput accounting (samples/s, tokens/s, MFU with the 6NT + 2NT convention), peak lookup, logs."""

from __future__ import annotations

import json
import time

import pytest

from training.callbacks import RunLogger, ThroughputMeter, peak_tflops_for_device, step_flops, write_loss_curve


def test_step_flops_convention():
    # LLM 6*N*T; frozen encoder 2*N*T; trained encoder 6*N*T
    assert step_flops(3_000_000_000, 8 * 556, []) == 6 * 3e9 * 8 * 556
    frozen = step_flops(100, 10, [(50, 7, False)])
    trained = step_flops(100, 10, [(50, 7, True)])
    assert frozen == 6 * 100 * 10 + 2 * 50 * 7
    assert trained == 6 * 100 * 10 + 6 * 50 * 7


def test_meter_rates_and_mfu(monkeypatch):
    t = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: t[0])
    m = ThroughputMeter(world_size=2, peak_tflops=500.0)
    m.update(samples=16, tokens=8000, flops=2e15)
    t[0] += 2.0
    r = m.rates()
    assert r["samples_per_s"] == pytest.approx(8.0) and r["tokens_per_s"] == pytest.approx(4000.0)
    assert r["tflops"] == pytest.approx(1000.0)
    assert r["mfu"] == pytest.approx(1000.0 / (500.0 * 2))
    t[0] += 1.0
    assert m.rates()["samples_per_s"] == 0.0  # reset after each report
    assert ThroughputMeter(peak_tflops=None).rates()["mfu"] is None


def test_peak_lookup():
    assert peak_tflops_for_device("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for_device("NVIDIA H200") == 989.0
    assert peak_tflops_for_device("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for_device("NVIDIA L40S") == 362.0
    assert peak_tflops_for_device("cpu") is None and peak_tflops_for_device(None) is None


def test_logger_jsonl_and_curve(tmp_path):
    log = RunLogger(tmp_path, total_steps=3, tensorboard=False, progress_bar=True)
    for s, loss in ((1, 3.0), (2, 2.0), (3, 1.5)):
        log.log(s, {"loss": loss, "lr": 1e-3, "mfu": None})
    log.log(3, {"loss": 1.8}, prefix="eval")
    log.close()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in recs if r["split"] == "train"] == [3.0, 2.0, 1.5]
    assert "mfu" not in recs[0]
    png = write_loss_curve(tmp_path)
    assert png and png.stat().st_size > 1000
    assert write_loss_curve(tmp_path / "none") is None


def test_convention_reproduces_issue_reference_mfu():
    # issue 10: reference CT-Chest LoRA step, batch 8 x 556 tokens, 19.9 samples/s on an H200 = 24% MFU
    # (Qwen2.5-3B: 3.09e9 parameters; SigLIP-base vision tower ~9.3e7, frozen, 32 slices x 256 patches)
    per_step = step_flops(3_090_000_000, 8 * 556, [(93_000_000, 8 * 32 * 256, False)])
    mfu = per_step * (19.9 / 8) / (peak_tflops_for_device("NVIDIA H200") * 1e12)
    assert round(mfu, 2) == 0.24
