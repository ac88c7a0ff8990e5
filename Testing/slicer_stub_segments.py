"""Stand-in for Slicer's ``qMRMLSegmentSelectorWidget`` (a test helper: no tests here), built by
:func:`slicer_stubs.load_ui_widgets` for a ``<widget class="qMRMLSegmentSelectorWidget">``.

It copies the real widget's API and behaviour in single-selection mode, as read from Slicer's
``Libs/MRML/Widgets/qMRMLSegmentSelectorWidget.cxx`` and ``.h``:

- ``setMRMLScene``, ``currentNode()``, ``currentNodeID()``, ``setCurrentNode``,
  ``setCurrentNodeID``, ``currentSegmentID()``, ``setCurrentSegmentID``, ``noneEnabled`` /
  ``setNoneEnabled``; signals ``currentNodeChanged(vtkMRMLNode*)``, ``currentNodeChanged(bool)``
  and ``currentSegmentChanged(QString)``.
- Its inner node selector lists ``vtkMRMLSegmentationNode`` only.
- Choosing a segmentation repopulates the segment list *before* ``currentNodeChanged`` is
  re-emitted (the inner combobox's signal reaches ``onCurrentNodeChanged`` first). The stored
  segment ID is kept when the new segmentation has it, or when "None" is enabled and no segment
  was chosen (then "None" stays selected, silently); otherwise the first segment is selected and
  ``currentSegmentChanged`` is emitted.
- A segmentation without segments (or no segmentation) empties the list but does NOT clear the
  stored ``currentSegmentID()``: the real widget keeps the previous ID, so a caller must check
  that the ID belongs to ``currentNode()``.
- Segments added, removed or renamed repopulate the list (the real widget observes the node's
  ``vtkSegmentation`` events; so does this stub, through slicer-core's real VTK observers).
"""

from __future__ import annotations

from slicer_stubs import FakeWidget

NONE_DISPLAY = "None"  # the real widget's "None" item (text and data)


class FakeSegmentSelectorWidget(FakeWidget):
    """``qMRMLSegmentSelectorWidget`` in single-selection mode (see the module docstring)."""

    NODE_CLASS = "vtkMRMLSegmentationNode"

    def __init__(self, name: str = "", cls: str = "qMRMLSegmentSelectorWidget", props: dict | None = None):
        super().__init__(name, cls, props)
        self.nodeTypes = (self.NODE_CLASS,)
        self._segment_items: list[tuple[str, str]] = []  # (shown name, segment ID or NONE_DISPLAY)
        self._segment_index = -1
        self._current_segment_id = ""
        self._observations: list[int] = []
        self.message = ""

    # ---- the segmentation node (the inner qMRMLNodeComboBox)
    def lists(self, node) -> bool:
        return node.IsA(self.NODE_CLASS)

    def setCurrentNode(self, node):
        if node is not None and not self.lists(node):
            node = None
        if node is self._node:
            return
        old = self._node
        self._node = node
        self._reobserve(old, node)
        self.populateSegmentCombobox()  # onCurrentNodeChanged runs before the re-emitted signal
        self.emit("currentNodeChanged(vtkMRMLNode*)", node)
        self.emit("currentNodeChanged(bool)", node is not None)

    def setCurrentNodeID(self, node_id: str):
        self.setCurrentNode(self.scene.GetNodeByID(node_id) if self.scene is not None and node_id else None)

    def currentNodeID(self) -> str:  # a Q_INVOKABLE method here, not a property as on qMRMLNodeComboBox
        return self._node.GetID() if self._node is not None else ""

    def _reobserve(self, old, new) -> None:
        import slicer  # the stub module, carrying slicer-core's segmentation classes

        if old is not None:
            for tag in self._observations:
                old.RemoveObserver(tag)
        self._observations = []
        if new is not None:
            seg = slicer.vtkSegmentation
            for event in (seg.SegmentAdded, seg.SegmentRemoved, seg.SegmentModified):
                self._observations.append(
                    new.AddObserver(event, lambda *_a: self.populateSegmentCombobox()))

    # ---- the segment list
    def setNoneEnabled(self, enable: bool) -> None:
        self.noneEnabled = bool(enable)
        self.populateSegmentCombobox()

    def populateSegmentCombobox(self) -> None:
        self._segment_items, self._segment_index = [], -1  # cleared with signals blocked
        segmentation = self._node.GetSegmentation() if self._node is not None else None
        if segmentation is None or segmentation.GetNumberOfSegments() == 0:
            self.message = "No segments in segmentation" if self._node is not None else "No node is selected"
            return  # the stored segment ID is kept, as in the real widget
        self.message = ""
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        items = [(NONE_DISPLAY, NONE_DISPLAY)] if self.noneEnabled else []
        self._segment_items = items + [(segmentation.GetSegment(i).GetName(), i) for i in ids]
        current = self._current_segment_id
        if (self.noneEnabled and not current) or current in ids:
            self._segment_index = 0 if not current else self._find(current)  # restored silently
        else:
            self._set_index(1 if self.noneEnabled else 0)  # the first segment, announced

    def _find(self, segment_id: str) -> int:
        return next((n for n, (_, d) in enumerate(self._segment_items) if d == segment_id), -1)

    def _set_index(self, index: int) -> None:
        if index == self._segment_index:  # QComboBox emits only on a change
            return
        self._segment_index = index
        if self._node is None:
            return
        data = self._segment_items[index][1]
        self._current_segment_id = "" if data == NONE_DISPLAY else data
        self.emit("currentSegmentChanged(QString)", self._current_segment_id)

    def currentSegmentID(self) -> str:
        return self._current_segment_id

    def setCurrentSegmentID(self, segment_id: str) -> None:
        if not segment_id and self.noneEnabled:
            self._set_index(0)
            return
        index = self._find(segment_id)
        if index != -1:
            self._set_index(index)

    def shownSegments(self) -> list[tuple[str, str]]:
        """(name, ID) of the segments the list offers (stub-only introspection, like
        :meth:`FakeWidget.listedNodes`)."""
        return [(n, d) for n, d in self._segment_items if d != NONE_DISPLAY]
