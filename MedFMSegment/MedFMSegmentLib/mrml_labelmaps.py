"""MRML layer, segment labelmaps: reading and writing voxel boxes of one segment on a volume grid.

Private helpers of :mod:`mrml_segments` and :mod:`mrml_editor`; the only public name is
:func:`ensure_segmentation_converters`.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .errors import InputError, MedFMError
from .mrml_volumes import _describe, _lattice_offset, _node_to_world, _to_numpy_matrix, _to_vtk_matrix

logger = logging.getLogger(__name__)


def _binary_labelmap_name() -> str:
    return slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()


def ensure_segmentation_converters() -> None:
    """Register the standard labelmap <-> surface converter rules if nobody did.

    The Slicer application registers them when its Segmentations module starts; headless
    ``slicer-core`` does not, and without them segments cannot even be created. Idempotent.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    binary = _binary_labelmap_name()
    for rule in factory.GetConverterRules():
        if binary in (rule.GetSourceRepresentationName(), rule.GetTargetRepresentationName()):
            return
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def _check_segmentation_node(segmentation_node):
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError(f"expected a segmentation node, got {_describe(segmentation_node)}")
    ensure_segmentation_converters()
    return segmentation_node.GetSegmentation()


def _source_representation(segmentation) -> str:
    getter = getattr(segmentation, "GetSourceRepresentationName", None) or segmentation.GetMasterRepresentationName
    return getter()


def _segment_names(segmentation) -> List[str]:
    return [segmentation.GetSegment(sid).GetName() for sid in segmentation.GetSegmentIDs()]


def _find_segment_id(segmentation, segment_name: str) -> Optional[str]:
    segment_id = segmentation.GetSegmentIdBySegmentName(segment_name)
    return segment_id or None


def _require_segment_id(segmentation_node, segment_name: str) -> str:
    segment_id = _find_segment_id(segmentation_node.GetSegmentation(), segment_name)
    if segment_id is None:
        names = ", ".join(repr(n) for n in _segment_names(segmentation_node.GetSegmentation())) or "none"
        raise InputError(
            f"segmentation {segmentation_node.GetName()!r} has no segment named {segment_name!r} (segments: {names})"
        )
    return segment_id


def _labelmap(segmentation_node, segment_id: str):
    """The (possibly shared) binary labelmap of a segment, creating it from another representation if needed."""
    segmentation = segmentation_node.GetSegmentation()
    binary = _binary_labelmap_name()
    segment = segmentation.GetSegment(segment_id)
    labelmap = segment.GetRepresentation(binary)
    if labelmap is None:
        if not segmentation_node.CreateBinaryLabelmapRepresentation():
            raise InputError(
                f"segment {segment.GetName()!r} of {segmentation_node.GetName()!r} has no binary labelmap and "
                "cannot be converted to one"
            )
        labelmap = segment.GetRepresentation(binary)
    return labelmap


def _extent_is_empty(extent) -> bool:
    return extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]


def _labelmap_array(labelmap) -> Optional[np.ndarray]:
    """A ``[k, j, i]`` view of a labelmap's scalars over its extent, or None if it holds no voxels."""
    extent = labelmap.GetExtent()
    scalars = labelmap.GetPointData().GetScalars() if labelmap.GetPointData() else None
    if _extent_is_empty(extent) or scalars is None:
        return None
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    values = numpy_support.vtk_to_numpy(scalars)
    if values.ndim > 1:
        values = values[:, 0]
    return values.reshape(shape)


def _labelmap_to_local(labelmap) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(m)
    return _to_numpy_matrix(m)


def _oriented_image(values_kji: np.ndarray, start_ijk: Sequence[int], ijk_to_x: np.ndarray):
    """A uint8 vtkOrientedImageData holding ``values_kji`` at extent start ``start_ijk`` on lattice ``ijk_to_x``."""
    image = slicer.vtkOrientedImageData()
    nk, nj, ni = values_kji.shape
    i0, j0, k0 = (int(v) for v in start_ijk)
    image.SetExtent(i0, i0 + ni - 1, j0, j0 + nj - 1, k0, k0 + nk - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    scalars[:] = np.ascontiguousarray(values_kji, np.uint8).ravel()
    image.SetImageToWorldMatrix(_to_vtk_matrix(ijk_to_x))
    return image


def _read_segment_box(segmentation_node, segment_id: str, ijk_to_ras: np.ndarray, lo_kji, hi_kji) -> np.ndarray:
    """Segment membership (uint8 0/1) on the voxel box ``lo_kji..hi_kji`` (inclusive) of a world grid."""
    lo = np.asarray(lo_kji, dtype=int)
    hi = np.asarray(hi_kji, dtype=int)
    out = np.zeros(tuple(hi - lo + 1), dtype=np.uint8)
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    labelmap = _labelmap(segmentation_node, segment_id)
    values = _labelmap_array(labelmap)
    if values is None:
        return out
    extent = labelmap.GetExtent()
    layer_to_world = _node_to_world(segmentation_node) @ _labelmap_to_local(labelmap)
    offset_ijk = _lattice_offset(ijk_to_ras, layer_to_world)
    if offset_ijk is not None:
        # Same lattice: copy the overlap of the box and the labelmap extent, exactly.
        layer_lo_kji = np.array([extent[4], extent[2], extent[0]]) - offset_ijk[::-1]
        layer_hi_kji = np.array([extent[5], extent[3], extent[1]]) - offset_ijk[::-1]
        a = np.maximum(lo, layer_lo_kji)
        b = np.minimum(hi, layer_hi_kji)
        if np.any(a > b):
            return out
        src = values[tuple(slice(a[n] - layer_lo_kji[n], b[n] - layer_lo_kji[n] + 1) for n in range(3))]
        out[tuple(slice(a[n] - lo[n], b[n] - lo[n] + 1) for n in range(3))] = src == segment.GetLabelValue()
        return out
    # Different lattice: nearest-neighbour resampling of this segment onto the box.
    logger.info("resampling segment %r onto a different voxel grid", segment.GetName())
    binary = (values == segment.GetLabelValue()).astype(np.uint8)
    source = _oriented_image(binary, (extent[0], extent[2], extent[4]), layer_to_world)
    reference = _oriented_image(out, lo[::-1], ijk_to_ras)
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        source, reference, resampled, False, False
    ):
        raise InputError(f"cannot resample segment {segment.GetName()!r} onto the volume grid")
    result = _labelmap_array(resampled)
    if result is None or result.shape != out.shape:
        raise InputError(f"cannot resample segment {segment.GetName()!r} onto the volume grid")
    return (result > 0).astype(np.uint8)


