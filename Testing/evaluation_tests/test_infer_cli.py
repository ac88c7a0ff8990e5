"""`medmvl infer` on the reference fixture reproduces MedM-VL's golden text; then `medmvl eval`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from medmvl_core.cli import main as cli_main


def _golden_texts(reference_dir, ckpt):
    g = json.loads((reference_dir / ckpt / "golden.json").read_text())
    return {s["id"]: s["generated_text"][0] for s in g["inference_samples"]}


def _with_references(reference_dir, name, tmp_path):
    """The fixture's inference JSON plus a reference answer as a trailing gpt turn."""
    data = json.loads((reference_dir / "inputs" / name).read_text())
    for i, d in enumerate(data):
        d["conversations"].append({"from": "gpt", "value": f"No acute abnormality {i}."})
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


@pytest.mark.parametrize("ckpt,data,flag", [("ct_chest_tiny", "ct_inference.json", "--image3d-dir"),
                                            ("2d_tiny", "cxr_inference.json", "--image-dir")])
def test_infer_reproduces_golden_then_eval(reference_dir, tmp_path, ckpt, data, flag, capsys):
    inp = _with_references(reference_dir, data, tmp_path)
    out = tmp_path / "out.json"
    args = ["infer", "--checkpoint", str(reference_dir / ckpt), "--data", str(inp), flag,
            str(reference_dir / "inputs"), "--output", str(out), "--max-new-tokens", "12",
            "--batch-size", "2", "--device", "cpu"]
    assert cli_main(args) == 0
    res = json.loads(out.read_text(encoding="utf-8"))
    golden = _golden_texts(reference_dir, ckpt)
    assert [r["id"] for r in res] == list(golden)
    for r in res:
        assert r["conversations"][-1]["from"] == "gpt"
        assert r["conversations"][-1]["value"] == golden[r["id"]]
        assert r["answer"].startswith("No acute abnormality")
        assert [t["from"] for t in r["conversations"]] == ["human", "gpt"]
    assert not list(tmp_path.glob("out.json.part-*"))
    # resume: everything is answered, nothing is regenerated, the file is unchanged
    before = out.read_text(encoding="utf-8")
    assert cli_main(args) == 0
    assert out.read_text(encoding="utf-8") == before
    # and the output scores
    rep = tmp_path / "rep"
    assert cli_main(["eval", "--predictions", str(out), "--benchmark", "m3d-cap", "--report", str(rep)]) == 0
    metrics = json.loads((rep / "metrics.json").read_text())["metrics"]
    assert metrics["bleu1"]["status"] == "ok"
    # BLEU-1 per sample by the reference library (sacrebleu, 13a, no smoothing), averaged, in percent
    from sacrebleu.metrics import BLEU

    bleu = BLEU(max_ngram_order=1, smooth_method="none", tokenize="13a")
    expect = [bleu.corpus_score([golden[r["id"]]], [[r["answer"]]]).score for r in res]
    assert metrics["bleu1"]["value"] == pytest.approx(sum(expect) / len(expect), abs=1e-6)
    assert json.loads((rep / "metrics.json").read_text())["provenance"]["n"] == 2


def test_infer_quantize_4bit_quantizes_every_decoder_linear_and_changes_the_answers(reference_dir, tmp_path, caplog):
    """--quantize 4bit loads the checkpoint and quantizes the LLM's decoder-layer linears (as the
    worker does) before answering: the float model's golden text changes on this random checkpoint.
    (The quantized text itself is not compared with a second run: bitsandbytes' CPU 4-bit kernels
    change their weight packing after the first forward, so it depends on the order of calls.)"""
    import logging

    import torch

    from medmvl_core.model import load_checkpoint

    inp = _with_references(reference_dir, "ct_inference.json", tmp_path)
    out = tmp_path / "q.json"
    with caplog.at_level(logging.INFO, logger="medmvl_core.engine.quantize"):
        assert cli_main(["infer", "--checkpoint", str(reference_dir / "ct_chest_tiny"), "--data", str(inp),
                         "--image3d-dir", str(reference_dir / "inputs"), "--output", str(out),
                         "--max-new-tokens", "12", "--device", "cpu", "--quantize", "4bit"]) == 0
    got = {r["id"]: r["conversations"][-1]["value"] for r in json.loads(out.read_text(encoding="utf-8"))}
    model, _ = load_checkpoint(reference_dir / "ct_chest_tiny", device="cpu")
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.llm.model.layers.modules())
    assert n_linear > 0 and any(f"quantized {n_linear} LLM linear layers to 4bit" in r.getMessage()
                                for r in caplog.records)
    golden = _golden_texts(reference_dir, "ct_chest_tiny")
    assert set(got) == set(golden) and all(isinstance(t, str) and t for t in got.values())
    assert got != golden


def test_infer_bad_inputs(reference_dir, tmp_path, capsys):
    base = ["infer", "--checkpoint", str(reference_dir / "ct_chest_tiny"), "--output", str(tmp_path / "o.json")]
    data = str(reference_dir / "inputs" / "ct_inference.json")
    cases = [(["--data", str(tmp_path / "nope.json")], "does not exist"),
             (["--data", data, "--image3d-dir", str(tmp_path)], "2 image file(s) not found"),
             (["--data", data, "--batch-size", "0"], "--batch-size must be >= 1")]
    for extra, message in cases:
        assert cli_main(base + extra) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_two_processes_shard_and_merge(reference_dir, tmp_path):
    """torchrun with 2 CPU processes: each rank takes a shard, rank 0 merges in input order."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "out.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "medmvl_core.cli", "-v",
           "infer", "--checkpoint", str(reference_dir / "ct_chest_tiny"), "--data",
           str(reference_dir / "inputs" / "ct_inference.json"), "--image3d-dir", str(reference_dir / "inputs"),
           "--output", str(out), "--max-new-tokens", "12", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stderr
    assert "rank 0: 1 samples" in proc.stderr and "rank 1: 1 samples" in proc.stderr
    golden = _golden_texts(reference_dir, "ct_chest_tiny")
    res = json.loads(out.read_text(encoding="utf-8"))
    assert [(r["id"], r["conversations"][-1]["value"]) for r in res] == list(golden.items())
