"""Run ``medmvl serve`` with the tiny stand-in model (test fixture, never used in production).

``worker_helpers.toy_python`` writes an interpreter wrapper that runs this file instead of
``python -m medmvl_core.cli``; the checkpoint folder holds ``toy_spec.json`` (the keyword
arguments of :func:`medmvl_core.engine.testing.load_toy`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SPEC = "toy_spec.json"


def _load_toy_model(checkpoint, device="auto", dtype=None, quantize="none"):
    from medmvl_core.engine.testing import load_toy
    from medmvl_core.worker.loading import resolve_device, resolve_dtype
    spec = json.loads((Path(checkpoint) / SPEC).read_text())
    tok_dir = spec.pop("tokenizer_dir")
    dev = resolve_device(device)
    model, proc = load_toy(tok_dir, **{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in spec.items()})
    return model.to(dev, resolve_dtype(dtype, dev)).eval(), proc


def main(argv: list[str]) -> int:
    if argv[:2] == ["-m", "medmvl_core.cli"]:
        argv = argv[2:]
    from medmvl_core.worker import loading
    loading.load_model = _load_toy_model
    from medmvl_core.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
