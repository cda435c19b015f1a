"""Coordinate frames and slice geometry: the one place where frames are converted.

Conventions (see README, "Conventions"):

- A volume is ``array_kji`` (numpy, indexed ``[k, j, i]`` as Slicer's ``arrayFromVolume`` gives it)
  plus ``ijk_to_ras``, a 4x4 matrix mapping homogeneous voxel indices ``(i, j, k, 1)`` to RAS mm.
- An *axis* names the slicing direction in the volume's IJK space:
  ``axial`` = k (array axis 0), ``coronal`` = j (array axis 1), ``sagittal`` = i (array axis 2).
- A 2D slice is a numpy array ``[row, col]``; a position inside it is ``xy_slice = (x, y)`` with
  ``x`` = column and ``y`` = row. Boxes are inclusive corners ``(x0, y0, x1, y1)``.

  ===========  ========  =====  =====
  axis         index     x      y
  ===========  ========  =====  =====
  axial        k         i      j
  coronal      j         i      k
  sagittal     i         j      k
  ===========  ========  =====  =====
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from .errors import InputError, InputIndexError, InputTypeError

AXES: Tuple[str, ...] = ("axial", "coronal", "sagittal")

# axis name -> (array axis in kji order, ijk component of the slice index, ijk component of x, of y)
_AXIS_TABLE = {
    "axial": (0, 2, 0, 1),
    "coronal": (1, 1, 0, 2),
    "sagittal": (2, 0, 1, 2),
}


def check_axis(axis: str) -> str:
    """Return ``axis`` if it names a slicing axis, else raise ``InputError`` naming the choices."""
    if axis not in _AXIS_TABLE:
        raise InputError(f"unknown axis {axis!r}: expected one of {', '.join(AXES)}")
    return axis


def array_axis(axis: str) -> int:
    """Axis of the ``[k, j, i]`` array that ``axis`` slices along."""
    return _AXIS_TABLE[check_axis(axis)][0]


def check_matrix(ijk_to_ras) -> np.ndarray:
    """Validate and return a 4x4 float64 IJK-to-RAS matrix."""
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    if m.shape != (4, 4):
        raise InputError(f"ijk_to_ras must be a 4x4 matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise InputError("ijk_to_ras contains NaN or inf")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise InputError("ijk_to_ras is singular (zero spacing or degenerate direction)")
    if not np.allclose(m[3], [0, 0, 0, 1]):
        raise InputError("ijk_to_ras last row must be (0, 0, 0, 1)")
    return m


def ijk_to_ras(points_ijk, ijk_to_ras_matrix) -> np.ndarray:
    """Voxel indices (..., 3) in (i, j, k) order -> RAS millimetres (..., 3)."""
    m = check_matrix(ijk_to_ras_matrix)
    p = np.asarray(points_ijk, dtype=np.float64)
    return p @ m[:3, :3].T + m[:3, 3]


def ras_to_ijk(points_ras, ijk_to_ras_matrix) -> np.ndarray:
    """RAS millimetres (..., 3) -> continuous voxel indices (i, j, k) (..., 3)."""
    m = check_matrix(ijk_to_ras_matrix)
    inv = np.linalg.inv(m)
    p = np.asarray(points_ras, dtype=np.float64)
    return p @ inv[:3, :3].T + inv[:3, 3]


def lps_to_ras_matrix(ijk_to_lps) -> np.ndarray:
    """Convert an IJK-to-LPS matrix (ITK / NRRD convention) into IJK-to-RAS."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ np.asarray(ijk_to_lps, dtype=np.float64)


def spacing(ijk_to_ras_matrix) -> np.ndarray:
    """Voxel size in mm along i, j, k (column norms of the direction-scaled matrix)."""
    m = check_matrix(ijk_to_ras_matrix)
    return np.linalg.norm(m[:3, :3], axis=0)


def slice_pixel_spacing(ijk_to_ras_matrix, axis: str) -> Tuple[float, float]:
    """(row spacing, column spacing) in mm of a slice along ``axis``, i.e. (y, x) spacing."""
    _, _, cx, cy = _AXIS_TABLE[check_axis(axis)]
    s = spacing(ijk_to_ras_matrix)
    return float(s[cy]), float(s[cx])


def slice_spacing(ijk_to_ras_matrix, axis: str) -> float:
    """Distance in mm from one slice along ``axis`` to the next (the voxel size along its normal index)."""
    return float(spacing(ijk_to_ras_matrix)[_AXIS_TABLE[check_axis(axis)][1]])


