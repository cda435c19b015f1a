"""MRML layer, Segment Editor: its masking settings (editable area, overwrite mode, intensity range)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import slicer

from .errors import InputError
from .mrml_labelmaps import _check_segmentation_node, _find_segment_id, _read_segment_box
from .mrml_volumes import _checked_matrix, _describe


def _editor_value(segment_editor_node, new_name: str, old_name: str):
    getter = getattr(segment_editor_node, new_name, None) or getattr(segment_editor_node, old_name)
    return getter()


def _visible_segment_ids(segmentation_node) -> List[str]:
    segmentation = segmentation_node.GetSegmentation()
    display_node = segmentation_node.GetDisplayNode()
    ids = list(segmentation.GetSegmentIDs())
    if display_node is None:
        return ids
    return [sid for sid in ids if display_node.GetSegmentVisibility(sid)]


def editor_settings(
    segment_editor_node,
    segmentation_node,
    segment_name: str,
    ijk_to_ras,
    shape_kji: Sequence[int],
    source_array_kji: Optional[np.ndarray] = None,
) -> Tuple[Union[bool, List[str]], Optional[np.ndarray]]:
    """The Segment Editor's masking settings as ``(overwrite_others, editable_mask)`` for :func:`write_mask_to_segment`.

    Reads a vtkMRMLSegmentEditorNode: its overwrite mode (all -> True, visible -> list of visible segment
    IDs, none -> False) and its editable area and intensity range, turned into a uint8 mask on the grid
    (None when editing is allowed everywhere), with Slicer's rules: "inside" areas are the union of the
    listed segments, "outside" areas exclude the edited segment itself, and the intensity range (inclusive)
    applies to ``source_array_kji`` (required when the editor's intensity mask is on).
    """
    if segment_editor_node is None or not segment_editor_node.IsA("vtkMRMLSegmentEditorNode"):
        raise InputError(f"expected a segment editor node, got {_describe(segment_editor_node)}")
    segmentation = _check_segmentation_node(segmentation_node)
    ijk_to_ras = _checked_matrix(ijk_to_ras)
    shape = tuple(int(s) for s in shape_kji)
    target_id = _find_segment_id(segmentation, segment_name)

    editor = segment_editor_node
    overwrite_mode = editor.GetOverwriteMode()
    if overwrite_mode == editor.OverwriteAllSegments:
        overwrite: Union[bool, List[str]] = True
    elif overwrite_mode == editor.OverwriteVisibleSegments:
        overwrite = [sid for sid in _visible_segment_ids(segmentation_node) if sid != target_id]
    else:
        overwrite = False

    seg_class = slicer.vtkMRMLSegmentationNode
    mask_mode = editor.GetMaskMode()
    all_ids = list(segmentation.GetSegmentIDs())
    inside = mask_mode in (seg_class.EditAllowedInsideAllSegments, seg_class.EditAllowedInsideVisibleSegments,
                           seg_class.EditAllowedInsideSingleSegment)
    if mask_mode in (seg_class.EditAllowedInsideAllSegments, seg_class.EditAllowedOutsideAllSegments):
        area_ids = all_ids
    elif mask_mode in (seg_class.EditAllowedInsideVisibleSegments, seg_class.EditAllowedOutsideVisibleSegments):
        area_ids = _visible_segment_ids(segmentation_node)
    elif mask_mode == seg_class.EditAllowedInsideSingleSegment:
        area_ids = [editor.GetMaskSegmentID()] if editor.GetMaskSegmentID() in all_ids else []
    else:
        area_ids = []
    editable: Optional[np.ndarray] = None
    if mask_mode != seg_class.EditAllowedEverywhere:
        if not inside:
            area_ids = [sid for sid in area_ids if sid != target_id]
        union = np.zeros(shape, dtype=bool)
        last = np.array(shape) - 1
        for sid in area_ids:
            union |= _read_segment_box(segmentation_node, sid, ijk_to_ras, (0, 0, 0), last).astype(bool)
        editable = union if inside else ~union
    if _editor_value(editor, "GetSourceVolumeIntensityMask", "GetMasterVolumeIntensityMask"):
        if source_array_kji is None or tuple(np.shape(source_array_kji)) != shape:
            raise InputError(
                "the Segment Editor's intensity range is on: pass the source volume array of the grid shape"
            )
        low, high = _editor_value(editor, "GetSourceVolumeIntensityMaskRange", "GetMasterVolumeIntensityMaskRange")
        in_range = (source_array_kji >= low) & (source_array_kji <= high)
        editable = in_range if editable is None else editable & in_range
    return overwrite, None if editable is None else editable.astype(np.uint8)


def editor_settings_for_volume(segment_editor_node, segmentation_node, segment_name: str, volume_node):
    """:func:`editor_settings` on a volume's grid, reading its voxels only when the intensity range is on.

    ``segment_editor_node`` None means no masking: ``(False, None)``.
    """
    if segment_editor_node is None:
        return False, None
    from .mrml_volumes import volume_geometry, volume_to_array

    ijk_to_ras, shape = volume_geometry(volume_node)
    array = None
    if _editor_value(segment_editor_node, "GetSourceVolumeIntensityMask", "GetMasterVolumeIntensityMask"):
        array, _ = volume_to_array(volume_node)
    return editor_settings(segment_editor_node, segmentation_node, segment_name, ijk_to_ras, shape, array)
