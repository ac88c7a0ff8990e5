"""How the panel talks to its worker: the transport (Qt networking by default, threads on
request) and the launcher, started from Slicer's startup environment.

Default: :class:`QtRunner` from the client's ``qt_transport`` (requests and the answer stream in
Qt's networking, jobs inline on the GUI thread, no Python threads in Slicer's process).
``MEDMVL_SLICER_TRANSPORT=threads`` selects the threaded client (the viewer's), for comparison
or as a fallback.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

from MedMVLSlicerLib.clientlib import launcher as _launcher
from MedMVLSlicerLib.clientlib import qt_transport

logger = logging.getLogger(__name__)

WorkerLauncher = _launcher.WorkerLauncher
TRANSPORT_ENV = "MEDMVL_SLICER_TRANSPORT"


def launcher_factory(base_env: dict[str, str] | None = None) -> Callable[..., Any]:
    """The threaded launcher class; with ``base_env`` (e.g. Slicer's startup environment) the
    worker starts from that environment instead of Slicer's own."""
    if base_env is None:
        return WorkerLauncher
    return functools.partial(WorkerLauncher, base_env=dict(base_env))


def transport_name(environ: dict[str, str] | None = None) -> str:
    """``"qt"`` (default) or ``"threads"``, from ``MEDMVL_SLICER_TRANSPORT``."""
    value = (environ if environ is not None else os.environ).get(TRANSPORT_ENV, "qt").strip().lower()
    if value not in ("qt", "threads"):
        logger.warning("%s=%r: use 'qt' or 'threads'; using 'qt'", TRANSPORT_ENV, value)
        return "qt"
    return value


def controller_options(base_env: dict[str, str] | None = None, qt: Any = None,
                       name: str | None = None) -> dict[str, Any]:
    """Keyword arguments of ``PanelController`` for the chosen transport: ``runner``,
    ``client_factory``, ``launcher_factory``. ``qt``: Slicer's ``qt`` module (None: found)."""
    name = name or transport_name()
    if name == "qt":
        try:
            runner = qt_transport.QtRunner(qt)
        except Exception as exc:  # no QtNetwork in this Qt binding: the threaded client still works
            logger.warning("MedM-VL: Qt networking is unavailable (%s); using the threaded client", exc)
        else:
            return {"runner": runner, "client_factory": runner.client_factory,
                    "launcher_factory": runner.launcher_factory(base_env)}
    return {"launcher_factory": launcher_factory(base_env)}
