"""Every code example in README.md, docs/ and the demo model card runs.

Fenced ``python`` blocks of one file run in order in one namespace (like a reader pasting them into
one interpreter); ``bash``/``sh`` blocks run with ``bash -euo pipefail``. Both run in a scratch
folder per file that links ``Resources``, ``Testing`` and ``training`` from the repository, so the
commands a reader types from the repository root work unchanged; ``medmvl`` and ``medmvl-train``
come from this interpreter's environment. Other languages (``text``, ``json``, ``yaml``) are not run.

A comment on the line before a block changes that (it is invisible on GitHub and on the site):

- ``<!-- test: skip REASON -->``: not run (a GPU, 3D Slicer, the network, a long job); REASON required.
- ``<!-- test: replace OLD NEW -->``: run with the word OLD replaced by NEW (e.g. fewer training steps).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN_LANGS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*test:\s*(\w[\w-]*)\s*(.*?)\s*-->\s*$")
LINKED = ("Resources", "Testing", "training")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    markers: list[tuple[str, str]]

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    """README, every docs page except the dated history log, and the demo model card."""
    files = [ROOT / "README.md", ROOT / "Resources" / "demo_model" / "README.md"]
    files += sorted(p for p in (ROOT / "docs").rglob("*.md") if "history" not in p.relative_to(ROOT / "docs").parts)
    return [f for f in files if f.is_file()]


def parse_blocks(path: Path) -> list[Block]:
    """Fenced code blocks with the test markers on the lines right above them."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        markers, k = [], i - 1
        while k >= 0 and MARKER.match(lines[k]):
            mm = MARKER.match(lines[k])
            markers.insert(0, (mm.group(1), mm.group(2)))
            k -= 1
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        blocks.append(Block(path, i + 1, lang, "\n".join(body) + "\n", markers))
        i = j + 1
    return blocks


def runnable(path: Path) -> list[Block]:
    return [b for b in parse_blocks(path) if b.lang in RUN_LANGS and not any(k == "skip" for k, _ in b.markers)]


def _apply_replacements(block: Block) -> str:
    code = block.code
    for kind, arg in block.markers:
        if kind == "replace":
            old, new = arg.split(maxsplit=1)
            assert old in code, f"{block.where}: 'replace' marker: {old!r} is not in the block"
            code = code.replace(old, new)
    return code


def _workspace(tmp_path: Path) -> Path:
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    return tmp_path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def test_markers_are_well_formed():
    """A skip says why; a marker kind that does not exist is a typo that would silently run or skip."""
    problems = []
    for path in doc_files():
        for b in parse_blocks(path):
            for kind, arg in b.markers:
                if kind not in ("skip", "replace"):
                    problems.append(f"{b.where}: unknown marker 'test: {kind}' (use skip or replace)")
                elif kind == "skip" and not arg:
                    problems.append(f"{b.where}: 'test: skip' needs a reason")
                elif kind == "replace" and len(arg.split(maxsplit=1)) != 2:
                    problems.append(f"{b.where}: 'test: replace' needs OLD NEW")
            if b.markers and b.lang not in RUN_LANGS:
                problems.append(f"{b.where}: marker on a '{b.lang or 'plain'}' block, which is never run")
    assert not problems, "\n".join(problems)


def test_parser_reads_markers_and_indented_fences(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("1. step\n\n   <!-- test: skip needs a GPU -->\n   ```bash\n   nvidia-smi\n   ```\n\n"
                    "```python\nx = 1\n```\n<!-- test: replace 20 2 -->\n```sh\necho 20\n```\n```text\nout\n```\n")
    blocks = parse_blocks(page)
    assert [(b.lang, b.line) for b in blocks] == [("bash", 4), ("python", 8), ("sh", 12), ("text", 15)]
    assert blocks[0].markers == [("skip", "needs a GPU")] and blocks[0].code == "nvidia-smi\n"
    assert _apply_replacements(blocks[2]) == "echo 2\n"
    assert [b.lang for b in runnable(page)] == ["python", "sh"]


def test_every_page_has_its_examples_checked():
    """The README must have runnable examples (the quick start and the Python example)."""
    langs = {b.lang for b in runnable(ROOT / "README.md")}
    assert {"python", "bash"} <= langs


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in doc_files() if runnable(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(path, tmp_path, monkeypatch):
    ws = _workspace(tmp_path)
    monkeypatch.chdir(ws)
    env = _env()
    namespace: dict = {"__name__": "__docs_example__"}
    for block in runnable(path):
        code = _apply_replacements(block)
        if RUN_LANGS[block.lang] == "python":
            try:
                exec(compile(code, block.where, "exec"), namespace)  # noqa: S102 - the docs' own examples
            except Exception as exc:  # name the block: the traceback alone points into the Markdown line
                pytest.fail(f"{block.where}: the Python example raised {type(exc).__name__}: {exc}")
        else:
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=ws, env=env,
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, (f"{block.where}: exit code {proc.returncode}\n--- stdout\n"
                                          f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
