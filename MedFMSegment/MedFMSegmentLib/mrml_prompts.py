"""MRML layer, the effect's prompts in the scene: segment tags, prompt markers and slice writes.

- Segment tags (saved with the segmentation, restored by the Segment Editor's undo / redo): the prompt
  list of a segment (:data:`interaction.PROMPTS_TAG`), the organ adapter of a segment (:data:`ADAPTER_TAG`)
  and the slices the user accepted as corrected (:data:`ACCEPTED_TAG`), so a pin outlives a switch to another
  segment, a saved and reloaded scene and a new Slicer session.
- :class:`PromptMarkers`: include points, exclude points and boxes as markups nodes; a marker the user
  drags or deletes is reported back as ``on_moved(prompt_id, point_ijk)`` / ``on_removed(prompt_id)``.
- :func:`slice_mask_from_segment` (the slice a user accepts as corrected) and :func:`write_slices`
  (MedFM's slice results, honouring the Segment Editor's masking settings).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import slicer
import vtk

from . import geometry
from .errors import InputError
from .interaction import PROMPTS_TAG, Prompt
from .mrml_editor import editor_settings, editor_settings_for_volume
from .mrml_labelmaps import _check_segmentation_node, _read_segment_box
from .mrml_segments import SegmentUndoState, write_mask_to_segment
from .mrml_volumes import _checked_matrix

logger = logging.getLogger(__name__)

#: Segment tag naming the adapter folder used for that segment (organ) by MedFM Segment.
ADAPTER_TAG = "MedFM.Adapter"
#: Segment tag listing the slices the user accepted as corrected: JSON ``[["axial", 12], ...]``.
ACCEPTED_TAG = "MedFM.AcceptedSlices"
_AXES = ("axial", "coronal", "sagittal")
INCLUDE_COLOR = (0.2, 0.85, 0.2)
EXCLUDE_COLOR = (0.95, 0.25, 0.2)
BOX_COLOR = (1.0, 0.85, 0.1)


# ----------------------------------------------------------------------------------------------------
# Segment tags


def _segment(segmentation_node, segment_id: str):
    segmentation = _check_segmentation_node(segmentation_node)
    segment = segmentation.GetSegment(segment_id) if segment_id else None
    if segment is None:
        ids = ", ".join(repr(s) for s in segmentation.GetSegmentIDs()) or "none"
        raise InputError(f"segmentation {segmentation_node.GetName()!r} has no segment ID {segment_id!r} (IDs: {ids})")
    return segment


def segment_tag(segmentation_node, segment_id: str, tag: str) -> Optional[str]:
    """The value of a segment tag, or None if the segment does not have it."""
    value = vtk.reference("")
    return str(value) if _segment(segmentation_node, segment_id).GetTag(tag, value) else None


def set_segment_tag(segmentation_node, segment_id: str, tag: str, value: Optional[str]) -> None:
    """Set (or with None remove) a segment tag; it is saved with the segmentation."""
    segment = _segment(segmentation_node, segment_id)
    if value is None:
        segment.RemoveTag(tag)
    else:
        segment.SetTag(tag, str(value))


def set_segment_adapter(segmentation_node, segment_id: str, adapter_dir) -> None:
    """Attach an adapter folder to one segment (None or "" detaches it). The folder must exist."""
    if adapter_dir is None or not str(adapter_dir).strip():
        set_segment_tag(segmentation_node, segment_id, ADAPTER_TAG, None)
        return
    path = os.path.abspath(os.path.expanduser(os.fspath(adapter_dir).strip()))
    if not os.path.isdir(path):
        raise InputError(f"adapter folder not found: {path}")
    set_segment_tag(segmentation_node, segment_id, ADAPTER_TAG, path)


def segment_adapter(segmentation_node, segment_id: str) -> Optional[str]:
    """The adapter folder attached to a segment, or None."""
    return segment_tag(segmentation_node, segment_id, ADAPTER_TAG) or None


def stored_prompts(segmentation_node, segment_id: str) -> Optional[str]:
    """The prompt-list text stored in a segment (see :meth:`interaction.Interaction.text`), or None."""
    return segment_tag(segmentation_node, segment_id, PROMPTS_TAG)


def store_prompts(segmentation_node, segment_id: str, text: str) -> None:
    set_segment_tag(segmentation_node, segment_id, PROMPTS_TAG, text)


def accepted_slices(segmentation_node, segment_id: str) -> set:
    """{(axis, index)} the user accepted as corrected slices of this segment (empty if none).

    A tag that cannot be read (edited by hand, another version) is ignored with a warning: the segment's
    voxels are untouched, only the pins are lost.
    """
    text = segment_tag(segmentation_node, segment_id, ACCEPTED_TAG)
    if not text:
        return set()
    try:
        items = json.loads(text)
        keys = {(str(axis), int(index)) for axis, index in items}
        if any(axis not in _AXES or index < 0 for axis, index in keys):
            raise ValueError("unknown axis or negative index")
    except (ValueError, TypeError) as exc:
        logger.warning("segment %r: ignoring its unreadable %s tag %r (%s)", segment_id, ACCEPTED_TAG, text[:80], exc)
        return set()
    return keys


def set_accepted_slices(segmentation_node, segment_id: str, keys: Iterable[Tuple[str, int]]) -> None:
    """Store the accepted slices ``{(axis, index)}`` of a segment (an empty set removes the tag)."""
    keys = sorted((str(axis), int(index)) for axis, index in keys)
    set_segment_tag(segmentation_node, segment_id, ACCEPTED_TAG, json.dumps(keys) if keys else None)


# ----------------------------------------------------------------------------------------------------
# Slices


def slice_mask_from_segment(segmentation_node, segment_id: str, ijk_to_ras, shape_kji: Sequence[int], axis: str,
                            index: int) -> np.ndarray:
    """The segment's current content on one slice of a volume grid, as uint8 (H, W) (see ``geometry.get_slice``)."""
    _segment(segmentation_node, segment_id)
    ijk_to_ras = _checked_matrix(ijk_to_ras)
    index = geometry.check_index(shape_kji, axis, index)
    lo, hi = np.zeros(3, int), np.array(shape_kji, int) - 1
    a = geometry.array_axis(axis)
    lo[a] = hi[a] = index
    box = _read_segment_box(segmentation_node, segment_id, ijk_to_ras, lo, hi)
    return np.take(box, 0, axis=a).astype(np.uint8)


