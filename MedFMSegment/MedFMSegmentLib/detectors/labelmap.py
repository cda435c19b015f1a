"""Boxes of the regions of a labelmap (:class:`LabelmapDetector`, spec ``labelmap:PATH[:options]``).

An atlas, a TotalSegmentator result or a ``.seg.nrrd`` gives one box per label value (or per
connected component), plus each region's tight per-slice boxes, which make much better SAM prompts
than slices of a loose 3D box. Also here: nearest-neighbour resampling onto the image grid and
label-names files (``value name`` lines, as AAL's ``aal.nii.txt`` or a Slicer ``.ctbl``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .. import geometry
from ..errors import InputError
from .base import Detection, DetectorKind, PathLike, SliceBox, _check_label, _checked_matrix

log = logging.getLogger(__name__)


def read_label_names(path: PathLike) -> Dict[int, str]:
    """Label names from a text file of ``value name [...]`` lines (AAL's ``.txt``, Slicer ``.ctbl``).

    Blank lines and ``#`` comments are skipped; a line whose first field is not an integer raises
    :class:`InputError` naming the file and line.
    """
    path = Path(path)
    names: Dict[int, str] = {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read label names: {exc}") from None
    for line_no, line in enumerate(lines, start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) < 2:
            raise InputError(f"{path}, line {line_no}: expected 'value name', got {line.strip()!r}")
        try:
            value = int(fields[0])
        except ValueError:
            raise InputError(f"{path}, line {line_no}: label value {fields[0]!r} is not an integer") from None
        names[value] = fields[1]
    return names


def _names_file_for(path: Path) -> Optional[Path]:
    """``PATH.txt`` / ``PATH.ctbl``, or without ``.gz``, or without the image suffix, when one exists."""
    stem = path.name
    for suffix in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    unzipped = path.name[:-3] if path.name.lower().endswith(".gz") else path.name  # aal.nii.gz -> aal.nii.txt
    for name in dict.fromkeys((path.name, unzipped, stem)):
        for ext in (".txt", ".ctbl"):
            candidate = path.with_name(name + ext)
            if candidate.is_file():
                return candidate
    return None


def _check_labelmap(labelmap_kji, what: str) -> np.ndarray:
    arr = np.asarray(labelmap_kji)
    if arr.ndim != 3:
        raise InputError(f"{what} must be a 3D [k, j, i] array, got shape {arr.shape}")
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise InputError(f"{what} has non-integer values; a labelmap must hold integer labels")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        raise InputError(f"{what} has dtype {arr.dtype}; a labelmap must hold integer labels")
    if arr.size and arr.min() < 0:
        raise InputError(f"{what} has negative value {int(arr.min())}; labels must be >= 0 (0 = background)")
    return arr


def _same_grid(shape_a, matrix_a, shape_b, matrix_b) -> bool:
    return tuple(shape_a) == tuple(shape_b) and np.allclose(matrix_a, matrix_b, atol=1e-4)


def resample_labelmap_nearest(labelmap_kji: np.ndarray, labelmap_ijk_to_ras, shape_kji: Sequence[int],
                              ijk_to_ras) -> np.ndarray:
    """A labelmap resampled (nearest neighbour) onto another grid; voxels outside it become 0."""
    src = np.asarray(labelmap_kji)
    src_matrix = _checked_matrix(labelmap_ijk_to_ras)
    dst_matrix = _checked_matrix(ijk_to_ras)
    nk, nj, ni = (int(s) for s in shape_kji)
    out = np.zeros((nk, nj, ni), dtype=src.dtype)
    jj, ii = np.meshgrid(np.arange(nj), np.arange(ni), indexing="ij")
    plane_ijk = np.stack([ii.ravel(), jj.ravel(), np.zeros(ii.size)], axis=1).astype(np.float64)
    bounds = np.array(src.shape[::-1])  # (ni, nj, nk) of the source
    for k in range(nk):
        plane_ijk[:, 2] = k
        src_ijk = np.round(geometry.ras_to_ijk(geometry.ijk_to_ras(plane_ijk, dst_matrix), src_matrix))
        inside = np.all((src_ijk >= 0) & (src_ijk < bounds), axis=1)
        idx = src_ijk[inside].astype(np.int64)
        flat = out[k].reshape(-1)
        flat[inside] = src[idx[:, 2], idx[:, 1], idx[:, 0]]
    return out


_RegionBox = Tuple[Tuple[int, int, int], Tuple[int, int, int], int]


def _label_bounding_boxes(labelmap_kji: np.ndarray) -> Dict[int, _RegionBox]:
    """{value: ((k0, j0, i0), (k1, j1, i1), voxel count)} of every non-zero value, in one pass."""
    import SimpleITK as sitk

    if labelmap_kji.max(initial=0) == 0:
        return {}
    image = sitk.GetImageFromArray(labelmap_kji.astype(np.uint32, copy=False))
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(image)
    out = {}
    for value in stats.GetLabels():
        i0, j0, k0, si, sj, sk = stats.GetBoundingBox(value)
        out[int(value)] = ((k0, j0, i0), (k0 + sk - 1, j0 + sj - 1, i0 + si - 1), int(stats.GetNumberOfPixels(value)))
    return out


def _components(mask_kji: np.ndarray, fully_connected: bool):
    """Connected components of a binary mask as ``[(lo_kji, hi_kji, count, component mask crop)]``."""
    import SimpleITK as sitk

    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(mask_kji.astype(np.uint8, copy=False)), fully_connected)
    cc_kji = sitk.GetArrayFromImage(cc)
    out = []
    for value, (lo, hi, count) in _label_bounding_boxes(cc_kji).items():
        sl = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
        out.append((lo, hi, count, cc_kji[sl] == value))
    return out


def tight_slice_boxes(mask_kji: np.ndarray, offset_kji: Sequence[int] = (0, 0, 0),
                      axes: Sequence[str] = geometry.AXES) -> List[SliceBox]:
    """Tight inclusive 2D box of every non-empty slice of a mask, on each of ``axes``.

    ``offset_kji`` is where ``mask_kji`` (often a crop) starts in the volume; boxes and indices are in
    volume coordinates.
    """
    mask = np.asarray(mask_kji, dtype=bool)
    out: List[SliceBox] = []
    for axis in axes:
        a = geometry.array_axis(axis)
        moved = np.moveaxis(mask, a, 0)  # (slice, row = y, col = x), as geometry.get_slice gives slices
        off_s = int(offset_kji[a])
        off_y, off_x = (int(offset_kji[b]) for b in range(3) if b != a)
        rows = moved.any(axis=2)
        cols = moved.any(axis=1)
        present = np.nonzero(rows.any(axis=1))[0]
        if present.size == 0:
            continue
        r, c = rows[present], cols[present]
        y0 = r.argmax(axis=1)
        y1 = r.shape[1] - 1 - r[:, ::-1].argmax(axis=1)
        x0 = c.argmax(axis=1)
        x1 = c.shape[1] - 1 - c[:, ::-1].argmax(axis=1)
        for n, s in enumerate(present):
            out.append((axis, int(s) + off_s, (float(x0[n] + off_x), float(y0[n] + off_y),
                                               float(x1[n] + off_x), float(y1[n] + off_y))))
    return out


def _region_detection(label: str, lo_kji, hi_kji, mask_crop: Optional[np.ndarray],
                      tight_slices: bool) -> Detection:
    box_ijk = (tuple(int(v) for v in lo_kji[::-1]), tuple(int(v) for v in hi_kji[::-1]))
    slices = tight_slice_boxes(mask_crop, lo_kji) if tight_slices and mask_crop is not None else None
    return Detection(label, 1.0, box_ijk=box_ijk, slice_boxes=slices or None)


class LabelmapDetector:
    """One box per label value, or per connected component of each label, of a labelmap.

    ``labelmap`` is a ``[k, j, i]`` integer array with its own ``ijk_to_ras``, or a file path (read
    with :func:`MedFMSegmentLib.io.read_volume`; a ``.seg.nrrd`` with
    :func:`MedFMSegmentLib.io.read_segmentation`, one region per segment). ``labels`` maps the
    values to detect to their names (other values are ignored); without it every non-zero value is
    detected, named from a ``PATH.txt``/``PATH.ctbl`` names file when present, else by its value.
    Regions with fewer than ``min_voxels`` voxels are skipped (logged). With ``per_component`` each
    connected component (face-connected, or also edge/corner-connected with ``fully_connected``) is
    its own detection. With ``tight_slices`` each detection also carries its tight per-slice boxes on
    all three axes. If the image grid differs from the labelmap's, the labelmap is resampled onto
    the image grid (nearest neighbour) first.
    """

    def __init__(self, labelmap: Union[np.ndarray, PathLike], ijk_to_ras=None,
                 labels: Optional[Mapping[int, str]] = None, per_component: bool = False,
                 min_voxels: int = 10, fully_connected: bool = False, tight_slices: bool = True):
        if isinstance(min_voxels, bool) or not isinstance(min_voxels, (int, np.integer)) or min_voxels < 1:
            raise InputError(f"min_voxels must be a positive integer, got {min_voxels!r}")
        self.per_component = bool(per_component)
        self.min_voxels = int(min_voxels)
        self.fully_connected = bool(fully_connected)
        self.tight_slices = bool(tight_slices)
        self.source = "array"
        if isinstance(labelmap, (str, os.PathLike)):
            if ijk_to_ras is not None:
                raise InputError("give ijk_to_ras only with a labelmap array; a file carries its own geometry")
            self._layers, self._matrix, file_names = _read_labelmap_file(Path(labelmap))
            self.source = str(labelmap)
        else:
            if ijk_to_ras is None:
                raise InputError("a labelmap array needs its ijk_to_ras matrix")
            self._layers = [_check_labelmap(labelmap, "labelmap")]
            self._matrix = _checked_matrix(ijk_to_ras)
            file_names = None
        self._names = self._resolve_names(labels, file_names)
        self.labels: Tuple[str, ...] = tuple(dict.fromkeys(self._names.values()))

    def _resolve_names(self, labels, file_names) -> Dict[Tuple[int, int], str]:
        """{(layer, value): name} of every region to detect."""
        present = [set(int(v) for v in np.unique(layer) if v != 0) for layer in self._layers]
        if file_names is not None and isinstance(file_names, list):  # .seg.nrrd: one name per layer
            selected = {(n, 1): name for n, name in enumerate(file_names)}
            if labels is not None:
                raise InputError(f"{self.source}: a .seg.nrrd names its own segments; do not pass labels")
            return selected
        if labels is not None:
            names = {}
            for value, name in dict(labels).items():
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                    raise InputError(f"label value {value!r} must be a positive integer (0 is background)")
                names[(0, int(value))] = _check_label(name)
                if int(value) not in present[0]:
                    log.warning("%s: label %d (%s) does not occur in the labelmap", self.source, value, name)
            return names
        file_names = file_names or {}
        return {(0, v): file_names.get(v, str(v)) for v in sorted(present[0])}

    def detect(self, array_kji: np.ndarray, ijk_to_ras) -> List[Detection]:
        """Boxes of the selected labels (or their components) in voxel indices of the given volume."""
        shape = tuple(int(s) for s in np.shape(array_kji))
        if len(shape) != 3:
            raise InputError(f"the image must be a 3D [k, j, i] array, got shape {shape}")
        matrix = _checked_matrix(ijk_to_ras)
        out: List[Detection] = []
        for layer_no, layer in enumerate(self._layers):
            wanted = {v: name for (n, v), name in self._names.items() if n == layer_no}
            if not wanted:
                continue
            if not _same_grid(layer.shape, self._matrix, shape, matrix):
                log.info("%s: labelmap grid differs from the image grid; resampling (nearest neighbour)",
                         self.source)
                layer = resample_labelmap_nearest(layer, self._matrix, shape, matrix)
            out.extend(self._detect_layer(layer, wanted))
        return out

    def _detect_layer(self, layer: np.ndarray, wanted: Mapping[int, str]) -> List[Detection]:
        boxes = _label_bounding_boxes(layer)
        out = []
        for value, name in wanted.items():
            if value not in boxes:
                log.warning("%s: label %d (%s) is absent from the image grid", self.source, value, name)
                continue
            lo, hi, count = boxes[value]
            if count < self.min_voxels:
                log.info("%s: label %s has %d voxels (< min_voxels %d); skipped", self.source, name, count,
                         self.min_voxels)
                continue
            crop = layer[tuple(slice(a, b + 1) for a, b in zip(lo, hi))] == value
            if not self.per_component:
                out.append(_region_detection(name, lo, hi, crop, self.tight_slices))
                continue
            kept = 0
            for c_lo, c_hi, c_count, c_mask in _components(crop, self.fully_connected):
                if c_count < self.min_voxels:
                    continue
                g_lo = tuple(a + b for a, b in zip(lo, c_lo))
                g_hi = tuple(a + b for a, b in zip(lo, c_hi))
                out.append(_region_detection(name, g_lo, g_hi, c_mask, self.tight_slices))
                kept += 1
            log.info("%s: label %s has %d component(s) of >= %d voxels", self.source, name, kept, self.min_voxels)
        return out


def _read_labelmap_file(path: Path):
    """(layers, ijk_to_ras, names) of a labelmap file: names a {value: name} dict, or a list for .seg.nrrd."""
    from .. import io as medfm_io

    if path.name.lower().endswith(".seg.nrrd"):
        masks, matrix = medfm_io.read_segmentation(path)
        return [m.astype(np.uint8) for m in masks.values()], matrix, list(masks)
    array_kji, matrix = medfm_io.read_volume(path)
    layer = _check_labelmap(array_kji, str(path))
    names_file = _names_file_for(path)
    names = read_label_names(names_file) if names_file is not None else None
    if names_file is not None:
        log.info("%s: label names from %s", path, names_file)
    return [layer], matrix, names


def _from_spec(path: str, options: Mapping[str, str], spec: str) -> LabelmapDetector:
    if not Path(path).exists():
        raise InputError(f"{path}: labelmap file not found (spec {spec!r})")
    return LabelmapDetector(path, per_component="per-component" in options,
                            min_voxels=int(options.get("min-voxels") or 10),
                            fully_connected="fully-connected" in options)


KIND = DetectorKind("labelmap", _from_spec, ("per-component", "fully-connected", r"min-voxels=\d+"), help="""\
  labelmap:PATH[:per-component][:min-voxels=N][:fully-connected]
      one box per non-zero label of a labelmap (.nii.gz, .nrrd, ...; a .seg.nrrd gives one box per
      segment), or per connected component; label names come from PATH.txt / PATH.ctbl when
      present ("value name ..." lines, as AAL's aal.nii.txt), else the values. The labelmap may
      be on another grid than the image (it is resampled, nearest neighbour).""")