def _write_lattice(segmentation_node, segment_id: str, ijk_to_ras: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(layer_ijk_to_local, offset_ijk)`` for writing a segment on a world grid, with layer = grid + offset.

    A segment is written on the lattice of its labelmap layer when that layer holds voxels, so shared
    layers are never resampled. Raises InputError if that lattice is not the volume grid's lattice.
    """
    world_to_local = np.linalg.inv(_node_to_world(segmentation_node))
    grid_to_local = world_to_local @ ijk_to_ras
    labelmap = _labelmap(segmentation_node, segment_id)
    values = _labelmap_array(labelmap)
    if values is None or not values.any():
        # No voxel in this layer: nothing can be lost, the segment takes the volume's lattice.
        return grid_to_local, np.zeros(3, dtype=int)
    layer_to_local = _labelmap_to_local(labelmap)
    offset_ijk = _lattice_offset(grid_to_local, layer_to_local)
    if offset_ijk is None:
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        spacing = np.round(np.linalg.norm(layer_to_local[:3, :3], axis=0), 4).tolist()
        raise InputError(
            f"segment {segment.GetName()!r} of segmentation {segmentation_node.GetName()!r} is stored on a different "
            f"voxel grid (spacing {spacing} mm) than the volume: MedFM writes on the volume's voxel grid. Set the "
            "segmentation geometry from this volume (Segment Editor: Specify geometry) or use a new segmentation"
        )
    return layer_to_local, offset_ijk


def _apply_box(
    segmentation_node, segment_id: str, old_kji: np.ndarray, new_kji: np.ndarray, lo_kji, ijk_to_ras
) -> None:
    """Change a segment from ``old_kji`` to ``new_kji`` on the box starting at grid index ``lo_kji``.

    Only the given box is written; other segments are never changed (a voxel added on top of a segment
    that shares the labelmap layer moves the written segment to its own layer, as Slicer does).
    """
    add = (new_kji > 0) & (old_kji == 0)
    remove = (old_kji > 0) & (new_kji == 0)
    if not add.any() and not remove.any():
        return
    layer_to_local, offset_ijk = _write_lattice(segmentation_node, segment_id, ijk_to_ras)
    start_ijk = np.asarray(lo_kji, dtype=int)[::-1] + offset_ijk
    nk, nj, ni = add.shape
    extent = [int(start_ijk[0]), int(start_ijk[0]) + ni - 1, int(start_ijk[1]), int(start_ijk[1]) + nj - 1,
              int(start_ijk[2]), int(start_ijk[2]) + nk - 1]
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if remove.any():
        # Minimum with a "keep" image only lowers this segment's own label (other labels are masked out).
        keep = _oriented_image((~remove).astype(np.uint8), start_ijk, layer_to_local)
        others = [sid for sid in segmentation_node.GetSegmentation().GetSegmentIDs() if sid != segment_id]
        if not logic.SetBinaryLabelmapToSegment(keep, segmentation_node, segment_id, logic.MODE_MERGE_MIN, extent,
                                                False, others):
            raise MedFMError(f"Slicer could not remove voxels from segment {segment_id!r}")
    if add.any():
        modifier = _oriented_image(add.astype(np.uint8), start_ijk, layer_to_local)
        if not logic.SetBinaryLabelmapToSegment(modifier, segmentation_node, segment_id, logic.MODE_MERGE_MASK, extent):
            raise MedFMError(f"Slicer could not add voxels to segment {segment_id!r}")


def _box_slices(lo, hi) -> Tuple[slice, slice, slice]:
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))


def _is_segmentation_empty(segmentation_node) -> bool:
    segmentation = segmentation_node.GetSegmentation()
    for segment_id in segmentation.GetSegmentIDs():
        labelmap = segmentation.GetSegment(segment_id).GetRepresentation(_binary_labelmap_name())
        if labelmap is None:
            return False  # content held in another representation
        values = _labelmap_array(labelmap)
        if values is not None and values.any():
            return False
    return True