def write_slices(segmentation_node, segment_id: str, slice_masks: Dict[Tuple[str, int], np.ndarray], ijk_to_ras,
                 volume_node=None, segment_editor_node=None, source_array_kji=None) -> Optional[SegmentUndoState]:
    """Replace a segment on the given slices with ``{(axis, index): mask (H, W)}``; other slices stay as they are.

    With a ``segment_editor_node`` its masking settings apply (editable area, overwrite mode, intensity range,
    see :func:`mrml_editor.editor_settings`; the intensities are ``source_array_kji``, else the volume's).
    Returns the write's undo state (None when there was nothing to write).
    """
    segment = _segment(segmentation_node, segment_id)
    if not slice_masks:
        return None
    ijk_to_ras = _checked_matrix(ijk_to_ras)
    if volume_node is not None:
        from .mrml_volumes import volume_geometry

        _, shape = volume_geometry(volume_node)
    elif source_array_kji is not None:
        shape = np.shape(source_array_kji)
    else:
        raise InputError("write_slices needs the volume node or its array to know the grid")
    mask, editable = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    for (axis, index), values in slice_masks.items():
        index = geometry.check_index(shape, axis, index)
        values = np.asarray(values)
        if values.shape != geometry.slice_shape(shape, axis):
            raise InputError(f"mask of {axis} slice {index} has shape {values.shape}, the slice is "
                             f"{geometry.slice_shape(shape, axis)}")
        geometry.set_slice(mask, axis, index, values != 0)
        geometry.set_slice(editable, axis, index, 1)
    if segment_editor_node is None:
        overwrite, area = False, None
    elif source_array_kji is not None or volume_node is None:
        overwrite, area = editor_settings(segment_editor_node, segmentation_node, segment.GetName(), ijk_to_ras, shape,
                                          source_array_kji)
    else:
        overwrite, area = editor_settings_for_volume(segment_editor_node, segmentation_node, segment.GetName(),
                                                     volume_node)
    if area is not None:
        editable &= area
    return write_mask_to_segment(segmentation_node, segment.GetName(), mask, ijk_to_ras, volume_node,
                                 editable_mask=editable, overwrite_others=overwrite)


