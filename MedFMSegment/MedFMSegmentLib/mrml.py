"""MRML layer: the one place where Slicer nodes are turned into numpy arrays and back.

This is the only engine module that imports ``slicer`` and ``vtk``. It uses only the MRML, VTK and
segmentation-core classes, so it runs both inside the Slicer application and headless with the
``slicer-core`` PyPI package (no Qt, no ``slicer.app``, no ``slicer.mrmlScene``: every function takes
its nodes or its scene explicitly).

Frames: everything returned here is in *world* RAS, i.e. with parent transforms applied. Linear
parent transforms are hardened into the returned matrices; a non-linear transform under a volume
or a segmentation is refused with an :class:`InputError` (harden it first). Volumes are returned as
``array_kji`` plus a 4x4 ``ijk_to_ras`` matrix (see :mod:`geometry`).

Segment writes (:func:`write_mask_to_segment`) work on the volume's voxel grid. They touch only the
bounding box of the voxels that change, keep every other segment intact, and return a
:class:`SegmentUndoState` that :func:`restore_segment` uses to give back exactly the previous voxels.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from . import geometry
from .errors import InputError, MedFMError

logger = logging.getLogger(__name__)

#: Node attribute that makes all points of a markups node negative when set to "false" (or "0", "no").
POSITIVE_ATTRIBUTE = "MedFM.Positive"
#: Write modes of :func:`write_mask_to_segment`.
MODES = ("replace", "union", "subtract")

_FALSE_WORDS = ("false", "0", "no", "off", "negative")
# Two voxel grids are "the same lattice" when their axes agree to this many voxels per voxel and their
# origins differ by an integer number of voxels to within this many voxels.
_DIRECTION_TOLERANCE = 1e-4
_ORIGIN_TOLERANCE = 1e-2


# ----------------------------------------------------------------------------------------------------
# Matrices and transforms


def _to_numpy_matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _to_vtk_matrix(matrix) -> "vtk.vtkMatrix4x4":
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(matrix[r][c]))
    return m


def _describe(node) -> str:
    """``"<class> 'name'"`` for error messages."""
    if node is None:
        return "None"
    name = node.GetName() if hasattr(node, "GetName") else None
    return f"{node.GetClassName()} {name!r}"


def _checked_matrix(ijk_to_ras) -> np.ndarray:
    try:
        return geometry.check_matrix(ijk_to_ras)
    except ValueError as exc:
        raise InputError(str(exc)) from exc


def _node_to_world(node) -> np.ndarray:
    """4x4 matrix from ``node``'s local frame to world RAS (identity without a parent transform).

    Raises InputError if the parent transform chain is not linear.
    """
    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return np.eye(4)
    if not transform_node.IsTransformToWorldLinear():
        raise InputError(
            f"{_describe(node)} is under the non-linear transform {transform_node.GetName()!r}: "
            "harden the transform (Transforms module) or remove it first"
        )
    m = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(m)
    return _to_numpy_matrix(m)


def _lattice_offset(grid_ijk_to_x: np.ndarray, lattice_ijk_to_x: np.ndarray) -> Optional[np.ndarray]:
    """Integer ``(di, dj, dk)`` with ``lattice_ijk = grid_ijk + offset`` if both describe one voxel lattice.

    Both matrices map voxel indices into the same frame. Returns None when the axes or spacings differ
    or when the origins are not an integer number of voxels apart.
    """
    grid_to_lattice = np.linalg.inv(lattice_ijk_to_x) @ grid_ijk_to_x
    if not np.allclose(grid_to_lattice[:3, :3], np.eye(3), atol=_DIRECTION_TOLERANCE, rtol=0):
        return None
    offset = grid_to_lattice[:3, 3]
    rounded = np.round(offset)
    if np.max(np.abs(offset - rounded)) > _ORIGIN_TOLERANCE:
        return None
    return rounded.astype(int)


# ----------------------------------------------------------------------------------------------------
# Volumes


def _check_scalar_volume(volume_node):
    if volume_node is None or not volume_node.IsA("vtkMRMLVolumeNode"):
        raise InputError(f"expected a scalar volume node, got {_describe(volume_node)}")
    for kind in ("vtkMRMLVectorVolumeNode", "vtkMRMLTensorVolumeNode", "vtkMRMLDiffusionWeightedVolumeNode"):
        if volume_node.IsA(kind):
            raise InputError(
                f"volume {volume_node.GetName()!r} is a {kind[7:-4]} volume: MedFM needs a single-component "
                "scalar volume (convert RGB/vector images to scalar first, e.g. Vector to Scalar Volume module)"
            )
    image = volume_node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"volume {volume_node.GetName()!r} has no voxel data")
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        raise InputError(
            f"volume {volume_node.GetName()!r} has {components} components per voxel (RGB or vector image): "
            "MedFM needs a single-component scalar volume"
        )
    return image


def volume_geometry(volume_node) -> Tuple[np.ndarray, Tuple[int, int, int]]:
    """``(ijk_to_ras, shape_kji)`` of a scalar volume node without copying its voxels.

    ``ijk_to_ras`` maps voxel indices to world RAS, including linear parent transforms.
    Raises InputError for vector/RGB/tensor volumes, volumes without voxels and non-linear transforms.
    """
    image = _check_scalar_volume(volume_node)
    extent = image.GetExtent()
    shape_kji = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    if min(shape_kji) < 1:
        raise InputError(f"volume {volume_node.GetName()!r} is empty (extent {extent})")
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    node_ijk_to_ras = _to_numpy_matrix(m)
    # MRML image data normally starts at index 0; if not, fold the start index into the matrix.
    start = np.eye(4)
    start[:3, 3] = (extent[0], extent[2], extent[4])
    ijk_to_ras = _node_to_world(volume_node) @ node_ijk_to_ras @ start
    return _checked_matrix(ijk_to_ras), shape_kji


def volume_to_array(volume_node) -> Tuple[np.ndarray, np.ndarray]:
    """A copy of a scalar volume's voxels and its geometry: ``(array_kji, ijk_to_ras)``.

    ``array_kji`` is indexed ``[k, j, i]`` (Slicer's ``arrayFromVolume`` layout) with the file's scalar
    type. ``ijk_to_ras`` is the 4x4 voxel-index-to-world-RAS matrix, any direction matrix (oblique,
    flipped, LPS files) included, with linear parent transforms hardened in.

    Raises InputError for vector/RGB/tensor volumes, volumes without voxels and non-linear transforms.
    """
    ijk_to_ras, shape_kji = volume_geometry(volume_node)
    scalars = volume_node.GetImageData().GetPointData().GetScalars()
    array_kji = numpy_support.vtk_to_numpy(scalars).reshape(shape_kji).copy()
    return array_kji, ijk_to_ras


# ----------------------------------------------------------------------------------------------------
# Markups


def _node_is_positive(markups_node) -> bool:
    value = markups_node.GetAttribute(POSITIVE_ATTRIBUTE)
    return value is None or value.strip().lower() not in _FALSE_WORDS


def markups_to_points_ras(markups_node) -> List[Tuple[np.ndarray, bool]]:
    """Placed control points of a markups node as ``[(position_ras, positive), ...]`` in world RAS.

    Positions include all parent transforms (linear or not). Points that are not placed yet (preview or
    undefined position) are skipped.

    Positive/negative convention (all settable in the Markups module GUI):

    - a control point whose **label starts with "-"** is negative, one whose label starts with "+" is
      positive (rename the point in the control point table, or set the list's label format to ``-%d``
      so that every new point is negative);
    - any other point takes the default of its node: positive, unless the node attribute
      ``MedFM.Positive`` (:data:`POSITIVE_ATTRIBUTE`) is ``false`` / ``0`` / ``no``, which makes a whole
      point list an "exclude" list.
    """
    if markups_node is None or not markups_node.IsA("vtkMRMLMarkupsNode"):
        raise InputError(f"expected a markups node, got {_describe(markups_node)}")
    default_positive = _node_is_positive(markups_node)
    defined = markups_node.PositionDefined
    points: List[Tuple[np.ndarray, bool]] = []
    for index in range(markups_node.GetNumberOfControlPoints()):
        if markups_node.GetNthControlPointPositionStatus(index) != defined:
            continue
        position_ras = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(index, position_ras)
        label = (markups_node.GetNthControlPointLabel(index) or "").strip()
        positive = default_positive
        if label.startswith("-"):
            positive = False
        elif label.startswith("+"):
            positive = True
        points.append((np.array(position_ras, dtype=np.float64), positive))
    return points


def roi_corners_world(roi_node) -> np.ndarray:
    """The 8 corners (8, 3) of a markups ROI box in world RAS (parent transforms applied)."""
    if roi_node is None or not roi_node.IsA("vtkMRMLMarkupsROINode"):
        raise InputError(f"expected a markups ROI node, got {_describe(roi_node)}")
    placed = roi_node.GetNumberOfControlPoints() > 0 and (
        roi_node.GetNthControlPointPositionStatus(0) == roi_node.PositionDefined
    )
    if not placed:
        raise InputError(f"ROI {roi_node.GetName()!r} is not placed yet")
    half_size = np.asarray(roi_node.GetSize(), dtype=np.float64) / 2.0
    object_to_node = _to_numpy_matrix(roi_node.GetObjectToNodeMatrix())
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    corners_node = (signs * half_size) @ object_to_node[:3, :3].T + object_to_node[:3, 3]
    corners_world = np.empty_like(corners_node)
    for n, corner in enumerate(corners_node):
        out = [0.0, 0.0, 0.0]
        roi_node.TransformPointToWorld(corner.tolist(), out)
        corners_world[n] = out
    return corners_world


def roi_to_corners_ras(roi_node) -> Tuple[np.ndarray, np.ndarray]:
    """``(corner0_ras, corner1_ras)``: min and max corners of the world-axis-aligned bounds of a ROI.

    The ROI may be rotated or under a parent transform; the result is the RAS bounding box of its
    8 transformed corners.
    """
    corners = roi_corners_world(roi_node)
    return corners.min(axis=0), corners.max(axis=0)


def roi_to_box_ijk(roi_node, ijk_to_ras) -> Tuple[np.ndarray, np.ndarray]:
    """``(corner0_ijk, corner1_ijk)``: continuous IJK bounds of a ROI on a volume grid.

    The 8 world corners are mapped with :func:`geometry.ras_to_ijk` and their min/max taken, so a ROI
    that is oblique to the volume gives the IJK box that contains it. Not clipped to the volume.
    """
    corners_ijk = geometry.ras_to_ijk(roi_corners_world(roi_node), _checked_matrix(ijk_to_ras))
    return corners_ijk.min(axis=0), corners_ijk.max(axis=0)


# ----------------------------------------------------------------------------------------------------
# Segmentations: low-level helpers


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


# ----------------------------------------------------------------------------------------------------
# Segmentations: public API


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


# ----------------------------------------------------------------------------------------------------
# Files


def _file_name_for(path) -> str:
    name = os.path.basename(os.fspath(path))
    for suffix in (".seg.nrrd", ".seg.nhdr", ".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def _storage_messages(storage_node) -> str:
    messages = storage_node.GetUserMessages() if hasattr(storage_node, "GetUserMessages") else None
    text = messages.GetAllMessagesAsString() if messages is not None else ""
    return f": {text.strip()}" if text and text.strip() else ""


def _read_into(scene, path, data_node, storage_node, kind: str):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{kind} file not found: {path}")
    data_node.SetName(_file_name_for(path))
    scene.AddNode(storage_node)
    scene.AddNode(data_node)
    storage_node.SetFileName(path)
    ok = storage_node.ReadData(data_node)
    if not ok:
        details = _storage_messages(storage_node)
        scene.RemoveNode(data_node)
        scene.RemoveNode(storage_node)
        raise InputError(f"cannot read {kind} file {path}{details}")
    data_node.SetAndObserveStorageNodeID(storage_node.GetID())
    return data_node


def load_volume(scene, path):
    """Read a scalar volume file (.nrrd, .nii.gz, .nii, .mha, ...) into a new vtkMRMLScalarVolumeNode of ``scene``.

    Works without the Slicer GUI (``slicer.mrmlScene`` in the app, any ``vtkMRMLScene`` headless).
    Raises InputError naming the file if it is missing or unreadable (no node is left in the scene).
    """
    node = _read_into(
        scene, path, slicer.vtkMRMLScalarVolumeNode(), slicer.vtkMRMLVolumeArchetypeStorageNode(), "volume"
    )
    try:
        node.CreateDefaultDisplayNodes()
    except Exception:  # display nodes are a convenience for the GUI only
        logger.debug("no display node for %s", path)
    return node


def load_segmentation(scene, path):
    """Read a segmentation file (.seg.nrrd, .nrrd, .nii.gz labelmap, ...) into a new vtkMRMLSegmentationNode.

    Raises InputError naming the file if it is missing or unreadable (no node is left in the scene).
    """
    ensure_segmentation_converters()
    return _read_into(
        scene, path, slicer.vtkMRMLSegmentationNode(), slicer.vtkMRMLSegmentationStorageNode(), "segmentation"
    )


def save_node(node, path) -> None:
    """Write a volume or segmentation node to ``path``; the format follows the extension.

    Volumes: .nrrd, .nii.gz, .nii, .mha...; segmentations: .seg.nrrd (or .nrrd). The file is written to a
    temporary name in the same folder and renamed when complete, so a failure never leaves a partial
    or overwritten file. The node's own storage node (its file name in Slicer) is not changed.
    """
    if node is None or not hasattr(node, "CreateDefaultStorageNode"):
        raise InputError(f"cannot save {_describe(node)}: not a storable node")
    if node.IsA("vtkMRMLSegmentationNode"):
        ensure_segmentation_converters()
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise InputError(f"cannot save {path}: folder {folder} does not exist")
    storage = node.CreateDefaultStorageNode()
    if storage is None:
        raise InputError(f"cannot save {_describe(node)}: it has no storage type")
    if not storage.SupportedFileType(path):
        raise InputError(f"cannot save {_describe(node)} as {path}: unsupported file type")
    fd, temporary = tempfile.mkstemp(prefix=".medfm-", suffix="-" + os.path.basename(path), dir=folder)
    os.close(fd)
    os.remove(temporary)  # the writer creates it; an empty placeholder could be mistaken for success
    try:
        storage.SetFileName(temporary)
        if hasattr(storage, "SetUseCompression"):
            storage.SetUseCompression(1)
        ok = storage.WriteData(node)
        if not ok or not os.path.isfile(temporary) or os.path.getsize(temporary) == 0:
            raise InputError(f"cannot write {_describe(node)} to {path}{_storage_messages(storage)}")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
