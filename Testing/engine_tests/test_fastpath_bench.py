"""bench/gpu.py runs on the CPU with a tiny model and prints every row of its table."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROWS = ["copy bandwidth", "decode floor b1", "reference generate b1", "reference generate b2", "ours b1",
        "ours b2", "cold TTFT", "follow-up TTFT", "train LoRA samples/s", "train LoRA MFU",
        "memory none", "memory 8bit", "memory 4bit"]


def test_bench_cpu_small_prints_the_table(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--small",
                           "--batch", "2", "--new-tokens", "4", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = {}
    metrics, targets = proc.stdout.split("\n| target | value | wanted | met |")   # two tables
    assert "| ours b8 (batch-8 aggregate) | nan | >= 1500 tokens/s | not measured |" in targets   # --batch 2
    assert "| memory 4bit (3B model in 4-bit) |" in targets
    for line in metrics.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] not in ("metric",):
            table[cells[0]] = (float(cells[1]), cells[2], cells[3])
    assert sorted(table) == sorted(ROWS), proc.stdout
    for name, (value, unit, _note) in table.items():
        assert math.isfinite(value) and value > 0, (name, value)
    assert table["memory 4bit"][0] < table["memory none"][0]
    assert table["memory 8bit"][0] < table["memory none"][0]
    assert "reused from the KV cache" in table["follow-up TTFT"][2]
    assert proc.stdout.startswith("machine: ") and "device=cpu" in proc.stdout
    data = json.loads(out_json.read_text())
    assert data["machine"]["device"] == "cpu" and len(data["rows"]) == len(ROWS)
    # every row is also printed as soon as it is measured (a run cut short keeps what it measured)
    streamed = [line[len("row: "):].split(" = ")[0] for line in proc.stdout.splitlines() if line.startswith("row: ")]
    assert sorted(streamed) == sorted(ROWS)
    assert proc.stdout.index("row: copy bandwidth") < proc.stdout.index("| metric |")


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_synthetic_ct_is_the_same_volume_as_nrrd_or_dicom_series(tmp_path, monkeypatch):
    """Without SimpleITK (a GPU image may lack it) the cold-TTFT CT is written as a DICOM series;
    both read back to the same HU voxels and spacing."""
    import numpy as np

    from medmvl_core.imaging import read_image

    mod = _bench_module()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    nrrd = mod.synthetic_ct((5, 24, 20), tmp_path / "a")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "SimpleITK", None)  # import SimpleITK -> ImportError
        series = mod.synthetic_ct((5, 24, 20), tmp_path / "b")
    assert nrrd.suffix == ".nrrd" and series.is_dir() and len(list(series.glob("*.dcm"))) == 5
    a, b = read_image(nrrd), read_image(series)
    assert np.array_equal(a.array, b.array) and a.array.shape == (5, 24, 20)
    assert np.allclose(a.spacing, b.spacing) and set(np.unique(a.array)) == {-1000, -850, 40}


def test_bench_refuses_cuda_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cuda", "--small"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


def test_bench_refuses_an_unknown_section():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--small",
                           "--sections", "decode,speed"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "unknown section(s) ['speed']" in proc.stderr
    assert "choose from ttft, decode, train, memory, profile" in proc.stderr and "row:" not in proc.stdout


def test_a_failing_section_becomes_a_row():
    mod = _bench_module()
    rows: list = []

    def boom():
        raise RuntimeError("CUDA error: out of memory")

    assert mod.guarded(rows, "memory 4bit", boom) is None
    assert rows[0][0] == "memory 4bit" and math.isnan(rows[0][1]) and "out of memory" in rows[0][3]
    assert mod.guarded(rows, "ok", lambda x: x + 1, 1) == 2 and len(rows) == 1


def test_a_failing_section_and_the_time_limit_leave_one_complete_json_record(tmp_path, monkeypatch, capsys):
    """In one run: the train section fails (forced), the others still run; the JSON record holds
    each section's status, the rows and the targets. With --time-limit 0 every section is skipped
    with a row that says so, and the run still ends with its record."""
    mod = _bench_module()

    def broken(*args):
        raise RuntimeError("simulated failure in the LoRA step")

    monkeypatch.setattr(mod, "bench_train", broken)
    out = tmp_path / "run.json"
    assert mod.main(["--device", "cpu", "--small", "--sections", "ttft,train,memory", "--modes", "none",
                     "--new-tokens", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["complete"] and data["machine"]["model"].startswith("small")
    status = {k: v["status"] for k, v in data["sections"].items()}
    assert status == {"copy bandwidth": "ok", "build model": "ok", "engine": "ok", "ttft": "ok",
                      "train": "failed", "memory none": "ok"}
    assert "simulated failure" in data["sections"]["train"]["error"]
    rows = {r[0]: r for r in data["rows"]}
    assert "failed after" in rows["train"][3] and "the other sections ran" in rows["train"][3]
    assert math.isfinite(rows["cold TTFT"][1]) and math.isfinite(rows["memory none"][1])
    targets = {t["metric"]: t for t in data["targets"]}
    assert targets["train LoRA MFU"]["met"] is None and targets["follow-up TTFT"]["met"] is not None
    assert "| target | value | wanted | met |" in capsys.readouterr().out

    out0 = tmp_path / "limit.json"
    assert mod.main(["--device", "cpu", "--small", "--time-limit", "0", "--json", str(out0)]) == 0
    data = json.loads(out0.read_text())
    assert data["complete"] and {v["status"] for v in data["sections"].values()} == {"skipped"}
    assert "time limit (0 s) was reached; run it alone with --sections memory" in data["sections"]["memory 4bit"]["error"]
    assert "could not be built" in data["sections"]["decode"]["error"]
