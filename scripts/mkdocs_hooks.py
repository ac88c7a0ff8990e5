"""MkDocs hook (``hooks:`` in mkdocs.yml): fills the generated parts of the pages (CLI reference from
the argparse parsers, HTTP API from the worker's OpenAPI schema; see ``scripts/docs_reference.py``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import docs_reference  # noqa: E402


def on_page_markdown(markdown, page, config, files):  # noqa: ANN001, ANN201 - MkDocs hook signature
    return docs_reference.expand_markers(markdown)
