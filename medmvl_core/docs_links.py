"""Where the documentation explains what an error message is about (paths from the repository root).

Error messages a newcomer meets first name one of these pages, so the fix is one click away.
Torch-free; ``Testing/docs_tests/test_docs_site.py`` checks that every page and anchor exists.
"""

from __future__ import annotations

MODELS = "docs/models.md"
CHECKPOINTS = "docs/models.md#what-a-checkpoint-folder-is"
DEVICES = "docs/models.md#devices-gpu-or-cpu"
SLICER_TROUBLESHOOTING = "docs/slicer.md#when-something-goes-wrong"
DEMO_MODEL = "docs/demo-model.md"
TRAINING = "docs/training.md"

ALL = (MODELS, CHECKPOINTS, DEVICES, SLICER_TROUBLESHOOTING, DEMO_MODEL, TRAINING)


def see(link: str) -> str:
    """``"see docs/x.md#y"``, the tail of an error message."""
    return f"see {link}"
