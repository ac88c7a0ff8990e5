"""`medmvl` subcommands.

Each module in this package defines ``NAME`` (the subcommand), ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. :mod:`medmvl_core.cli` discovers them, so
adding a command never touches the CLI entry point. Heavy imports (torch, transformers)
belong inside ``run`` so ``medmvl --help`` stays fast.
"""
