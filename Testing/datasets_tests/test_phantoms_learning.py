"""Learning test: a short medmvl-train run on phantoms beats chance; the untrained model does not.

Data: closed questions about radiograph phantoms ("Is there a mass?", "Is there a pleural
effusion?"), answered "Yes." / "No.". Chance is a uniform guess over the vocabulary: a per-token
negative log-likelihood of ln(V) on the answers of held-out (test-split) phantoms. The same
architecture, untrained, stays near ln(V) and never produces a parseable yes/no; after a short
run the NLL is a fraction of chance and every answer parses. What this 2-minute test shows is
that the pipeline learns the phantom answers; whether a model reads the image is checked on the
shipped demo model (Testing/demo_tests/test_demo_model.py), whose training takes longer than a unit test.
The balanced yes/no accuracy is printed for information.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from medmvl_core.data.phantoms import make_xray_phantom, write_phantom

KINDS = ("mass", "effusion")


def _question(kind: str) -> str:
    return "Is there a pleural effusion?" if kind == "effusion" else "Is there a mass?"


def _items(split: str, n_wanted: int, folder, rng) -> list[dict]:
    """Phantoms whose findings are at most one mass or effusion; one yes and one no question each."""
    rows, index = [], 0
    while len({r["phantom"] for r in rows}) < n_wanted:
        ph = make_xray_phantom(0, split, index)
        index += 1
        if len(ph.findings) > 1 or any(f.kind not in ("mass", "effusion") for f in ph.findings):
            continue
        name = write_phantom(ph, folder)
        present = {f.kind for f in ph.findings}
        # one question about the kind present (yes), one about the other kind (no)
        absent = [k for k in KINDS if k not in present]
        asks = [(k, True) for k in present] + [(absent[rng.integers(len(absent))], False)]
        for kind, yes in asks:
            rows.append({"id": f"{ph.id}-{kind}", "phantom": ph.id, "image": [name], "yes": yes,
                         "conversations": [{"from": "human", "value": f"<image>\n{_question(kind)}"},
                                           {"from": "gpt", "value": "Yes." if yes else "No."}]})
    return rows


def _scores(model, processor, rows, folder) -> dict:
    """Per-token NLL of the true answers, share of parseable yes/no answers, balanced accuracy."""
    import math

    import torch

    from medmvl_core.data.phantom_tasks import parse_yes_no

    nll, n_tok, parsed = 0.0, 0, []
    hits = {True: [], False: []}
    with torch.no_grad():
        for r in rows:
            image = str(folder / r["image"][0])
            q = r["conversations"][0]
            s = processor(r["conversations"], image=image, mode="train")
            logits = model(input_ids=s["input_ids"][None], attention_mask=s["attention_mask"][None],
                           images=s["images"]).logits[0, :-1]
            labels = s["labels"][1:]
            mask = labels != -100
            nll -= float(torch.log_softmax(logits[mask].float(), -1).gather(1, labels[mask][:, None]).sum())
            n_tok += int(mask.sum())
            g = processor([q], image=image, mode="generate")
            out = model.generate(input_ids=g["input_ids"][None], attention_mask=g["attention_mask"][None],
                                 images=g["images"], max_new_tokens=4, do_sample=False,
                                 pad_token_id=processor.tokenizer.pad_token_id,
                                 eos_token_id=processor.tokenizer.eos_token_id)
            answer = parse_yes_no(processor.batch_decode(out)[0])
            parsed.append(answer is not None)
            hits[r["yes"]].append(float(answer == r["yes"]))
    return {"nll": nll / n_tok, "chance_nll": math.log(len(processor.tokenizer)),
            "parsed": float(np.mean(parsed)), "balanced_accuracy": 0.5 * (np.mean(hits[True]) + np.mean(hits[False]))}


@pytest.mark.slow
def test_short_training_beats_chance_and_untrained_does_not(tmp_path):
    from medmvl_core.data.phantom_tokenizer import train_phantom_tokenizer
    from medmvl_core.model import load_checkpoint
    from medmvl_core.processing import get_template
    import torch

    from training.build import build_model
    from training.cli import main as train_main
    from training.config import load_config

    rng = np.random.default_rng(0)
    img = tmp_path / "images"
    train_rows = _items("train", 60, img, rng)
    test_rows = _items("test", 15, img, rng)
    (tmp_path / "train.json").write_text(json.dumps(train_rows))
    template = get_template("qwen2")
    train_phantom_tokenizer([template.render(r["conversations"]) for r in train_rows], tmp_path / "tok",
                            vocab_size=400)
    cfg = {
        "name": "phantom_learning_test", "seed": 0,
        "model": {
            "llm": {"config": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                               "vocab_size": 448, "max_position_embeddings": 256, "tie_word_embeddings": True}},
            "tokenizer": str(tmp_path / "tok"),
            "encoder_image": {"type": "siglip",
                              "config": {"model_type": "siglip_vision_model", "hidden_size": 64,
                                         "intermediate_size": 128, "num_hidden_layers": 1,
                                         "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
                              "options": {"select_layer": -1, "select_feature": "cls_patch"}},
            "connector_image": {"type": "mlp", "options": {"name": "mlp2x_gelu"}},
            "max_length": 256,
        },
        "tune": {"llm": "full", "encoder_image": "full", "connector_image": "full"},
        "data": {"datasets": [{"path": str(tmp_path / "train.json"), "image_dir": str(img)}]},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 40, "micro_batch_size": 16, "lr": 1.0e-2,
                  "warmup_ratio": 0.1, "precision": "fp32", "save_every": 0},
        "log": {"every": 40, "tensorboard": False, "progress_bar": False, "loss_curve": False},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    # untrained: the same architecture from the same builder and seed, without a step
    torch.manual_seed(0)
    model0, proc0 = build_model(load_config(tmp_path / "cfg.yaml"))
    untrained = _scores(model0.eval(), proc0, test_rows, img)
    assert train_main(["--config", str(tmp_path / "cfg.yaml")]) == 0
    model, proc = load_checkpoint(tmp_path / "run" / "final")
    trained = _scores(model, proc, test_rows, img)
    print(f"untrained {untrained}\ntrained {trained}")
    chance = trained["chance_nll"]
    assert untrained["nll"] >= 0.8 * chance and untrained["parsed"] <= 0.1, untrained
    assert trained["nll"] <= 0.3 * chance and trained["parsed"] == 1.0, trained
