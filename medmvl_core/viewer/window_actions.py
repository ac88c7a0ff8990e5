"""The viewer window's file actions: label maps as regions, saving, reopening and exporting
the conversation (a mixin of :class:`~medmvl_core.viewer.window.ViewerWindow`)."""

from __future__ import annotations

import os
from pathlib import Path

from qtpy import QtWidgets

from medmvl_core.client import records


class FileActions:
    """Needs ``self.volume``, ``self.controller``, ``self.view``, ``self.labelCombo``,
    ``self.labelRow``, ``self.statusLabel``, ``self.source_path``, ``self._guarded`` and
    ``self._on_box_drawn`` (all set by the window)."""

    def open_labelmap_dialog(self) -> None:
        path, _ = QtWidgets.QFileDialog.getOpenFileName(
            self, "Open label map", "", "Label maps (*.nii *.nii.gz *.nrrd *.seg.nrrd *.mha *.dcm);;All (*)")
        if path:
            self._guarded(self.load_labelmap, path)

    def load_labelmap(self, path: str | os.PathLike) -> None:
        """Read a label map (NIfTI / NRRD / MHA) or DICOM SEG and list its labels."""
        from medmvl_core.viewer.labelmaps import read_label_map

        if self.volume is None:
            raise ValueError("open the image first, then its label map")
        lm = read_label_map(path)
        self.labelmap = lm
        self.labelCombo.clear()
        for label in lm.labels():
            self.labelCombo.addItem(f"{label}: {lm.name(label)}", label)
        self.labelRow.setVisible(True)
        self.statusLabel.setText(f"label map with {len(lm.labels())} labels: pick one as the region")

    def use_label(self, label: int) -> None:
        """Make a label's bounding box on the image the region (the ROI)."""
        from medmvl_core.viewer.labelmaps import label_region

        if self.labelmap is None or self.volume is None or label is None:
            raise ValueError("load a label map and pick a label first")
        region = label_region(self.labelmap, int(label), self.volume.array.shape,
                              self.volume.ijk_to_ras,
                              self.volume.dicom.get("frame_of_reference_uid", ""))
        self.view.set_user_box(region.box)
        self.view.set_position([(region.box[a] + region.box[a + 3] - 1) // 2 for a in range(3)])
        self._on_box_drawn(region.box, "segment", self.labelmap.name(int(label)))
        if region.clipped:
            self.statusLabel.setText(self.statusLabel.text() + " (clipped: the label extends beyond the image)")

    def export_dialog(self, kind: str) -> None:
        filters = {"json": "Conversation (*.json)", "md": "Markdown (*.md)", "dcm": "DICOM SR (*.dcm)"}
        path, _ = QtWidgets.QFileDialog.getSaveFileName(self, "Save conversation", "", filters[kind])
        if path:
            self._guarded(self.export_conversation, path, kind)

    def export_conversation(self, path: str | os.PathLike, kind: str) -> None:
        """Write the shown image's conversation: "json" (reopens), "md", "txt" or "dcm" (SR)."""
        from medmvl_core.viewer.files import export_conversation

        conv = self.controller.conversations.get(self.volume.key) if self.volume is not None else None
        export_conversation(conv, path, kind, self.source_path)
        self.statusLabel.setText(f"saved {Path(path).name}")

    def open_conversation_dialog(self) -> None:
        path, _ = QtWidgets.QFileDialog.getOpenFileName(self, "Open conversation", "", "Conversation (*.json)")
        if path:
            self._guarded(self.open_conversation, path)

    def open_conversation(self, path: str | os.PathLike) -> None:
        """Show a saved conversation (and its boxes) with the image that is open."""
        if self.volume is None:
            raise ValueError("open the image the conversation is about first")
        conv = records.Conversation.from_json(Path(path).read_text(encoding="utf-8"))
        if conv.volume.shape and list(conv.volume.shape) != list(self.volume.array.shape):
            raise ValueError(f"the conversation is about an image of shape {conv.volume.shape}, "
                             f"not the open one {list(self.volume.array.shape)}; open that image first")
        self.controller.restore(self.volume.key, conv)
        self.view.clear_found_boxes()
        for t in conv.turns:
            for b in t.boxes:
                if len(b.voxel) == 6:
                    self.view.add_found_box(b.voxel, b.label)
        self.render_chat()
