"""The ``medmvl`` command line: discovers subcommands in :mod:`medmvl_core.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from typing import Sequence

from medmvl_core import __version__
from medmvl_core import commands as _commands

logger = logging.getLogger(__name__)


def _load_commands() -> list:
    mods = []
    for info in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{_commands.__name__}.{info.name}")
        if not all(hasattr(mod, a) for a in ("NAME", "HELP", "add_arguments", "run")):
            raise RuntimeError(f"command module {mod.__name__} lacks NAME/HELP/add_arguments/run")
        mods.append(mod)
    names = [m.NAME for m in mods]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise RuntimeError(f"duplicate medmvl subcommands: {sorted(dup)}")
    return mods


def command_epilog(examples: Sequence[str], docs: str | None) -> str:
    """The text under a subcommand's options: its examples and the docs page that explains it."""
    lines = ["examples:" if len(examples) > 1 else "example:"]
    lines += [f"  {e}" for e in examples]
    if docs:
        lines += ["", f"documentation: {docs}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``medmvl`` parser with one subparser per module in :mod:`medmvl_core.commands`.

    A command module may set ``EXAMPLES`` (command lines shown under its options) and ``DOCS``
    (the docs page that explains it); ``--help`` of every command is checked to have both an
    example and a one-line description (Testing/docs_tests/test_cli_help.py)."""
    parser = argparse.ArgumentParser(
        prog="medmvl",
        description="MedM-VL medical vision-language models: inference, serving, evaluation.",
        epilog="example:\n  medmvl demo\n\ndocumentation: docs/index.md; each command: medmvl COMMAND --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"medmvl {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info, -vv debug; debug may include prompts)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _load_commands():
        examples = tuple(getattr(mod, "EXAMPLES", ()))
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP,
                           epilog=command_epilog(examples, getattr(mod, "DOCS", None)) if examples else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line for users; the traceback at -vv
        from medmvl_core.errors import MedMVLError

        if isinstance(exc, MedMVLError) and args.verbose < 2:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
