"""MedM-VL for 3D Slicer: the library.

This top-level package must stay importable without torch: the Slicer module and the
standalone viewer import only :mod:`medmvl_core.client` (standard library + numpy).
"""

__version__ = "0.1.0"
