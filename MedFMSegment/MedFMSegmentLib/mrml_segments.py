"""MRML layer, segment writes: a mask into a segment (modes, editable area, overwrite), exact undo states.

Writes work on the volume's voxel grid, touch only the bounding box of the voxels that change, keep every other
segment intact and return a :class:`SegmentUndoState` that :func:`restore_segment` uses to give back exactly
the previous voxels.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import slicer

from . import geometry
from .errors import InputError, MedFMError
from .mrml_labelmaps import (_apply_box, _binary_labelmap_name, _box_slices, _check_segmentation_node,
                             _find_segment_id, _is_segmentation_empty, _read_segment_box, _require_segment_id,
                             _source_representation, _write_lattice)
from .mrml_volumes import _checked_matrix, _lattice_offset, _node_to_world, _to_vtk_matrix, volume_geometry

logger = logging.getLogger(__name__)

#: Write modes of :func:`write_mask_to_segment`.
MODES = ("replace", "union", "subtract")



def segment_to_mask(segmentation_node, segment_name: str, ijk_to_ras, shape_kji: Sequence[int]) -> np.ndarray:
    """A segment as a uint8 0/1 mask ``[k, j, i]`` on a volume grid (``ijk_to_ras`` in world RAS, ``shape_kji``).

    Parent transforms of the segmentation are applied. If the segment is stored on the same voxel lattice
    as the grid (any extent or origin shift by whole voxels) the copy is exact; otherwise it is resampled
    with nearest-neighbour interpolation. Segment names are matched case-insensitively (first match).
    """
    _check_segmentation_node(segmentation_node)
    ijk_to_ras = _checked_matrix(ijk_to_ras)
    shape = tuple(int(s) for s in shape_kji)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"shape_kji must be three positive sizes, got {tuple(shape_kji)}")
    segment_id = _require_segment_id(segmentation_node, segment_name)
    return _read_segment_box(segmentation_node, segment_id, ijk_to_ras, (0, 0, 0), np.array(shape) - 1)


@dataclass
class _SegmentChange:
    """Previous voxels of one segment on a box of the volume grid (or a segment that did not exist)."""

    segment_id: str
    created: bool
    lo_kji: Tuple[int, int, int] = (0, 0, 0)
    old_kji: Optional[np.ndarray] = None
    previous_color: Optional[Tuple[float, float, float]] = None


@dataclass
class SegmentUndoState:
    """What :func:`write_mask_to_segment` changed, so that :func:`restore_segment` can undo it.

    Attributes:
        segment_id, segment_name: the written segment.
        created: True if the segment did not exist before the write.
        extent_kji: inclusive box ``((k0, j0, i0), (k1, j1, i1))`` of the voxels that changed in the
            written segment (the only region written), or None if nothing changed.
        changed_voxels: number of voxels of the written segment that changed.
        overwritten: names of other segments that lost voxels (overwrite), in order.
    """

    segmentation_node_id: Optional[str]
    segment_id: str
    segment_name: str
    ijk_to_ras: np.ndarray
    created: bool
    extent_kji: Optional[Tuple[Tuple[int, int, int], Tuple[int, int, int]]]
    changed_voxels: int
    overwritten: List[str] = field(default_factory=list)
    _changes: List[_SegmentChange] = field(default_factory=list, repr=False)
    _previous_reference_geometry: Optional[str] = field(default=None, repr=False)


def _check_mask(name: str, mask, expected_shape=None) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim != 3:
        raise InputError(f"{name} must be a 3D [k, j, i] array, got {array.ndim} dimensions (shape {array.shape})")
    if array.dtype != np.bool_ and not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{name} must be a bool or integer 0/1 array, got dtype {array.dtype} (threshold it first)")
    if expected_shape is not None and tuple(array.shape) != tuple(expected_shape):
        raise InputError(
            f"{name} has shape {tuple(array.shape)} but the volume grid is {tuple(expected_shape)} [k, j, i]"
        )
    return array != 0


def _check_color(color) -> Optional[Tuple[float, float, float]]:
    if color is None:
        return None
    try:
        rgb = tuple(float(c) for c in color)
    except (TypeError, ValueError) as exc:
        raise InputError(f"color must be three numbers in 0..1, got {color!r}") from exc
    if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
        raise InputError(f"color must be three numbers in 0..1, got {color!r}")
    return rgb


def _resolve_overwrite(segmentation, target_id: Optional[str], overwrite_others) -> List[str]:
    """Segment IDs that a write may take voxels from."""
    if overwrite_others is True:
        return [sid for sid in segmentation.GetSegmentIDs() if sid != target_id]
    if overwrite_others is False or overwrite_others is None:
        return []
    if isinstance(overwrite_others, str):
        overwrite_others = [overwrite_others]
    ids: List[str] = []
    for key in overwrite_others:
        segment_id = key if segmentation.GetSegment(key) is not None else _find_segment_id(segmentation, key)
        if segment_id is None:
            raise InputError(f"overwrite_others names an unknown segment {key!r}")
        if segment_id != target_id and segment_id not in ids:
            ids.append(segment_id)
    return ids


def _reference_geometry_parameter(segmentation) -> str:
    """The serialized reference image geometry, or "" if unset (without the error log of a missing key)."""
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    for entry in segmentation.SerializeAllConversionParameters().split("&"):
        parts = entry.split("|")
        if len(parts) >= 2 and parts[0] == name:
            return parts[1]
    return ""


def _set_reference_geometry(segmentation_node, ijk_to_ras: np.ndarray, shape_kji, reference_volume_node) -> None:
    if reference_volume_node is not None:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        return
    grid_to_local = np.linalg.inv(_node_to_world(segmentation_node)) @ ijk_to_ras
    nk, nj, ni = shape_kji
    serialized = slicer.vtkSegmentationConverter.SerializeImageGeometry(
        _to_vtk_matrix(grid_to_local), [0, ni - 1, 0, nj - 1, 0, nk - 1]
    )
    segmentation_node.GetSegmentation().SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), serialized
    )


def _combine(old: np.ndarray, mask: np.ndarray, mode: str, editable: Optional[np.ndarray]) -> np.ndarray:
    """New segment voxels from the old ones, the written mask, the mode and the editable area (all bool)."""
    if mode == "replace":
        new = mask.copy()
    elif mode == "union":
        new = old | mask
    else:
        new = old & ~mask
    return new if editable is None else np.where(editable, new, old)


def _prepare_segment(segmentation_node, segment_id, segment_name, rgb, ijk_to_ras, state: SegmentUndoState) -> str:
    """Create the segment if needed (recording it in ``state``), set its color; returns its ID."""
    segmentation = segmentation_node.GetSegmentation()
    if segment_id is not None:
        segment = segmentation.GetSegment(segment_id)
        state._changes.append(
            _SegmentChange(segment_id, created=False, previous_color=tuple(segment.GetColor()) if rgb else None)
        )
        if rgb:
            segment.SetColor(*rgb)
        return segment_id
    segment_id = segmentation.AddEmptySegment("", segment_name, list(rgb) if rgb else None)
    if not segment_id:
        raise MedFMError(f"Slicer could not add segment {segment_name!r} to {segmentation_node.GetName()!r}")
    state.segment_id = segment_id
    state._changes.append(_SegmentChange(segment_id, created=True))
    try:
        _write_lattice(segmentation_node, segment_id, ijk_to_ras)
    except InputError:
        # The new (empty) segment landed in a layer stored on another lattice: give it its own layer.
        segmentation.SeparateSegmentLabelmap(segment_id)
    return segment_id


def _take_voxels(segmentation_node, other_id: str, added_box: np.ndarray, box_lo_kji, ijk_to_ras, state) -> None:
    """Remove from segment ``other_id`` the voxels added by a write (overwrite), recording them in ``state``."""
    box_hi_kji = np.asarray(box_lo_kji) + np.array(added_box.shape) - 1
    other_old = _read_segment_box(segmentation_node, other_id, ijk_to_ras, box_lo_kji, box_hi_kji)
    taken = (other_old > 0) & added_box
    other_box = geometry.bbox_kji(taken)
    if other_box is None:
        return
    sub = _box_slices(*other_box)  # relative to the written box
    before = other_old[sub].copy()
    lo = tuple(int(b0 + o0) for b0, o0 in zip(box_lo_kji, other_box[0]))
    state._changes.append(_SegmentChange(other_id, created=False, lo_kji=lo, old_kji=before))
    state.overwritten.append(segmentation_node.GetSegmentation().GetSegment(other_id).GetName())
    _apply_box(segmentation_node, other_id, before, (before > 0) & ~taken[sub], lo, ijk_to_ras)


def write_mask_to_segment(
    segmentation_node,
    segment_name: str,
    mask_kji,
    ijk_to_ras,
    reference_volume_node=None,
    mode: str = "replace",
    editable_mask=None,
    overwrite_others: Union[bool, Iterable[str]] = False,
    color: Optional[Sequence[float]] = None,
) -> SegmentUndoState:
    """Write a 0/1 mask on a volume grid into the named segment (created if missing).

    Args:
        segmentation_node: a vtkMRMLSegmentationNode (binary labelmap source representation).
        segment_name: segment to create or update (matched case-insensitively).
        mask_kji: bool/integer ``[k, j, i]`` array on the grid ``ijk_to_ras`` (world RAS); nonzero = inside.
        ijk_to_ras: 4x4 voxel-to-world matrix of the grid, e.g. from :func:`volume_to_array`.
        reference_volume_node: the volume of that grid. If given, the mask shape and matrix are checked
            against it, and a segmentation without voxels takes its reference geometry from it (else
            from ``ijk_to_ras`` and the mask shape).
        mode: ``"replace"`` (segment := mask), ``"union"`` (segment |= mask) or ``"subtract"``
            (segment &= ~mask).
        editable_mask: optional uint8/bool array of the grid shape; only voxels where it is nonzero may
            change (the Segment Editor's editable area).
        overwrite_others: ``True`` removes the voxels added to this segment from all other segments (the
            Segment Editor's "overwrite all"); a list of segment names or IDs restricts that to those
            segments ("overwrite visible"); ``False`` lets segments overlap.
        color: optional (r, g, b) in 0..1 for the segment.

    Only the bounding box of the voxels that change is written, on the lattice the segment is stored on;
    segments stored on a different voxel lattice raise InputError. All inputs are checked before anything
    is modified and a failing write is rolled back, so errors leave the segmentation unchanged.

    Returns:
        A :class:`SegmentUndoState` for :func:`restore_segment`.
    """
    segmentation = _check_segmentation_node(segmentation_node)
    if mode not in MODES:
        raise InputError(f"unknown write mode {mode!r}: expected one of {', '.join(MODES)}")
    if not isinstance(segment_name, str) or not segment_name.strip():
        raise InputError(f"segment_name must be a non-empty string, got {segment_name!r}")
    ijk_to_ras = _checked_matrix(ijk_to_ras)
    expected_shape = None
    if reference_volume_node is not None:
        volume_ijk_to_ras, expected_shape = volume_geometry(reference_volume_node)
        offset = _lattice_offset(ijk_to_ras, volume_ijk_to_ras)
        if offset is None or offset.any():
            raise InputError(
                f"ijk_to_ras does not match the grid of reference volume {reference_volume_node.GetName()!r}"
            )
    mask = _check_mask("mask", mask_kji, expected_shape)
    editable = None if editable_mask is None else _check_mask("editable_mask", editable_mask, mask.shape)
    rgb = _check_color(color)
    if segmentation.GetNumberOfSegments() > 0 and _source_representation(segmentation) != _binary_labelmap_name():
        raise InputError(
            f"segmentation {segmentation_node.GetName()!r} is stored as {_source_representation(segmentation)!r}: "
            "convert its source representation to binary labelmap before writing (Segmentations module)"
        )
    _node_to_world(segmentation_node)  # refuses non-linear transforms before any change
    segment_id = _find_segment_id(segmentation, segment_name)
    overwrite_ids = _resolve_overwrite(segmentation, segment_id, overwrite_others)
    for sid in ([segment_id] if segment_id else []) + overwrite_ids:
        _write_lattice(segmentation_node, sid, ijk_to_ras)

    # Compute the new voxels on the volume grid.
    shape = mask.shape
    old = (
        _read_segment_box(segmentation_node, segment_id, ijk_to_ras, (0, 0, 0), np.array(shape) - 1).astype(bool)
        if segment_id
        else np.zeros(shape, dtype=bool)
    )
    new = _combine(old, mask, mode, editable)
    changed = new != old
    box = geometry.bbox_kji(changed)
    state = SegmentUndoState(
        segmentation_node_id=segmentation_node.GetID(),
        segment_id=segment_id or "",
        segment_name=segment_name,
        ijk_to_ras=ijk_to_ras.copy(),
        created=segment_id is None,
        extent_kji=box,
        changed_voxels=int(changed.sum()),
    )
    try:
        if _is_segmentation_empty(segmentation_node):
            state._previous_reference_geometry = _reference_geometry_parameter(segmentation)
            _set_reference_geometry(segmentation_node, ijk_to_ras, shape, reference_volume_node)
        segment_id = _prepare_segment(segmentation_node, segment_id, segment_name, rgb, ijk_to_ras, state)
        if box is not None:
            state._changes[0].lo_kji = box[0]
            state._changes[0].old_kji = None if state.created else old[_box_slices(*box)].astype(np.uint8)
            added = (new & ~old)[_box_slices(*box)]
            for other_id in overwrite_ids:
                _take_voxels(segmentation_node, other_id, added, box[0], ijk_to_ras, state)
            sl = _box_slices(*box)
            _apply_box(segmentation_node, segment_id, old[sl], new[sl], box[0], ijk_to_ras)
    except Exception:
        logger.warning("writing segment %r failed: restoring the previous state", segment_name)
        _restore(segmentation_node, state, strict=False)
        raise
    logger.debug("segment %r: %d voxels changed in box %s", segment_name, state.changed_voxels, box)
    return state


def _restore(segmentation_node, state: SegmentUndoState, strict: bool) -> None:
    segmentation = segmentation_node.GetSegmentation()
    target_first = state._changes  # the written segment is recorded first; give its voxels back first
    for change in target_first:
        segment = segmentation.GetSegment(change.segment_id)
        if segment is None:
            if strict and not change.created:
                raise InputError(f"segment {change.segment_id!r} no longer exists in {segmentation_node.GetName()!r}")
            continue
        if change.created:
            segmentation.RemoveSegment(change.segment_id)
            continue
        if change.previous_color is not None:
            segment.SetColor(*change.previous_color)
        if change.old_kji is None:
            continue
        lo = np.asarray(change.lo_kji, dtype=int)
        hi = lo + np.array(change.old_kji.shape) - 1
        current = _read_segment_box(segmentation_node, change.segment_id, state.ijk_to_ras, lo, hi)
        _apply_box(segmentation_node, change.segment_id, current, change.old_kji, lo, state.ijk_to_ras)
    if state._previous_reference_geometry is not None:
        segmentation.SetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), state._previous_reference_geometry
        )


def restore_segment(segmentation_node, state: SegmentUndoState) -> None:
    """Undo a :func:`write_mask_to_segment`: give back exactly the previous voxels of every segment it changed.

    A segment that the write created is removed; previous colors and reference geometry are restored.
    Restoring undoes the write's own changes only: apply undo states in reverse order of the writes.
    """
    _check_segmentation_node(segmentation_node)
    if not isinstance(state, SegmentUndoState):
        raise InputError(f"expected a SegmentUndoState, got {type(state).__name__}")
    node_id = segmentation_node.GetID()
    if state.segmentation_node_id and node_id and state.segmentation_node_id != node_id:
        raise InputError(
            f"this undo state belongs to segmentation {state.segmentation_node_id!r}, not {node_id!r}"
        )
    _restore(segmentation_node, state, strict=True)


def labelmap_from_node(node, volume_node) -> Tuple[np.ndarray, np.ndarray, dict]:
    """Detections from a node as ``(labels_kji, ijk_to_ras, {value: name})`` for ``detectors.LabelmapDetector``.

    A segmentation node gives one value per segment (1, 2, ... in segment order, later segments on top where
    they overlap), on ``volume_node``'s grid; a labelmap volume node gives its own voxels and grid, named from
    its colour table where it has one (else by value).
    """
    from .mrml_volumes import _describe, volume_to_array

    if node is not None and node.IsA("vtkMRMLSegmentationNode"):
        ijk_to_ras, shape = volume_geometry(volume_node)
        labels = np.zeros(shape, np.uint16)
        names = {}
        segmentation = node.GetSegmentation()
        for value, segment_id in enumerate(segmentation.GetSegmentIDs(), start=1):
            mask = _read_segment_box(node, segment_id, ijk_to_ras, (0, 0, 0), np.array(shape) - 1)
            labels[mask > 0] = value
            names[value] = segmentation.GetSegment(segment_id).GetName()
        if not names:
            raise InputError(f"segmentation {node.GetName()!r} has no segments to use as detections")
        return labels, ijk_to_ras, names
    if node is not None and node.IsA("vtkMRMLLabelMapVolumeNode"):
        labels, ijk_to_ras = volume_to_array(node)
        display = node.GetDisplayNode()
        colors = display.GetColorNode() if display is not None else None
        names = {}
        for value in np.unique(labels):
            if value == 0:
                continue
            name = colors.GetColorName(int(value)) if colors is not None else ""
            names[int(value)] = name if name and name != "(none)" else str(int(value))
        if not names:
            raise InputError(f"labelmap {node.GetName()!r} is empty: no label to use as a detection")
        return labels, ijk_to_ras, names
    raise InputError(f"detections must be a segmentation or a labelmap volume node, got {_describe(node)}")
