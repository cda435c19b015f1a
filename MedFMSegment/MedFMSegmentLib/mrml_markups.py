"""MRML layer, markups as prompts: control points (positive / negative) and ROI boxes in world RAS."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from . import geometry
from .errors import InputError
from .mrml_volumes import _checked_matrix, _describe, _to_numpy_matrix

#: Node attribute that makes all points of a markups node negative when set to "false" (or "0", "no").
POSITIVE_ATTRIBUTE = "MedFM.Positive"

_FALSE_WORDS = ("false", "0", "no", "off", "negative")



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
