"""Where the module's worker client comes from, found without side effects on Slicer's Python.

The module uses only the client (standard library + numpy). In order:

1. **A source checkout** (the module added from ``<checkout>/MedMVLSlicer`` in Application
   Settings -> Modules -> Additional module paths): ``<checkout>/medmvl_core`` is imported *by its
   location*; the checkout root is never put on ``sys.path``, so its other top-level folders
   (``bench``, ``training``, ``scripts``) cannot hide packages of those names in Slicer.
2. **The extension build**: ``medmvl_client``, the client bundled beside the module under a name of
   its own (``scripts/bundle_slicer_client.py``), never a second ``medmvl_core``.
3. **An installed package** in Slicer's Python: ``medmvl_client``, else ``medmvl_core``.

Otherwise :class:`ClientNotFoundError` says what to do. The names below (``controller``,
``errors``, ``roi_geometry``, ``launcher``, ``qt_transport``, ``RoiError``, ``SOURCE``) are the
same whichever copy was found; the module and its Lib import them from here (other client
modules through :func:`client_module`).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from types import ModuleType

logger = logging.getLogger(__name__)

BUNDLE = "medmvl_client"
#: The folder holding MedMVLSlicer.py (a checkout's MedMVLSlicer/, or the extension's
#: qt-scripted-modules/).
MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ClientNotFoundError(ImportError):
    """Neither a checkout, the extension's bundle nor an installed client was found."""


def _checkout_root(module_dir: str) -> str | None:
    root = os.path.dirname(module_dir)
    init = os.path.join(root, "medmvl_core", "client", "__init__.py")
    return root if os.path.isfile(init) else None


def _import_by_location(name: str, package_dir: str) -> ModuleType:
    """Import package ``name`` from ``package_dir`` without adding its parent to ``sys.path``
    (its submodules are found through the package's own ``__path__``)."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(package_dir, "__init__.py"), submodule_search_locations=[package_dir])
    if spec is None or spec.loader is None:
        raise ClientNotFoundError(f"cannot import {name} from {package_dir}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def find_client(module_dir: str = MODULE_DIR) -> tuple[str, str]:
    """Import the client; returns ``(package name, where it was found)``."""
    root = _checkout_root(module_dir)
    if root is not None:
        loaded = sys.modules.get("medmvl_core")
        if loaded is None:
            _import_by_location("medmvl_core", os.path.join(root, "medmvl_core"))
        elif os.path.dirname(os.path.dirname(os.path.abspath(loaded.__file__ or ""))) != root:
            logger.info("medmvl_core already imported from %s; using it", loaded.__file__)
        importlib.import_module("medmvl_core.client")
        return "medmvl_core.client", f"checkout {root}"
    bundle = os.path.join(module_dir, BUNDLE)  # installed beside the module by the extension
    if os.path.isfile(os.path.join(bundle, "__init__.py")):
        if BUNDLE not in sys.modules:
            _import_by_location(BUNDLE, bundle)
        return BUNDLE, f"bundle {bundle}"
    for name in (BUNDLE, "medmvl_core.client"):
        try:
            importlib.import_module(name)
            return name, f"installed {name}"
        except ImportError:
            continue
    raise ClientNotFoundError(
        "MedM-VL: the worker client was not found. Either build and install the MedM-VL "
        "extension (it bundles the client as 'medmvl_client'), or add the 'MedMVLSlicer' folder "
        "of a complete source checkout (the one beside 'medmvl_core') in Application Settings > "
        f"Modules > Additional module paths. This module is in {module_dir}. "
        "See docs/slicer-install.md and docs/slicer.md#when-something-goes-wrong.")


def client_module(name: str) -> ModuleType:
    """Another module of the client found here, e.g. ``client_module("records")``: the module and
    its Lib never import ``medmvl_core.client.X`` by name (the extension has ``medmvl_client.X``)."""
    return importlib.import_module(f"{PACKAGE}.{name}")


PACKAGE, SOURCE = find_client()
controller = importlib.import_module(PACKAGE + ".controller")
errors = importlib.import_module(PACKAGE + ".errors")
launcher = importlib.import_module(PACKAGE + ".launcher")
qt_transport = importlib.import_module(PACKAGE + ".qt_transport")
roi_geometry = importlib.import_module(PACKAGE + ".roi_geometry")
core_errors = importlib.import_module(
    "medmvl_core.errors" if PACKAGE == "medmvl_core.client" else BUNDLE + "._core_errors")
RoiError = core_errors.RoiError
logger.debug("MedM-VL client: %s (%s)", PACKAGE, SOURCE)
