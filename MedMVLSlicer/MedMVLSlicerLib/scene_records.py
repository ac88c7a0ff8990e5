"""Conversations kept in the MRML scene, so they are saved and loaded with the study.

Per volume node:

- a ``vtkMRMLTextNode`` holding the :class:`~medmvl_core.client.records.Conversation` as JSON,
  referenced from the volume with the role ``MedMVLConversation``;
- a ``vtkMRMLMarkupsROINode`` per box (found boxes, and the ROI a question was asked about),
  referenced from the text node with the role ``MedMVLBox``; each carries the attribute
  ``MedMVL.box`` = ``"TURN:found:N"`` or ``"TURN:region"`` (comma-separated when one ROI
  is the region of several questions) naming its place in the record.

Node references and attributes are written into the ``.mrml`` file, so saving the scene (or a
``.mrb`` bundle) and loading it back restores both the conversation and the boxes; node IDs may
change on import, so the record finds its ROI nodes through the references, not stored IDs.
Only VTK/MRML and the torch-free client are used (runs inside Slicer and against ``slicer-core``).
"""

from __future__ import annotations

import json
import logging

from MedMVLSlicerLib import mrml_geometry
from MedMVLSlicerLib.clientlib import RoiError, client_module

# The client's records module, whichever copy clientlib found (checkout or the extension's bundle).
records = client_module("records")
Conversation, RecordFormatError = records.Conversation, records.RecordFormatError

logger = logging.getLogger(__name__)

ROLE_CONVERSATION = "MedMVLConversation"
ROLE_BOX = "MedMVLBox"
ATTR_BOX = "MedMVL.box"
ATTR_FORMAT = "MedMVL.format"


def conversation_node(volume_node):
    """The text node holding the volume's conversation, or None."""
    return volume_node.GetNodeReference(ROLE_CONVERSATION) if volume_node is not None else None


def _box_key(turn: int, kind: str, n: int = 0) -> str:
    return f"{turn}:region" if kind == "region" else f"{turn}:found:{n}"


def _iter_boxes(conv: Conversation):
    """(key, box record) for every box of the conversation."""
    for t_index, turn in enumerate(conv.turns):
        if turn.region is not None:
            yield _box_key(t_index, "region"), turn.region
        for n, box in enumerate(turn.boxes):
            yield _box_key(t_index, "found", n), box


def _roi_nodes(text_node) -> dict[str, object]:
    out = {}
    for n in range(text_node.GetNumberOfNodeReferences(ROLE_BOX)):
        node = text_node.GetNthNodeReference(ROLE_BOX, n)
        for key in (node.GetAttribute(ATTR_BOX) or "").split(",") if node is not None else ():
            if key:
                out[key] = node
    return out


def store(scene, volume_node, conv: Conversation, region_roi=None) -> tuple[object, list]:
    """Write ``conv`` into the scene for ``volume_node``; returns (text node, new ROI nodes).

    Found boxes without an ROI node get a new one (named after what was asked, in the volume's
    voxel grid); ``region_roi`` (the ROI node the last question was asked about) is referenced
    as that turn's region. Existing nodes are reused, so calling this after every answer is
    cheap and idempotent.
    """
    if volume_node is None:
        raise ValueError("select an image first")
    text_node = conversation_node(volume_node)
    if text_node is None:
        text_node = scene.AddNewNodeByClass("vtkMRMLTextNode",
                                            scene.GenerateUniqueName(f"MedM-VL {volume_node.GetName()}"))
        text_node.SetAttribute(ATTR_FORMAT, records.FORMAT)
        volume_node.SetNodeReferenceID(ROLE_CONVERSATION, text_node.GetID())
    existing = _roi_nodes(text_node)
    last = len(conv.turns) - 1
    new_rois = []
    for key, box in _iter_boxes(conv):
        node = existing.get(key)
        if node is None and key == _box_key(last, "region") and region_roi is not None:
            node = region_roi
        elif node is None and box.source == "found" and len(box.voxel) == 6:
            name = scene.GenerateUniqueName(f"MedM-VL {(box.label or 'box').strip()[:40]}")
            try:
                node = mrml_geometry.voxel_box_to_roi_node(scene, volume_node, box.voxel, name)
            except RoiError as exc:  # a degenerate box: the record keeps it, no ROI is drawn
                logger.warning("no ROI for box %s: %s", box.voxel, exc)
                continue
            new_rois.append(node)
        if node is None:
            continue
        keys = [k for k in (node.GetAttribute(ATTR_BOX) or "").split(",") if k]
        if key not in keys:  # one ROI may be the region of several questions
            node.SetAttribute(ATTR_BOX, ",".join(keys + [key]))
        if not text_node.HasNodeReferenceID(ROLE_BOX, node.GetID()):
            text_node.AddNodeReferenceID(ROLE_BOX, node.GetID())
        box.roi_id = node.GetID()
    text_node.SetText(json.dumps(conv.to_dict(), indent=1))  # ASCII: safe in any .mrml
    return text_node, new_rois


def load(volume_node) -> Conversation | None:
    """The conversation stored for ``volume_node`` (None if there is none), with each box's
    ``roi_id`` set to its ROI node in this scene ("" when that node was deleted).

    Raises :class:`RecordFormatError` with a message for the panel when the stored text is
    damaged or comes from a newer version of the module.
    """
    text_node = conversation_node(volume_node)
    if text_node is None:
        return None
    try:
        conv = Conversation.from_json(text_node.GetText() or "")
    except RecordFormatError as exc:
        raise RecordFormatError(f"the MedM-VL conversation stored with "
                                f"'{volume_node.GetName()}' cannot be read: {exc}") from exc
    rois = _roi_nodes(text_node)
    for key, box in _iter_boxes(conv):
        node = rois.get(key)
        box.roi_id = node.GetID() if node is not None else ""
    conv.volume.key = volume_node.GetID()
    return conv


def forget(scene, volume_node) -> None:
    """Remove the volume's stored conversation (its ROI nodes stay in the scene)."""
    text_node = conversation_node(volume_node)
    if text_node is not None:
        volume_node.RemoveNodeReferenceIDs(ROLE_CONVERSATION)
        scene.RemoveNode(text_node)
