"""The detector contract: the :class:`Detector` protocol, :class:`Detection`, input checks, RAS boxes.

Every other module of :mod:`MedFMSegmentLib.detectors` builds on this one; it imports only numpy,
:mod:`MedFMSegmentLib.geometry` and :mod:`MedFMSegmentLib.errors`.

Box conventions (see :mod:`MedFMSegmentLib.geometry`): ``box_ijk = ((i0, j0, k0), (i1, j1, k1))``
are inclusive voxel indices; a 2D ``box_xy = (x0, y0, x1, y1)`` is inclusive on its slice. A box
given in RAS (or LPS) millimetres covers the voxels whose *centres* lie inside it: its 8 corners are
mapped to IJK with :func:`geometry.ras_to_ijk` and the enclosed voxel centres are kept (a box
thinner than a voxel keeps the nearest voxel).
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional, Protocol, Tuple, Union, runtime_checkable

import numpy as np

from .. import geometry
from ..errors import InputError

PathLike = Union[str, os.PathLike]
BoxIJK = Tuple[Tuple[int, int, int], Tuple[int, int, int]]
BoxXY = Tuple[float, float, float, float]
SliceBox = Tuple[str, int, BoxXY]
IntBoxXY = Tuple[int, int, int, int]

#: Tolerance (voxels) when deciding whether a voxel centre lies inside a continuous box.
_EPS = 1e-4


@dataclass(frozen=True)
class Detection:
    """One detected object: a label, a score, and a 3D box and/or per-slice 2D boxes.

    ``box_ijk`` is ``((i0, j0, k0), (i1, j1, k1))`` (inclusive voxel indices; corners are sorted,
    non-integer values rounded). ``slice_boxes`` is a sequence of ``(axis, index, box_xy)``: finer
    2D boxes on some slices of one or more axes (used instead of slicing ``box_ijk`` when they exist
    for the requested axis). At least one of the two is required. Invalid values (empty label, NaN
    score, malformed boxes) raise :class:`InputError`.
    """

    label: str
    score: float = 1.0
    box_ijk: Optional[BoxIJK] = None
    slice_boxes: Optional[Tuple[SliceBox, ...]] = None

    def __post_init__(self) -> None:
        label = _check_label(self.label)
        score = _check_score(self.score, label)
        box = None if self.box_ijk is None else _check_box_ijk(self.box_ijk, label)
        slices = None if self.slice_boxes is None else _check_slice_boxes(self.slice_boxes, label)
        if box is None and not slices:
            raise InputError(f"detection {label!r} has neither a 3D box (box_ijk) nor slice boxes")
        object.__setattr__(self, "label", label)
        object.__setattr__(self, "score", score)
        object.__setattr__(self, "box_ijk", box)
        object.__setattr__(self, "slice_boxes", slices)

    def axes(self) -> Tuple[str, ...]:
        """Axes on which this detection has its own 2D slice boxes."""
        return tuple(sorted({a for a, _, _ in self.slice_boxes or ()}))


def _check_label(label) -> str:
    if not isinstance(label, str) or not label.strip():
        raise InputError(f"detection label {label!r} is empty or not a string")
    return label.strip()


def _check_score(score, label: str) -> float:
    try:
        value = float(score)
    except (TypeError, ValueError):
        raise InputError(f"detection {label!r} has a non-numeric score {score!r}") from None
    if not math.isfinite(value):
        raise InputError(f"detection {label!r} has score {value}: scores must be finite numbers")
    return value


def _finite(values, count: int, what: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be {count} numbers, got {values!r}") from None
    if arr.size != count:
        raise InputError(f"{what} must be {count} numbers, got {arr.size}: {values!r}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{what} contains NaN or inf: {values!r}")
    return arr


def _check_box_ijk(box, label: str) -> BoxIJK:
    arr = _finite(box, 6, f"box_ijk of detection {label!r}").reshape(2, 3)
    arr = np.round(arr).astype(np.int64)
    lo, hi = arr.min(axis=0), arr.max(axis=0)
    return tuple(int(v) for v in lo), tuple(int(v) for v in hi)


def _check_slice_boxes(slice_boxes, label: str) -> Tuple[SliceBox, ...]:
    out = []
    for n, item in enumerate(slice_boxes):
        try:
            axis, index, box_xy = item
        except (TypeError, ValueError):
            raise InputError(f"slice box {n} of detection {label!r} must be (axis, index, box_xy), "
                             f"got {item!r}") from None
        try:
            geometry.check_axis(axis)
        except ValueError as exc:
            raise InputError(f"slice box {n} of detection {label!r}: {exc}") from None
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise InputError(f"slice box {n} of detection {label!r}: index must be an integer, got {index!r}")
        b = _finite(box_xy, 4, f"box_xy of slice box {n} of detection {label!r}")
        x0, x1 = sorted((float(b[0]), float(b[2])))
        y0, y1 = sorted((float(b[1]), float(b[3])))
        out.append((axis, int(index), (x0, y0, x1, y1)))
    return tuple(out)


@runtime_checkable
class Detector(Protocol):
    """Anything that finds labelled boxes in a volume.

    ``detect`` gets the volume as ``array_kji`` plus its 4x4 ``ijk_to_ras`` and returns
    :class:`Detection` objects whose boxes are in that volume's voxel indices. A detector may also
    expose ``labels`` (a sequence of the names it can produce).
    """

    def detect(self, array_kji: np.ndarray, ijk_to_ras) -> List[Detection]:
        ...


def detector_labels(detector) -> Optional[Tuple[str, ...]]:
    """The names a detector says it can produce (its optional ``labels`` attribute), or None."""
    labels = getattr(detector, "labels", None)
    if labels is None:
        return None
    if isinstance(labels, Mapping):
        labels = labels.values()
    return tuple(str(v) for v in labels)


def _voxels_inside(lo_ijk: np.ndarray, hi_ijk: np.ndarray) -> BoxIJK:
    """Inclusive voxel range whose centres lie in the continuous box [lo, hi] (nearest if thinner)."""
    lo = np.ceil(lo_ijk - _EPS)
    hi = np.floor(hi_ijk + _EPS)
    thin = hi < lo
    mid = np.round((lo_ijk + hi_ijk) / 2.0)
    lo[thin] = mid[thin]
    hi[thin] = mid[thin]
    return tuple(int(v) for v in lo), tuple(int(v) for v in hi)


def box_ras_to_ijk(corner0_ras, corner1_ras, ijk_to_ras) -> BoxIJK:
    """An axis-aligned RAS box (two opposite corners, mm) -> the inclusive IJK box of the voxels inside.

    The 8 corners are mapped with :func:`geometry.ras_to_ijk`, so a volume with oblique axes gets
    the IJK bounding box of the rotated RAS box.
    """
    c0 = _finite(corner0_ras, 3, "RAS box corner")
    c1 = _finite(corner1_ras, 3, "RAS box corner")
    corners_ras = np.array([[(c0, c1)[s][a] for a, s in enumerate(bits)]
                            for bits in itertools.product((0, 1), repeat=3)])
    corners_ijk = geometry.ras_to_ijk(corners_ras, ijk_to_ras)
    return _voxels_inside(corners_ijk.min(axis=0), corners_ijk.max(axis=0))


def _checked_matrix(ijk_to_ras) -> np.ndarray:
    try:
        return geometry.check_matrix(ijk_to_ras)
    except ValueError as exc:
        raise InputError(f"invalid ijk_to_ras: {exc}") from None


@dataclass(frozen=True)
class DetectorKind:
    """One kind of ``KIND:PATH[:options]`` detector spec (an entry of ``specs.DETECTOR_KINDS``).

    ``make(path, options, spec)`` builds the detector; ``options`` maps each given option name to
    its value (``""`` for a flag) and ``spec`` is the whole spec, for messages. ``options`` here
    lists the accepted options as regular expressions (``"per-component"``, ``r"min-voxels=\\d+"``);
    the option name is the part before ``=``. ``help`` is the kind's block of the CLI help.
    """

    name: str
    make: Callable[[str, Mapping[str, str], str], "Detector"]
    options: Tuple[str, ...] = ()
    help: str = ""

    def option_names(self) -> Tuple[str, ...]:
        return tuple(pattern.partition("=")[0] for pattern in self.options)
