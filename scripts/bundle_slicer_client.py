"""Write the worker client as its own package, ``medmvl_client``, for the Slicer extension.

The extension bundles exactly the client (``medmvl_core/client/*.py`` and the error classes it
derives from), under a name of its own so that Slicer's Python never holds a second, partial
``medmvl_core`` that could hide the full package of a worker started from it. Imports are
rewritten the way vendoring tools do (pip's ``_vendor``): ``medmvl_core.client.X`` becomes
``.X``; ``medmvl_core.errors`` becomes ``._core_errors``; ``medmvl_core.__version__`` becomes
``._version``. Any other ``medmvl_core`` import, or a heavy one (torch, transformers), is an
error that names the file: the client must stay bundlable.

Usage: ``python scripts/bundle_slicer_client.py OUT_DIR`` writes ``OUT_DIR/medmvl_client/`` and
prints the written paths relative to ``OUT_DIR`` (the extension's CMakeLists calls it).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "medmvl_client"
#: Modules of the core package outside ``client/`` that the client imports -> bundled name.
CORE_MODULES = {"medmvl_core.errors": "_core_errors"}
#: Top-level imports a bundled file may not make (the client runs in Slicer's Python).
FORBIDDEN = {"torch", "transformers", "peft", "accelerate", "fastapi", "uvicorn", "medmvl_core"}

_REWRITES = [
    (re.compile(r"^(\s*)from medmvl_core\.client\.(\w+) import ", re.M), r"\1from .\2 import "),
    (re.compile(r"^(\s*)from medmvl_core\.client import ", re.M), r"\1from . import "),
    (re.compile(r"^(\s*)from medmvl_core import __version__\b", re.M),
     r"\1from ._version import __version__"),
] + [(re.compile(rf"^(\s*)from {re.escape(mod)} import ", re.M), rf"\1from .{name} import ")
     for mod, name in CORE_MODULES.items()]


class BundleError(RuntimeError):
    """A client file imports something the bundle cannot hold."""


def rewrite(source: str, filename: str) -> str:
    """``source`` with its ``medmvl_core`` imports made relative; raises :class:`BundleError`
    for an import the bundle cannot satisfy."""
    lines = source.splitlines(keepends=True)
    for node in ast.walk(ast.parse(source, filename)):  # import statements only, never docstrings
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            i = node.lineno - 1
            for pattern, repl in _REWRITES:
                lines[i] = pattern.sub(repl, lines[i])
    source = "".join(lines)
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        bad = [n for n in names if n.split(".")[0] in FORBIDDEN]
        if bad:
            raise BundleError(f"{filename}:{node.lineno} imports {', '.join(bad)}, which the "
                              f"Slicer bundle ({PACKAGE}) cannot hold; keep the client standard "
                              "library + numpy, or map the module in CORE_MODULES")
    return source


def version(repo: Path = REPO) -> str:
    """``medmvl_core.__version__`` read from its source (nothing imported)."""
    tree = ast.parse((repo / "medmvl_core" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise BundleError("medmvl_core/__init__.py has no __version__")


def bundle(out_dir: str | Path, repo: Path = REPO) -> list[Path]:
    """Write ``out_dir/medmvl_client/``; returns the written files relative to ``out_dir``."""
    out = Path(out_dir) / PACKAGE
    out.mkdir(parents=True, exist_ok=True)
    sources = {p.name: p for p in sorted((repo / "medmvl_core" / "client").glob("*.py"))}
    for mod, name in CORE_MODULES.items():
        sources[name + ".py"] = repo / (mod.replace(".", "/") + ".py")
    written = []
    for name, src in sources.items():
        text = rewrite(src.read_text(encoding="utf-8"), str(src.relative_to(repo)))
        if name == "__init__.py":
            text = text.replace('"""Slicer-free client', f'"""{PACKAGE}: the Slicer-free client', 1)
        (out / name).write_text(text, encoding="utf-8")
        written.append(out / name)
    (out / "_version.py").write_text(
        f'"""Version of the medmvl_core release this client was bundled from."""\n\n'
        f'__version__ = "{version(repo)}"\n', encoding="utf-8")
    written.append(out / "_version.py")
    return [p.relative_to(Path(out_dir)) for p in written]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write medmvl_client/ into")
    args = parser.parse_args(argv)
    try:
        files = bundle(args.out_dir)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(";".join(p.as_posix() for p in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
