"""Starting the worker from Slicer. An extension install holds a client-only copy of
``medmvl_core`` (client + errors); :class:`WorkerLauncher` puts its folder on the worker's
``PYTHONPATH`` only when it holds the full package, so that copy never hides the full package
installed in the worker's Python."""

from __future__ import annotations

import functools
import os
from typing import Callable

import medmvl_core
from medmvl_core.client.launcher import WorkerLauncher, has_full_package

#: The folder holding the ``medmvl_core`` package this Python imported.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(medmvl_core.__file__)))


def is_client_only_install(parent: str = PACKAGE_PARENT) -> bool:
    """True when the imported ``medmvl_core`` is the extension's client-only copy."""
    return not has_full_package(parent)


def launcher_factory(base_env: dict[str, str] | None = None) -> Callable[..., WorkerLauncher]:
    """The launcher class to use; with ``base_env`` (e.g. Slicer's startup environment) the
    worker starts from that environment instead of Slicer's own."""
    if base_env is None:
        return WorkerLauncher
    return functools.partial(WorkerLauncher, base_env=dict(base_env))
