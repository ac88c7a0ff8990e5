"""Shared pytest fixtures. Everything runs offline on tiny models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("PYTHONUTF8", "1")  # child processes read and write UTF-8 whatever the locale

TESTING_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTING_DIR.parent
REFERENCE_DIR = TESTING_DIR / "data" / "medmvl_reference"
# Tests live in Testing/<area>/; their shared helpers (slicer_stubs, toy_worker, ...) live here.
if str(TESTING_DIR) not in sys.path:
    sys.path.insert(0, str(TESTING_DIR))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The MedM-VL reference fixture (copied from shared/fixtures; read-only by convention)."""
    assert REFERENCE_DIR.is_dir(), f"missing test data {REFERENCE_DIR}"
    return REFERENCE_DIR


@pytest.fixture(scope="session", autouse=True)
def _limit_threads():
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:  # the client-only tests run without torch
        pass
