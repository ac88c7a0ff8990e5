"""Options every benchmark receives (from ``medmvl eval``'s flags)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalOptions:
    """``bertscore_model``: local model folder (else $MEDMVL_BERTSCORE_MODEL, else the HF cache);
    ``bertscore_layers``: layer override; ``nltk_data``: folder holding ``corpora/wordnet``;
    ``iou_mode``: 3D IoU, ``"m3d"`` (the paper's, default) or ``"standard"``;
    ``device``: for BERTScore ("cpu", "cuda")."""

    strict: bool = False
    bertscore_model: str | None = None
    bertscore_layers: int | None = None
    nltk_data: str | None = None
    iou_mode: str = "m3d"
    device: str | None = None
    batch_size: int = 64
