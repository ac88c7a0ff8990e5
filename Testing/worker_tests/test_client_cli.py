"""`medmvl ask --url` against an in-process worker serving the fixture CT checkpoint."""

from __future__ import annotations

import json

import pytest

from medmvl_core.cli import main
from medmvl_core.engine import Engine
from medmvl_core.worker.server import WorkerServer
from medmvl_core.worker.settings import WorkerSettings

TOKEN = "cli-test-token-0123456789"


@pytest.fixture(scope="module")
def ct_worker(reference_dir):
    from medmvl_core.model import load_checkpoint
    model, proc = load_checkpoint(reference_dir / "ct_chest_tiny")
    srv = WorkerServer(WorkerSettings(token=TOKEN, model_name="ct_chest_tiny"),
                       engine=Engine(model, proc)).start_in_thread()
    yield srv
    srv.stop()


def _ask(ct_worker, reference_dir, capsys, *extra):
    rc = main(["ask", "--url", ct_worker.url, "--token", TOKEN, "--image",
               str(reference_dir / "inputs" / "ct_volume.npy"), "--max-new-tokens", "12",
               "--json", *extra])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def test_ask_report_gives_medmvl_generation(ct_worker, reference_dir, capsys):
    golden = json.loads((reference_dir / "ct_chest_tiny" / "golden.json").read_text())
    sample = golden["inference_samples"][0]
    out = _ask(ct_worker, reference_dir, capsys, "--task", "report")
    text = sample["generated_text"]
    assert out["text"] == (text[0] if isinstance(text, list) else text)
    assert out["question"] == "Generate radiology report for the CT."
    assert out["num_tokens"] == 12 and out["timings"]["ttft_s"] > 0


def test_ask_describe_puts_the_box_in_the_prompt(ct_worker, reference_dir, capsys):
    # the CropForeground region of this volume is k 2..38, j 7..41, i 3..45 -> the whole model box
    out = _ask(ct_worker, reference_dir, capsys, "--task", "describe",
               "--roi", "2", "7", "3", "38", "41", "45")
    assert "[0.000, 0.000, 0.000, 1.000, 1.000, 1.000]" in out["question"]


def test_ask_without_question_fails_cleanly(ct_worker, reference_dir, capsys):
    rc = main(["ask", "--url", ct_worker.url, "--token", TOKEN, "--image",
               str(reference_dir / "inputs" / "ct_volume.npy")])
    assert rc == 1
    assert "--question" in capsys.readouterr().err
