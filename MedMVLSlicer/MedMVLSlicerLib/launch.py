"""Starting the worker from an extension install, where Slicer holds a client-only copy of
``medmvl_core`` (client + errors) that must not shadow the full package in the worker's Python."""

from __future__ import annotations

import os

import medmvl_core
from medmvl_core.client.launcher import WorkerLauncher

#: The folder holding the ``medmvl_core`` package this Python imported.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(medmvl_core.__file__)))


def is_client_only_install(parent: str = PACKAGE_PARENT) -> bool:
    """True when the imported ``medmvl_core`` is the extension's client-only copy."""
    return not os.path.isfile(os.path.join(parent, "medmvl_core", "cli.py"))


class ClientOnlyInstallLauncher(WorkerLauncher):
    """A :class:`WorkerLauncher` whose worker drops the client-only copy from ``sys.path``
    (the launcher puts it on ``PYTHONPATH``) and so imports the full, installed package."""

    def command(self) -> list[str]:
        cmd = super().command()  # [python, "-m", "medmvl_core.cli", *args]
        boot = ("import os, sys; d = os.path.abspath(%r); "
                "sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != d]; "
                "from medmvl_core.cli import main; sys.exit(main())") % PACKAGE_PARENT
        return [cmd[0], "-c", boot] + cmd[3:]


def launcher_factory():
    """The launcher class to use in this Python."""
    return ClientOnlyInstallLauncher if is_client_only_install() else WorkerLauncher
