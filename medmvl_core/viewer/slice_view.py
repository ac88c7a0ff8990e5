"""The viewer's slice widget: shows one slice of a [k, j, i] volume (or a 2D image), scrolls
with the wheel / arrow keys, draws a box with the mouse, and overlays boxes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from qtpy import QtCore, QtGui, QtWidgets

from medmvl_core.viewer.display import drag_to_voxel_box, to_display

Box = tuple[int, int, int, int, int, int]


@dataclass
class Overlay:
    """A box drawn over the slices it spans. kind: "user" (drawn) or "found" (from the model)."""

    box: Box
    label: str = ""
    kind: str = "found"


class SliceView(QtWidgets.QWidget):
    """Slice display with mouse box drawing.

    ``on_box_drawn(box)`` is called when the user finishes a drag; ``on_slice_changed(k)``
    when the slice changes.
    """

    def __init__(self, parent: QtWidgets.QWidget | None = None):
        super().__init__(parent)
        self.setMinimumSize(320, 320)
        self.setFocusPolicy(QtCore.Qt.StrongFocus)
        self.setMouseTracking(False)
        self.array: np.ndarray | None = None
        self.spacing = (1.0, 1.0, 1.0)
        self.k = 0
        self.window: float | None = None
        self.level: float | None = None
        self.depth = 2
        self.overlays: list[Overlay] = []
        self._drag: tuple[tuple[float, float], tuple[float, float]] | None = None
        self.on_box_drawn: Callable[[Box], None] | None = None
        self.on_slice_changed: Callable[[int], None] | None = None

    # ------------------------------------------------------------------ data
    def set_volume(self, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> None:
        """array: [k, j, i] or [1, H, W, 3]; spacing in (i, j, k) order."""
        self.array = np.asarray(array)
        self.spacing = tuple(float(s) for s in spacing)
        self.overlays = []
        self.set_slice(self.array.shape[0] // 2)

    @property
    def num_slices(self) -> int:
        return 0 if self.array is None else int(self.array.shape[0])

    def set_slice(self, k: int) -> None:
        if self.array is None:
            return
        k = int(np.clip(k, 0, self.num_slices - 1))
        changed = k != self.k
        self.k = k
        self.update()
        if changed and self.on_slice_changed:
            self.on_slice_changed(k)

    def set_window(self, window: float | None, level: float | None) -> None:
        self.window, self.level = window, level
        self.update()

    def user_box(self) -> Box | None:
        for o in self.overlays:
            if o.kind == "user":
                return o.box
        return None

    def set_user_box(self, box: Box | None) -> None:
        self.overlays = [o for o in self.overlays if o.kind != "user"]
        if box is not None:
            self.overlays.append(Overlay(tuple(int(v) for v in box), "ROI", "user"))
        self.update()

    def clear_found_boxes(self) -> None:
        self.overlays = [o for o in self.overlays if o.kind != "found"]
        self.update()

    def add_found_box(self, box, label: str) -> None:
        """Overlay a model box and jump to its middle slice."""
        b = tuple(int(v) for v in box)
        self.overlays.append(Overlay(b, label, "found"))
        self.set_slice((b[0] + b[3] - 1) // 2)
        self.update()

    # ------------------------------------------------------------------ geometry
    def image_rect(self) -> QtCore.QRectF:
        """Where the slice is drawn: fitted to the widget with the physical aspect ratio."""
        if self.array is None:
            return QtCore.QRectF()
        nj, ni = self.array.shape[1], self.array.shape[2]
        w_mm, h_mm = ni * self.spacing[0], nj * self.spacing[1]
        scale = min(self.width() / w_mm, self.height() / h_mm)
        w, h = w_mm * scale, h_mm * scale
        return QtCore.QRectF((self.width() - w) / 2.0, (self.height() - h) / 2.0, w, h)

    def to_index(self, pos: QtCore.QPointF) -> tuple[float, float]:
        """Widget position -> continuous (i, j) voxel-edge coordinates (0..ni, 0..nj)."""
        r = self.image_rect()
        nj, ni = self.array.shape[1], self.array.shape[2]
        return ((pos.x() - r.x()) / r.width() * ni, (pos.y() - r.y()) / r.height() * nj)

    def to_widget(self, i: float, j: float) -> QtCore.QPointF:
        r = self.image_rect()
        nj, ni = self.array.shape[1], self.array.shape[2]
        return QtCore.QPointF(r.x() + i / ni * r.width(), r.y() + j / nj * r.height())

    # ------------------------------------------------------------------ painting
    def paintEvent(self, event) -> None:
        p = QtGui.QPainter(self)
        p.fillRect(self.rect(), QtGui.QColor(0, 0, 0))
        if self.array is None:
            p.setPen(QtGui.QColor(200, 200, 200))
            p.drawText(self.rect(), QtCore.Qt.AlignCenter, "Open an image (File > Open)")
            p.end()
            return
        rgb = to_display(self.array[self.k], self.window, self.level)
        h, w = rgb.shape[:2]
        img = QtGui.QImage(rgb.data, w, h, 3 * w, QtGui.QImage.Format_RGB888).copy()
        p.setRenderHint(QtGui.QPainter.SmoothPixmapTransform, False)
        p.drawImage(self.image_rect(), img)
        for o in self.overlays:
            k1, j1, i1, k2, j2, i2 = o.box
            if not k1 <= self.k < k2:
                continue
            color = QtGui.QColor(255, 200, 0) if o.kind == "user" else QtGui.QColor(0, 230, 90)
            p.setPen(QtGui.QPen(color, 2))
            rect = QtCore.QRectF(self.to_widget(i1, j1), self.to_widget(i2, j2))
            p.drawRect(rect)
            if o.label:
                p.drawText(rect.topLeft() + QtCore.QPointF(2, -4), o.label[:40])
        if self._drag is not None:
            p.setPen(QtGui.QPen(QtGui.QColor(255, 200, 0), 1, QtCore.Qt.DashLine))
            (i0, j0), (i1_, j1_) = self._drag
            p.drawRect(QtCore.QRectF(self.to_widget(i0, j0), self.to_widget(i1_, j1_)))
        p.setPen(QtGui.QColor(220, 220, 220))
        p.drawText(8, 18, f"slice {self.k + 1}/{self.num_slices}")
        p.end()

    # ------------------------------------------------------------------ interaction
    def mousePressEvent(self, event) -> None:
        if self.array is not None and event.button() == QtCore.Qt.LeftButton:
            ij = self.to_index(event.position() if hasattr(event, "position") else event.pos())
            self._drag = (ij, ij)
            self.update()

    def mouseMoveEvent(self, event) -> None:
        if self._drag is not None:
            ij = self.to_index(event.position() if hasattr(event, "position") else event.pos())
            self._drag = (self._drag[0], ij)
            self.update()

    def mouseReleaseEvent(self, event) -> None:
        if self._drag is None or event.button() != QtCore.Qt.LeftButton:
            return
        ij = self.to_index(event.position() if hasattr(event, "position") else event.pos())
        start = self._drag[0]
        self._drag = None
        box = drag_to_voxel_box(start, ij, self.k, self.depth, self.array.shape)
        self.set_user_box(box)
        if self.on_box_drawn:
            self.on_box_drawn(box)

    def wheelEvent(self, event) -> None:
        step = 1 if event.angleDelta().y() > 0 else -1
        self.set_slice(self.k + step)

    def keyPressEvent(self, event) -> None:
        if event.key() in (QtCore.Qt.Key_Up, QtCore.Qt.Key_PageUp):
            self.set_slice(self.k + 1)
        elif event.key() in (QtCore.Qt.Key_Down, QtCore.Qt.Key_PageDown):
            self.set_slice(self.k - 1)
        else:
            super().keyPressEvent(event)
