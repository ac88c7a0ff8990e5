"""The viewer's slice widgets: axial, coronal and sagittal views of one [k, j, i] volume (or one
2D image) sharing a :class:`ViewState` — the crosshair position, window/level, the drawn ROI and
the found boxes — so a change in one view shows in all. Each view scrolls with the wheel /
arrow keys, sets the crosshair with a click and draws a box with a drag."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from qtpy import QtCore, QtGui, QtWidgets

from medmvl_core.viewer.display import PLANES, box_in_plane, drag_to_box, plane_image, to_display

Box = tuple[int, int, int, int, int, int]
AXIS_NAMES = {0: "axial", 1: "coronal", 2: "sagittal"}
_CLICK_PX = 4  # a press and release closer than this is a click (crosshair), not a drag


@dataclass
class Overlay:
    """A box drawn in every view it intersects. kind: "user" (drawn) or "found" (from the model)."""

    box: Box
    label: str = ""
    kind: str = "found"


@dataclass
class ViewState:
    """What the three views share. pos: crosshair voxel (k, j, i); spacing: (i, j, k) mm."""

    array: np.ndarray | None = None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    pos: list[int] = field(default_factory=lambda: [0, 0, 0])
    window: float | None = None
    level: float | None = None
    depth: int = 2
    overlays: list[Overlay] = field(default_factory=list)
    flip_rows: bool = True
    views: list = field(default_factory=list)

    def changed(self) -> None:
        for v in self.views:
            v.update()


class SliceView(QtWidgets.QWidget):
    """One plane of the shared state. ``axis``: the array axis it slices (0 axial k, 1 coronal j,
    2 sagittal i). ``on_box_drawn(box)`` after a drag, ``on_slice_changed(index)`` when this
    view's slice changes, ``on_position_changed(pos)`` when the crosshair moves."""

    def __init__(self, parent: QtWidgets.QWidget | None = None, axis: int = 0,
                 state: ViewState | None = None):
        super().__init__(parent)
        self.axis = int(axis)
        self.state = state if state is not None else ViewState()
        self.state.views.append(self)
        self.setMinimumSize(220, 220)
        self.setFocusPolicy(QtCore.Qt.StrongFocus)
        self._drag: tuple[tuple[float, float], tuple[float, float]] | None = None
        self._press_px: QtCore.QPointF | None = None
        self.on_box_drawn: Callable[[Box], None] | None = None
        self.on_slice_changed: Callable[[int], None] | None = None
        self.on_position_changed: Callable[[list[int]], None] | None = None
        self.show_crosshair = True

    # ------------------------------------------------------------------ shared state
    @property
    def array(self) -> np.ndarray | None:
        return self.state.array

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.state.spacing

    @property
    def overlays(self) -> list[Overlay]:
        return self.state.overlays

    @overlays.setter
    def overlays(self, value: list[Overlay]) -> None:
        self.state.overlays = value

    @property
    def window(self) -> float | None:
        return self.state.window

    @property
    def level(self) -> float | None:
        return self.state.level

    @property
    def depth(self) -> int:
        return self.state.depth

    @depth.setter
    def depth(self, value: int) -> None:
        self.state.depth = int(value)

    @property
    def k(self) -> int:
        """This view's slice index (k for the axial view)."""
        return int(self.state.pos[self.axis])

    def set_volume(self, array: np.ndarray, spacing=(1.0, 1.0, 1.0), flip_rows: bool = True) -> None:
        """array: [k, j, i] or [1, H, W(, 3)]; spacing in (i, j, k) order. Resets the state."""
        st = self.state
        st.array = np.asarray(array)
        st.spacing = tuple(float(s) for s in spacing)  # type: ignore[assignment]
        st.overlays = []
        st.flip_rows = flip_rows
        st.pos = [int(n) // 2 for n in st.array.shape[:3]]
        st.changed()

    @property
    def num_slices(self) -> int:
        return 0 if self.array is None else int(self.array.shape[self.axis])

    def set_slice(self, index: int) -> None:
        if self.array is None:
            return
        index = int(np.clip(index, 0, self.num_slices - 1))
        changed = index != self.k
        self.state.pos[self.axis] = index
        self.state.changed()
        if changed and self.on_slice_changed:
            self.on_slice_changed(index)

    def set_position(self, pos) -> None:
        """Move the crosshair to voxel (k, j, i) (clipped) in every view."""
        if self.array is None:
            return
        self.state.pos = [int(np.clip(int(p), 0, n - 1)) for p, n in zip(pos, self.array.shape[:3])]
        self.state.changed()
        if self.on_position_changed:
            self.on_position_changed(list(self.state.pos))

    def set_window(self, window: float | None, level: float | None) -> None:
        self.state.window, self.state.level = window, level
        self.state.changed()

    def user_box(self) -> Box | None:
        for o in self.overlays:
            if o.kind == "user":
                return o.box
        return None

    def set_user_box(self, box: Box | None) -> None:
        self.state.overlays = [o for o in self.overlays if o.kind != "user"]
        if box is not None:
            self.state.overlays.append(Overlay(tuple(int(v) for v in box), "ROI", "user"))
        self.state.changed()

    def clear_found_boxes(self) -> None:
        self.state.overlays = [o for o in self.overlays if o.kind != "found"]
        self.state.changed()

    def add_found_box(self, box, label: str) -> None:
        """Overlay a model box and move the crosshair to its centre (shown in all views)."""
        b = tuple(int(v) for v in box)
        self.state.overlays.append(Overlay(b, label, "found"))
        self.set_position([(b[a] + b[a + 3] - 1) // 2 for a in range(3)])

    # ------------------------------------------------------------------ geometry
    def _plane_shape(self) -> tuple[int, int]:
        r_axis, c_axis = PLANES[self.axis]
        return int(self.array.shape[r_axis]), int(self.array.shape[c_axis])

    def _flipped(self) -> bool:
        return self.axis != 0 and self.state.flip_rows

    def image_rect(self) -> QtCore.QRectF:
        """Where the plane is drawn: fitted to the widget with the physical aspect ratio."""
        if self.array is None:
            return QtCore.QRectF()
        r_axis, c_axis = PLANES[self.axis]
        nr, nc = self._plane_shape()
        w_mm, h_mm = nc * self.spacing[2 - c_axis], nr * self.spacing[2 - r_axis]
        scale = min(self.width() / w_mm, self.height() / h_mm)
        w, h = w_mm * scale, h_mm * scale
        return QtCore.QRectF((self.width() - w) / 2.0, (self.height() - h) / 2.0, w, h)

    def to_index(self, pos: QtCore.QPointF) -> tuple[float, float]:
        """Widget position -> continuous (column, row) voxel-edge coordinates of this plane
        ((i, j) in the axial view; rows are k in the others, stored bottom-up when flipped)."""
        r = self.image_rect()
        nr, nc = self._plane_shape()
        c = (pos.x() - r.x()) / r.width() * nc
        row = (pos.y() - r.y()) / r.height() * nr
        return (c, nr - row if self._flipped() else row)

    def to_widget(self, c: float, row: float) -> QtCore.QPointF:
        r = self.image_rect()
        nr, nc = self._plane_shape()
        if self._flipped():
            row = nr - row
        return QtCore.QPointF(r.x() + c / nc * r.width(), r.y() + row / nr * r.height())

    # ------------------------------------------------------------------ painting
    def paintEvent(self, event) -> None:
        p = QtGui.QPainter(self)
        p.fillRect(self.rect(), QtGui.QColor(0, 0, 0))
        if self.array is None:
            p.setPen(QtGui.QColor(200, 200, 200))
            p.drawText(self.rect(), QtCore.Qt.AlignCenter, "Open an image (File > Open)")
            p.end()
            return
        plane = plane_image(self.array, self.axis, self.k, flip_rows=self._flipped())
        rgb = to_display(plane, self.window, self.level)
        h, w = rgb.shape[:2]
        img = QtGui.QImage(rgb.data, w, h, 3 * w, QtGui.QImage.Format_RGB888).copy()
        p.setRenderHint(QtGui.QPainter.SmoothPixmapTransform, False)
        p.drawImage(self.image_rect(), img)
        if self.show_crosshair and self.array.shape[0] > 1:
            self._paint_crosshair(p)
        for o in self.overlays:
            rect = box_in_plane(o.box, self.axis, self.k)
            if rect is None:
                continue
            (c1, r1), (c2, r2) = rect
            color = QtGui.QColor(255, 200, 0) if o.kind == "user" else QtGui.QColor(0, 230, 90)
            p.setPen(QtGui.QPen(color, 2))
            qrect = QtCore.QRectF(self.to_widget(c1, r1), self.to_widget(c2, r2)).normalized()
            p.drawRect(qrect)
            if o.label:
                p.drawText(qrect.topLeft() + QtCore.QPointF(2, -4), o.label[:40])
        if self._drag is not None:
            p.setPen(QtGui.QPen(QtGui.QColor(255, 200, 0), 1, QtCore.Qt.DashLine))
            (c0, r0), (c1_, r1_) = self._drag
            p.drawRect(QtCore.QRectF(self.to_widget(c0, r0), self.to_widget(c1_, r1_)).normalized())
        p.setPen(QtGui.QColor(220, 220, 220))
        name = AXIS_NAMES[self.axis] if self.array.shape[0] > 1 else "image"
        p.drawText(8, 18, f"{name} {self.k + 1}/{self.num_slices}")
        p.end()

    def _paint_crosshair(self, p: QtGui.QPainter) -> None:
        r_axis, c_axis = PLANES[self.axis]
        c, row = self.state.pos[c_axis] + 0.5, self.state.pos[r_axis] + 0.5
        nr, nc = self._plane_shape()
        p.setPen(QtGui.QPen(QtGui.QColor(80, 160, 255, 160), 1))
        p.drawLine(self.to_widget(c, 0), self.to_widget(c, nr))
        p.drawLine(self.to_widget(0, row), self.to_widget(nc, row))

    # ------------------------------------------------------------------ interaction
    def _event_pos(self, event) -> QtCore.QPointF:
        return event.position() if hasattr(event, "position") else QtCore.QPointF(event.pos())

    def mousePressEvent(self, event) -> None:
        if self.array is not None and event.button() == QtCore.Qt.LeftButton:
            self._press_px = self._event_pos(event)
            ij = self.to_index(self._press_px)
            self._drag = (ij, ij)
            self.update()

    def mouseMoveEvent(self, event) -> None:
        if self._drag is not None:
            self._drag = (self._drag[0], self.to_index(self._event_pos(event)))
            self.update()

    def mouseReleaseEvent(self, event) -> None:
        if self._drag is None or event.button() != QtCore.Qt.LeftButton:
            return
        px = self._event_pos(event)
        end = self.to_index(px)
        start = self._drag[0]
        self._drag = None
        if self._press_px is not None and (px - self._press_px).manhattanLength() < _CLICK_PX:
            r_axis, c_axis = PLANES[self.axis]  # a click: move the crosshair there
            pos = list(self.state.pos)
            pos[c_axis], pos[r_axis] = int(np.floor(end[0])), int(np.floor(end[1]))
            self.set_position(pos)
            return
        box = drag_to_box(start, end, self.axis, self.k, self.depth, self.array.shape)
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
