"""MRML layer, volumes and geometry: world matrices of nodes, voxel lattices, scalar volumes as arrays.

Frames: everything returned is in *world* RAS (linear parent transforms hardened in; a non-linear one is
refused with an InputError). Volumes come back as ``array_kji`` plus a 4x4 ``ijk_to_ras`` (see :mod:`geometry`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import vtk
from vtk.util import numpy_support

from . import geometry
from .errors import InputError

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


def make_ellipsoid_volume(scene, shape_kji=(24, 48, 56), radii_kji=(7, 14, 18), spacing=(1.0, 1.0, 1.5), seed=0):
    """A bright ellipsoid in noise as a new scalar volume node of ``scene`` (for self-tests and demos).

    Returns ``(node, truth)`` with ``truth`` the ellipsoid as a uint8 mask ``[k, j, i]``.
    """
    k, j, i = np.indices(shape_kji)
    centre = [(s - 1) / 2 for s in shape_kji]
    truth = sum(((a - c) / r) ** 2 for a, c, r in zip((k, j, i), centre, radii_kji)) <= 1
    voxels = np.random.default_rng(seed).normal(100, 20, shape_kji) + 200 * truth
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MedFM ellipsoid")
    image = vtk.vtkImageData()
    image.SetDimensions(shape_kji[2], shape_kji[1], shape_kji[0])
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = voxels.astype(np.int16).ravel()
    node.SetAndObserveImageData(image)
    node.SetSpacing(*spacing)
    return node, truth.astype(np.uint8)
