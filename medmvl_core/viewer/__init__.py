"""The standalone desktop viewer (``medmvl viewer [FILE]``, extra ``viewer``: qtpy + PySide6).

A thin qtpy binding over :class:`medmvl_core.client.controller.PanelController`, the same
controller the Slicer module uses. Importing this package does not import Qt; use
:mod:`medmvl_core.viewer.window`.
"""
