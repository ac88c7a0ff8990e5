"""Learning test: a short medmvl-train run on phantoms beats chance; the untrained model does not.

Task: closed questions about the large findings of radiograph phantoms ("Is there a mass?",
"Is there a pleural effusion?"), answered "Yes." / "No.". The
score is the balanced accuracy (mean of the yes- and no-recall) of picking the more likely of the
answers "Yes." and "No." (teacher-forced log-probability) on held-out (test-split) phantoms; any constant answer and
any image-blind model score 0.5 in expectation. The trained model must reach 0.75; the untrained
one, scored the same way in this test, stays below 0.65.
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


def _answer_logprob(model, processor, question: dict, answer: str, image) -> float:
    """Sum of the log-probabilities of ``answer``'s tokens after the question (teacher forcing)."""
    import torch

    conv = [question, {"from": "gpt", "value": answer}]
    s = processor(conv, image=image, mode="train")
    logits = model(input_ids=s["input_ids"][None], attention_mask=s["attention_mask"][None],
                   images=s["images"]).logits[0, :-1]
    labels = s["labels"][1:]
    mask = labels != -100
    logp = torch.log_softmax(logits[mask].float(), dim=-1)
    return float(logp.gather(1, labels[mask][:, None]).sum())


def _balanced_accuracy(model, processor, rows, folder) -> float:
    """Mean of yes- and no-recall when the more likely of "Yes." / "No." is the answer."""
    import torch

    hits = {True: [], False: []}
    with torch.no_grad():
        for r in rows:
            image = str(folder / r["image"][0])
            q = r["conversations"][0]
            says_yes = (_answer_logprob(model, processor, q, "Yes.", image)
                        > _answer_logprob(model, processor, q, "No.", image))
            hits[r["yes"]].append(float(says_yes == r["yes"]))
    return 0.5 * (np.mean(hits[True]) + np.mean(hits[False]))


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
    train_rows = _items("train", 160, img, rng)
    test_rows = _items("test", 40, img, rng)
    (tmp_path / "train.json").write_text(json.dumps(train_rows))
    template = get_template("qwen2")
    train_phantom_tokenizer([template.render(r["conversations"]) for r in train_rows], tmp_path / "tok",
                            vocab_size=400)
    cfg = {
        "name": "phantom_learning_test", "seed": 0,
        "model": {
            "llm": {"config": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                               "vocab_size": 448, "max_position_embeddings": 256, "tie_word_embeddings": True}},
            "tokenizer": str(tmp_path / "tok"),
            "encoder_image": {"type": "siglip",
                              "config": {"model_type": "siglip_vision_model", "hidden_size": 64,
                                         "intermediate_size": 128, "num_hidden_layers": 2,
                                         "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
                              "options": {"select_layer": -1, "select_feature": "cls_patch"}},
            "connector_image": {"type": "mlp", "options": {"name": "mlp2x_gelu"}},
            "max_length": 256,
        },
        "tune": {"llm": "full", "encoder_image": "full", "connector_image": "full"},
        "data": {"datasets": [{"path": str(tmp_path / "train.json"), "image_dir": str(img)}]},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 150, "micro_batch_size": 32, "lr": 3.0e-3,
                  "warmup_ratio": 0.05, "precision": "fp32", "save_every": 0},
        "log": {"every": 40, "tensorboard": False, "progress_bar": False, "loss_curve": False},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    # untrained: the same architecture from the same builder and seed, without a step
    torch.manual_seed(0)
    model0, proc0 = build_model(load_config(tmp_path / "cfg.yaml"))
    untrained = _balanced_accuracy(model0.eval(), proc0, test_rows, img)
    assert train_main(["--config", str(tmp_path / "cfg.yaml")]) == 0
    model, proc = load_checkpoint(tmp_path / "run" / "final")
    trained = _balanced_accuracy(model, proc, test_rows, img)
    print(f"balanced accuracy: untrained {untrained:.3f}, trained {trained:.3f}")
    assert untrained < 0.65, untrained
    assert trained >= 0.75, (trained, untrained)