# ----------------------------------------------------------------------------------------------------
# Markers


class PromptMarkers:
    """The markers of one prompt list: include / exclude point lists and one ROI per box.

    :meth:`show` makes the markers match a prompt list without reporting anything. Afterwards, a point
    the user drags is reported as ``on_moved(prompt_id, point_ijk)``, a point or box the user deletes as
    ``on_removed(prompt_id)``. Positions are continuous IJK of the grid ``ijk_to_ras`` (world RAS).
    """

    def __init__(self, scene, ijk_to_ras, on_moved: Optional[Callable] = None,
                 on_removed: Optional[Callable] = None, name: str = "MedFM"):
        self.scene = scene
        self.ijk_to_ras = _checked_matrix(ijk_to_ras)
        self.on_moved, self.on_removed = on_moved, on_removed
        self._name = name
        self._points: Dict[bool, object] = {}  # positive -> markups fiducial node
        self._boxes: Dict[int, object] = {}  # prompt id -> markups ROI node
        self._shown: Dict[int, Prompt] = {}
        self._quiet = 0
        self._observations = [(scene, scene.AddObserver(scene.NodeAboutToBeRemovedEvent, self._onNodeRemoved))]

    # the markups nodes -------------------------------------------------------------------------
    def _pointNode(self, positive: bool):
        node = self._points.get(positive)
        if node is None or self.scene.GetNodeByID(node.GetID()) is None:
            node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode",
                                                f"{self._name} {'include' if positive else 'exclude'}")
            node.SetAttribute("MedFM.Positive", "true" if positive else "false")
            node.SetControlPointLabelFormat("+%d" if positive else "-%d")
            node.SetHideFromEditors(False)
            _color(node, INCLUDE_COLOR if positive else EXCLUDE_COLOR)
            self._observations.append((node, node.AddObserver(node.PointModifiedEvent, self._onPointModified)))
            self._observations.append((node, node.AddObserver(node.PointAboutToBeRemovedEvent, self._onPointRemoved)))
            self._points[positive] = node
        return node

    def nodes(self):
        """The markups nodes currently showing markers."""
        return [n for n in list(self._points.values()) + list(self._boxes.values()) if n is not None]

    def hovered(self) -> bool:
        """True while the mouse is over a marker (the markups widgets set an active component): let them drag it."""
        for node in self.nodes():
            display = node.GetDisplayNode()
            if display is not None and display.HasActiveComponent():
                return True
        return False

    def show(self, prompts: Iterable[Prompt]) -> None:
        """Make the markers match ``prompts`` (reports nothing)."""
        prompts = list(prompts)
        self._quiet += 1
        try:
            for positive in (True, False):
                wanted = [p for p in prompts if p.kind == "point" and p.positive == positive]
                if not wanted and positive not in self._points:
                    continue
                node = self._pointNode(positive)
                was = node.StartModify()
                node.RemoveAllControlPoints()
                for p in wanted:
                    ras = geometry.ijk_to_ras(np.array(p.point_ijk), self.ijk_to_ras)
                    n = node.AddControlPointWorld(vtk.vtkVector3d(*ras), f"{'+' if positive else '-'}{p.id}")
                    node.SetNthControlPointDescription(n, str(p.id))
                node.EndModify(was)
            boxes = {p.id: p for p in prompts if p.kind == "box"}
            for pid in [pid for pid in self._boxes if pid not in boxes]:
                self.scene.RemoveNode(self._boxes.pop(pid))
            for pid, p in boxes.items():
                roi = self._boxes.get(pid)
                if roi is None:
                    roi = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"{self._name} box {pid}")
                    roi.SetAttribute("MedFM.PromptId", str(pid))
                    _color(roi, BOX_COLOR)
                    self._boxes[pid] = roi
                corners = geometry.ijk_to_ras(np.array(p.box_ijk), self.ijk_to_ras)
                lo, hi = corners.min(axis=0), corners.max(axis=0)
                roi.SetCenterWorld(*((lo + hi) / 2))
                roi.SetSize(*np.maximum(hi - lo, 0.5))
            self._shown = {p.id: p for p in prompts}
        finally:
            self._quiet -= 1

    def remove(self) -> None:
        """Delete every marker node and stop observing."""
        for obj, tag in self._observations:
            obj.RemoveObserver(tag)
        self._observations = []
        for node in self.nodes():
            if self.scene.GetNodeByID(node.GetID()) is not None:
                self.scene.RemoveNode(node)
        self._points, self._boxes, self._shown = {}, {}, {}

    # events -----------------------------------------------------------------------------------
    @vtk.calldata_type(vtk.VTK_INT)
    def _onPointModified(self, caller, event, index=None):  # None: the event came without a point index
        if index is None or self._quiet or self.on_moved is None:
            return
        if not 0 <= index < caller.GetNumberOfControlPoints():
            return
        if caller.GetNthControlPointPositionStatus(index) != caller.PositionDefined:
            return
        pid = _prompt_id(caller.GetNthControlPointDescription(index))
        prompt = self._shown.get(pid)
        if prompt is None:
            return
        ras = [0.0, 0.0, 0.0]
        caller.GetNthControlPointPositionWorld(index, ras)
        ijk = geometry.ras_to_ijk(np.array(ras), self.ijk_to_ras)
        if np.allclose(ijk, prompt.point_ijk, atol=1e-3):
            return
        self._shown[pid] = Prompt(pid, "point", prompt.axis, prompt.index, prompt.positive, point_ijk=tuple(ijk))
        self.on_moved(pid, tuple(float(v) for v in ijk))

    @vtk.calldata_type(vtk.VTK_INT)
    def _onPointRemoved(self, caller, event, index=None):  # None: the event came without a point index
        if index is None or self._quiet or not 0 <= index < caller.GetNumberOfControlPoints():
            return
        pid = _prompt_id(caller.GetNthControlPointDescription(index))
        if self._shown.pop(pid, None) is not None and self.on_removed is not None:
            self.on_removed(pid)

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _onNodeRemoved(self, caller, event, node=None):
        if node is None:
            return
        for positive, points in list(self._points.items()):
            if points is node:  # the user deleted a whole point list: all its prompts go
                del self._points[positive]
                if not self._quiet:
                    for n in range(node.GetNumberOfControlPoints()):
                        self._report_removed(_prompt_id(node.GetNthControlPointDescription(n)))
        for pid, roi in list(self._boxes.items()):
            if roi is node:
                del self._boxes[pid]
                if not self._quiet:
                    self._report_removed(pid)

    def _report_removed(self, pid):
        if self._shown.pop(pid, None) is not None and self.on_removed is not None:
            self.on_removed(pid)


def _prompt_id(text) -> Optional[int]:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _color(node, rgb) -> None:
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(*rgb)
        display.SetColor(*rgb)
        display.SetActiveColor(*rgb)