def num_slices(shape_kji: Sequence[int], axis: str) -> int:
    return int(shape_kji[array_axis(axis)])


def check_index(shape_kji: Sequence[int], axis: str, index) -> int:
    n = num_slices(shape_kji, axis)
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
        raise InputTypeError(f"slice index must be an integer, got {index!r}")
    if not 0 <= int(index) < n:
        raise InputIndexError(f"{axis} slice index {index} is out of range: the volume has {n} {axis} slices (0..{n - 1})")
    return int(index)


def get_slice(array_kji: np.ndarray, axis: str, index: int) -> np.ndarray:
    """The 2D ``[y, x]`` slice of a ``[k, j, i]`` array (a view, not a copy)."""
    index = check_index(array_kji.shape, axis, index)
    a = array_axis(axis)
    if a == 0:
        return array_kji[index]
    if a == 1:
        return array_kji[:, index, :]
    return array_kji[:, :, index]


def set_slice(array_kji: np.ndarray, axis: str, index: int, values: np.ndarray) -> None:
    """Write a 2D ``[y, x]`` slice into a ``[k, j, i]`` array in place."""
    get_slice(array_kji, axis, index)[...] = values


def slice_shape(shape_kji: Sequence[int], axis: str) -> Tuple[int, int]:
    """(height, width) = (rows, cols) of a slice along ``axis``."""
    a = array_axis(axis)
    rest = [int(s) for n, s in enumerate(shape_kji) if n != a]
    return rest[0], rest[1]


def ijk_to_slice(point_ijk, axis: str) -> Tuple[int, Tuple[float, float]]:
    """A voxel position (i, j, k) -> (slice index along ``axis``, ``xy_slice``)."""
    _, ci, cx, cy = _AXIS_TABLE[check_axis(axis)]
    p = np.asarray(point_ijk, dtype=np.float64).reshape(3)
    return int(round(p[ci])), (float(p[cx]), float(p[cy]))


def slice_to_ijk(index: int, xy_slice, axis: str) -> np.ndarray:
    """(slice index, ``xy_slice``) on ``axis`` -> voxel position (i, j, k)."""
    _, ci, cx, cy = _AXIS_TABLE[check_axis(axis)]
    p = np.zeros(3)
    p[ci], p[cx], p[cy] = index, xy_slice[0], xy_slice[1]
    return p


def box_ijk_to_slice(corner0_ijk, corner1_ijk, axis: str) -> Tuple[int, Tuple[float, float, float, float]]:
    """Two IJK corners of a 2D box lying on one slice -> (index, ``box_xy`` = (x0, y0, x1, y1)).

    The slice index is the rounded mean of the corners along the axis; corners are sorted.
    """
    _, ci, cx, cy = _AXIS_TABLE[check_axis(axis)]
    a = np.asarray(corner0_ijk, dtype=np.float64).reshape(3)
    b = np.asarray(corner1_ijk, dtype=np.float64).reshape(3)
    index = int(round((a[ci] + b[ci]) / 2.0))
    x0, x1 = sorted((a[cx], b[cx]))
    y0, y1 = sorted((a[cy], b[cy]))
    return index, (float(x0), float(y0), float(x1), float(y1))


def box_from_mask(mask2d: np.ndarray):
    """Tight inclusive box ``(x0, y0, x1, y1)`` of a 2D mask, or None if it is empty."""
    ys, xs = np.nonzero(mask2d)
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def bbox_kji(mask_kji: np.ndarray):
    """Inclusive bounding box of a 3D mask as ``((k0, j0, i0), (k1, j1, i1))``, or None if empty."""
    idx = np.nonzero(mask_kji)
    if idx[0].size == 0:
        return None
    return tuple(int(v.min()) for v in idx), tuple(int(v.max()) for v in idx)


def closest_axis(normal_ras, ijk_to_ras_matrix) -> str:
    """The IJK slicing axis whose direction is closest to a view normal given in RAS."""
    m = check_matrix(ijk_to_ras_matrix)
    n = np.asarray(normal_ras, dtype=np.float64)
    n = n / (np.linalg.norm(n) or 1.0)
    dirs = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)
    score = np.abs(dirs.T @ n)  # along i, j, k
    return {0: "sagittal", 1: "coronal", 2: "axial"}[int(np.argmax(score))]
