"""Every command of ``medmvl`` and ``medmvl-train`` explains itself: a one-line description, at least
one example that parses with the command's own parser, and the docs page it points to exists.

The commands are taken from the registries (``medmvl_core/commands/`` and ``training.cli.COMMANDS``),
so a command added later is checked too.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from medmvl_core import cli
from training import cli as train_cli

ROOT = Path(__file__).resolve().parents[2]
MEDMVL_COMMANDS = cli._load_commands()
TRAIN_COMMANDS = list(train_cli.COMMANDS)


def _help(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_commands_are_registered():
    assert {"ask", "serve", "infer", "eval", "demo", "phantoms"} <= {m.NAME for m in MEDMVL_COMMANDS}
    assert TRAIN_COMMANDS[0] == "train" and {"encoder", "validate", "merge"} <= set(TRAIN_COMMANDS)


@pytest.mark.parametrize("mod", MEDMVL_COMMANDS, ids=lambda m: m.NAME)
def test_medmvl_command_help(mod, capsys):
    assert "\n" not in mod.HELP and 10 <= len(mod.HELP) <= 110, f"HELP of {mod.NAME} must be one short line"
    examples = getattr(mod, "EXAMPLES", ())
    assert examples, f"medmvl {mod.NAME}: set EXAMPLES (command lines shown under --help)"
    out = _help(cli.main, [mod.NAME, "--help"], capsys)
    assert _flat(mod.HELP) in _flat(out)
    assert "example" in out
    parser = cli.build_parser()
    for ex in examples:
        words = shlex.split(ex)
        assert words[:2] == ["medmvl", mod.NAME], f"example of medmvl {mod.NAME} runs another command: {ex}"
        assert ex in out
        parser.parse_args(words[1:])  # argparse exits (fails the test) on an option that does not exist
    docs = getattr(mod, "DOCS", None)
    if docs:
        assert (ROOT / docs.split("#")[0]).is_file(), f"medmvl {mod.NAME}: DOCS page {docs} does not exist"
        assert docs in out


def test_medmvl_help_lists_every_command(capsys):
    out = _help(cli.main, ["--help"], capsys)
    for mod in MEDMVL_COMMANDS:
        assert mod.NAME in out
    assert "example" in out


@pytest.mark.parametrize("name", TRAIN_COMMANDS)
def test_medmvl_train_command_help(name, capsys):
    make_parser = train_cli.COMMANDS[name][0]
    first_line = make_parser().description.splitlines()[0]
    assert 10 <= len(first_line) <= 110
    argv = ([] if name == "train" else [name]) + ["--help"]
    out = _help(train_cli.main, argv, capsys)
    assert _flat(first_line) in _flat(out) and "example" in out
    prefix = ["medmvl-train"] + ([] if name == "train" else [name])
    for ex in train_cli.EXAMPLES[name]:
        words = shlex.split(ex)
        assert words[:len(prefix)] == prefix, ex
        assert ex in out
        make_parser().parse_args(words[len(prefix):])
    assert train_cli.DOCS in out and (ROOT / train_cli.DOCS).is_file()


def test_medmvl_train_help_lists_every_subcommand(capsys):
    out = _help(train_cli.main, ["--help"], capsys)
    for name in TRAIN_COMMANDS[1:]:
        assert f"  {name} " in out, f"medmvl-train --help does not list '{name}'"


def test_example_config_of_medmvl_train_exists():
    for name, examples in train_cli.EXAMPLES.items():
        for ex in examples:
            words = shlex.split(ex)
            if "--config" in words:
                config = words[words.index("--config") + 1]
                assert config == "CONFIG.yaml" or (ROOT / config).is_file(), f"{ex}: {config} does not exist"
