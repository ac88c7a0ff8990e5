"""BERTScore F1 from a local model folder only (METRICS.md §1, §3).

The paper's number is ``bert_score`` with ``lang="en"``: roberta-large, layer 17, no idf, no
baseline rescaling, slow tokenizer, truncation at 512. With a folder path bert_score cannot look
the layer up, so ``num_layers`` is always passed explicitly. Any other model gives a proxy score
whose key names the model and layer (``bertscore_f1@<model>:L<n>``), never ``bertscore_f1``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from medmvl_core.evaluation.resources import is_roberta_large

logger = logging.getLogger(__name__)

PAPER_KEY = "bertscore_f1"
PAPER_LAYER = 17


@dataclass
class BertScoreSetup:
    model_dir: str
    num_layers: int
    key: str
    label: str


def plan(model_dir: str, num_layers: int | None = None) -> BertScoreSetup:
    """Pick the layer and the result key for a model folder."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    if is_roberta_large(cfg):
        layers = num_layers or PAPER_LAYER
        label = "roberta-large"
    else:
        from bert_score.utils import model2layers

        name = str(cfg.get("_name_or_path") or Path(model_dir).name)
        layers = num_layers or model2layers.get(name) or int(cfg.get("num_hidden_layers", 0)) or 1
        label = Path(name).name or "model"
    key = PAPER_KEY if (label == "roberta-large" and layers == PAPER_LAYER) else f"{PAPER_KEY}@{label}:L{layers}"
    return BertScoreSetup(model_dir=model_dir, num_layers=layers, key=key, label=label)


def score(setup: BertScoreSetup, predictions: list[str], references: list[str],
          device: str | None = None, batch_size: int = 64) -> tuple[list[float], str]:
    """F1 per pair in [0, 1] and bert_score's hash string (model, layer, idf, versions)."""
    from bert_score import BERTScorer

    scorer = BERTScorer(model_type=setup.model_dir, num_layers=setup.num_layers, lang="en",
                        idf=False, rescale_with_baseline=False, use_fast_tokenizer=False,
                        batch_size=batch_size, device=device or "cpu")
    if not predictions:
        return [], scorer.hash
    _, _, f1 = scorer.score(predictions, references, verbose=False, batch_size=batch_size)
    return [float(x) for x in f1.tolist()], scorer.hash
