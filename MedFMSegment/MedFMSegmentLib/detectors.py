"""Detectors and detector-to-SAM chaining: boxes from a detector become per-slice box prompts.

A *detector* is anything with ``detect(array_kji, ijk_to_ras) -> list[Detection]`` (the
:class:`Detector` protocol). A detector that knows the names it can produce may expose them as a
``labels`` attribute (a sequence of str); :func:`chain` then rejects requests for other names.

Built-in detectors
  - :class:`BoxFileDetector`: boxes read from a CSV or JSON file (format below), in RAS, LPS or IJK.
  - :class:`RoiDetector`: boxes given as ``(label, corner0_ras, corner1_ras)`` (e.g. Slicer ROIs).
  - :class:`LabelmapDetector`: one box per label value, or per connected component, of a labelmap
    (an atlas, a TotalSegmentator result, a ``.seg.nrrd``); also gives each region's tight
    per-slice boxes, which make much better SAM prompts than slices of a loose 3D box.
  - :class:`MonaiRetinaNetDetector`: a MONAI RetinaNet (``monai.apps.detection``) from a local
    bundle folder or a TorchScript file, configured by a small JSON file (format below).

Box conventions (see :mod:`MedFMSegmentLib.geometry`): ``box_ijk = ((i0, j0, k0), (i1, j1, k1))``
are inclusive voxel indices; a 2D ``box_xy = (x0, y0, x1, y1)`` is inclusive on its slice. A box
given in RAS (or LPS) millimetres covers the voxels whose *centres* lie inside it: its 8 corners are
mapped to IJK with :func:`geometry.ras_to_ijk` and the enclosed voxel centres are kept (a box
thinner than a voxel keeps the nearest voxel).

Box file formats (:class:`BoxFileDetector`)
  CSV, with a header row; columns ``label,x0,y0,z0,x1,y1,z1`` are required, ``score`` (default 1)
  and ``space`` (``RAS`` default, ``LPS`` or ``IJK``) are optional::

      label,score,space,x0,y0,z0,x1,y1,z1
      Thalamus_L,0.93,RAS,-20.5,-30,-2,-3,-5,18

  JSON, a list (or ``{"boxes": [...]}``) of objects, either a 3D box::

      {"label": "Thalamus_L", "score": 0.93, "space": "RAS", "corners": [[x0, y0, z0], [x1, y1, z1]]}

  or a 2D box on one slice, in that slice's pixel coordinates (IJK)::

      {"label": "Thalamus_L", "score": 0.9, "axis": "axial", "index": 72, "box_xy": [x0, y0, x1, y1]}

MONAI RetinaNet configuration (:class:`MonaiRetinaNetDetector`)
  A bundle folder holds ``configs/detector.json`` and ``models/model.pt`` (a state dict of the
  ``RetinaNet`` network, loaded with ``torch.load(weights_only=True)``) or ``models/model.ts``
  (TorchScript). A TorchScript file may also be given directly, with its configuration in a
  sidecar ``<file>.json`` (or ``<file without suffix>.json``). The configuration is plain JSON,
  never evaluated; key names follow MONAI's detection tutorial (defaults: its LUNA16 model)::

      {
        "labels": {"0": "nodule"},              # class index -> name (required; or a list)
        "backbone": {"block": "bottleneck", "layers": [3, 4, 6, 3],
                     "block_inplanes": [64, 128, 256, 512],
                     "conv1_t_size": [7, 7, 7], "conv1_t_stride": [2, 2, 1]},
        "returned_layers": [1, 2],
        "base_anchor_shapes": [[6, 8, 4], [8, 6, 5], [10, 10, 6]],
        "feature_map_scales": [1, 2, 4],        # default 2**n for each FPN level
        "size_divisible": [16, 16, 8],          # default derived from the backbone
        "orientation": "RAS",                   # model array axes: "RAS" (MONAI Orientationd) or "IJK"
        "spacing": [0.703125, 0.703125, 1.25],  # model voxel size in mm, null = native
        "intensity": {"a_min": -1024, "a_max": 300, "b_min": 0, "b_max": 1, "clip": true},
                                                # null = min-max scaling to 0..1
        "score_thresh": 0.02, "nms_thresh": 0.22, "detections_per_img": 300,
        "topk_candidates_per_level": 1000,
        "infer_patch_size": null                # e.g. [512, 512, 192]: sliding-window inference
      }

  Predicted boxes are MONAI ``StandardMode`` boxes in the model array frame, ``[min, max + 1)``
  voxel edges as :func:`monai.apps.detection.transforms.box_ops.convert_mask_to_box` makes them;
  they are mapped back through the resampling and reorientation to voxel indices of the input.

Chaining
  :func:`detections_to_slice_boxes` turns detections into ``{label: [(index, box_xy), ...]}`` on
  one axis (score threshold, margin, clipping to the volume, per-slice merging of overlapping boxes
  of a label); :func:`chain` runs a detector, plans the boxes, and calls a caller-given
  ``segment_label(label, boxes) -> mask_kji`` (e.g. a SAM session) once per label.

Detector specs (:func:`detector_from_spec`, the CLI's ``--detector SPEC``): see
:data:`DETECTOR_SPEC_HELP`.
"""
from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import (Any, Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple,
                    Union, runtime_checkable)

import numpy as np

from . import geometry
from .errors import Cancelled, InputError, MedFMError, ModelError

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
BoxIJK = Tuple[Tuple[int, int, int], Tuple[int, int, int]]
BoxXY = Tuple[float, float, float, float]
SliceBox = Tuple[str, int, BoxXY]
IntBoxXY = Tuple[int, int, int, int]

#: Tolerance (voxels) when deciding whether a voxel centre lies inside a continuous box.
_EPS = 1e-4
SPACES = ("RAS", "LPS", "IJK")
MERGE_MODES = ("nms", "union")

DETECTOR_SPEC_HELP = """\
Detector specs (--detector SPEC):
  labelmap:PATH[:per-component][:min-voxels=N][:fully-connected]
      one box per non-zero label of a labelmap (.nii.gz, .nrrd, ...; a .seg.nrrd gives one box per
      segment), or per connected component; label names come from PATH.txt / PATH.ctbl when
      present ("value name ..." lines, as AAL's aal.nii.txt), else the values. The labelmap may
      be on another grid than the image (it is resampled, nearest neighbour).
  boxes:PATH
      boxes from a CSV or JSON file (RAS, LPS or IJK), see MedFMSegmentLib.detectors.
  monai:PATH[:device=DEV]
      a MONAI RetinaNet: a bundle folder (configs/detector.json + models/model.pt or model.ts)
      or a TorchScript file with a sidecar PATH.json configuration."""


# --------------------------------------------------------------------------- detections

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


# --------------------------------------------------------------------------- RAS boxes

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


def _lps_to_ras_point(p: np.ndarray) -> np.ndarray:
    return np.array([-p[0], -p[1], p[2]], dtype=np.float64)


# --------------------------------------------------------------------------- box file / ROI detectors

@dataclass(frozen=True)
class _FileBox:
    label: str
    score: float
    space: str  # RAS / IJK / SLICE
    corner0: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    corner1: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    slice_box: Optional[SliceBox] = None


class BoxFileDetector:
    """Boxes read from a CSV or JSON file (format in the module docstring), converted to the volume's IJK.

    The file is read and validated when the detector is made (a bad file raises :class:`InputError`
    naming the file, row and column or key); ``detect`` only converts coordinates.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._boxes = _read_box_file(self.path)
        self.labels: Tuple[str, ...] = tuple(dict.fromkeys(b.label for b in self._boxes))
        if not self._boxes:
            log.warning("%s: the box file holds no boxes", self.path)

    def detect(self, array_kji: np.ndarray, ijk_to_ras) -> List[Detection]:
        """The file's boxes, in voxel indices of the given volume."""
        matrix = _checked_matrix(ijk_to_ras)
        out = []
        for b in self._boxes:
            if b.space == "SLICE":
                out.append(Detection(b.label, b.score, slice_boxes=(b.slice_box,)))
            elif b.space == "IJK":
                out.append(Detection(b.label, b.score, box_ijk=(b.corner0, b.corner1)))
            else:
                out.append(Detection(b.label, b.score, box_ijk=box_ras_to_ijk(b.corner0, b.corner1, matrix)))
        return out


def _read_box_file(path: Path) -> List[_FileBox]:
    if not path.is_file():
        raise InputError(f"{path}: box file not found")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the box file: {exc}") from None
    if suffix == ".json":
        return _parse_box_json(text, path)
    if suffix in (".csv", ".txt"):
        return _parse_box_csv(text, path)
    raise InputError(f"{path}: unknown box file type {suffix!r}; expected .csv or .json")


def _space(value, where: str) -> str:
    space = str(value if value is not None else "RAS").strip().upper() or "RAS"
    if space not in SPACES:
        raise InputError(f"{where}: unknown space {value!r}; expected one of {', '.join(SPACES)}")
    return space


def _make_file_box(label, score, space, c0, c1, where: str) -> _FileBox:
    try:
        label = _check_label(label)
        score = _check_score(1.0 if score is None or score == "" else score, label)
        c0 = _finite(c0, 3, "first corner")
        c1 = _finite(c1, 3, "second corner")
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    space = _space(space, where)
    if space == "LPS":
        c0, c1, space = _lps_to_ras_point(c0), _lps_to_ras_point(c1), "RAS"
    return _FileBox(label, score, space, tuple(float(v) for v in c0), tuple(float(v) for v in c1))


_CSV_COORDS = ("x0", "y0", "z0", "x1", "y1", "z1")


def _parse_box_csv(text: str, path: Path) -> List[_FileBox]:
    reader = csv.DictReader(text.splitlines())
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    missing = [c for c in ("label",) + _CSV_COORDS if c not in header]
    if missing:
        raise InputError(f"{path}: missing CSV column(s) {', '.join(missing)}; the header must hold "
                         f"label,x0,y0,z0,x1,y1,z1 (and optionally score, space)")
    out = []
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        if not any(row.values()):
            continue
        where = f"{path}, line {line}"
        coords = []
        for c in _CSV_COORDS:
            try:
                coords.append(float(row[c]))
            except ValueError:
                raise InputError(f"{where}: column {c} is not a number: {row[c]!r}") from None
        out.append(_make_file_box(row["label"], row.get("score"), row.get("space"),
                                  coords[:3], coords[3:], where))
    return out


def _parse_box_json(text: str, path: Path) -> List[_FileBox]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: invalid JSON: {exc}") from None
    if isinstance(data, Mapping):
        if "boxes" not in data:
            raise InputError(f"{path}: expected a list of boxes or an object with a 'boxes' list")
        data = data["boxes"]
    if not isinstance(data, list):
        raise InputError(f"{path}: 'boxes' must be a list, got {type(data).__name__}")
    out = []
    for n, item in enumerate(data):
        where = f"{path}, box {n}"
        if not isinstance(item, Mapping):
            raise InputError(f"{where}: must be an object, got {item!r}")
        if "box_xy" in item:
            out.append(_json_slice_box(item, where))
            continue
        corners = item.get("corners")
        if corners is None:
            raise InputError(f"{where}: needs 'corners' ([[x0, y0, z0], [x1, y1, z1]]) or "
                             f"'axis', 'index' and 'box_xy'")
        if not isinstance(corners, (list, tuple)) or len(corners) != 2:
            raise InputError(f"{where}: 'corners' must be two points, got {corners!r}")
        out.append(_make_file_box(item.get("label"), item.get("score"), item.get("space"),
                                  corners[0], corners[1], where))
    return out


def _json_slice_box(item: Mapping, where: str) -> _FileBox:
    for key in ("axis", "index"):
        if key not in item:
            raise InputError(f"{where}: a 2D box needs {key!r}")
    space = str(item.get("space", "IJK")).upper()
    if space != "IJK":
        raise InputError(f"{where}: 2D slice boxes are in slice pixel coordinates (space IJK), got {space!r}")
    try:
        label = _check_label(item.get("label"))
        score = _check_score(item.get("score", 1.0), label)
        (slice_box,) = _check_slice_boxes([(item["axis"], item["index"], item["box_xy"])], label)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    return _FileBox(label, score, "SLICE", slice_box=slice_box)


class RoiDetector:
    """Boxes given as ``(label, corner0_ras, corner1_ras)`` triples (e.g. Slicer ROI markups).

    Corners are any two opposite corners of an axis-aligned RAS box in mm (the MRML layer extracts
    them from ROI nodes). Validated when made; every ROI gets ``score``.
    """

    def __init__(self, rois: Iterable[Tuple[str, Sequence[float], Sequence[float]]], score: float = 1.0):
        self._rois = []
        for n, roi in enumerate(rois):
            try:
                label, c0, c1 = roi
            except (TypeError, ValueError):
                raise InputError(f"ROI {n} must be (label, corner0_ras, corner1_ras), got {roi!r}") from None
            label = _check_label(label)
            self._rois.append((label, _finite(c0, 3, f"ROI {label!r} corner0_ras"),
                               _finite(c1, 3, f"ROI {label!r} corner1_ras")))
        self.score = _check_score(score, "ROI")
        self.labels: Tuple[str, ...] = tuple(dict.fromkeys(r[0] for r in self._rois))

    def detect(self, array_kji: np.ndarray, ijk_to_ras) -> List[Detection]:
        """One detection per ROI, in voxel indices of the given volume."""
        matrix = _checked_matrix(ijk_to_ras)
        return [Detection(label, self.score, box_ijk=box_ras_to_ijk(c0, c1, matrix))
                for label, c0, c1 in self._rois]


def _checked_matrix(ijk_to_ras) -> np.ndarray:
    try:
        return geometry.check_matrix(ijk_to_ras)
    except ValueError as exc:
        raise InputError(f"invalid ijk_to_ras: {exc}") from None


# --------------------------------------------------------------------------- labelmap detector

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
    from . import io as medfm_io

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


# --------------------------------------------------------------------------- MONAI RetinaNet

_DEFAULT_CONFIG: Dict[str, Any] = {
    "spatial_dims": 3,
    "n_input_channels": 1,
    "backbone": {"block": "bottleneck", "layers": [3, 4, 6, 3], "block_inplanes": [64, 128, 256, 512],
                 "conv1_t_size": [7, 7, 7], "conv1_t_stride": [2, 2, 1]},
    "returned_layers": [1, 2],
    "base_anchor_shapes": [[6, 8, 4], [8, 6, 5], [10, 10, 6]],
    "feature_map_scales": None,
    "size_divisible": None,
    "orientation": "RAS",
    "spacing": None,
    "intensity": None,
    "score_thresh": 0.02,
    "nms_thresh": 0.22,
    "detections_per_img": 300,
    "topk_candidates_per_level": 1000,
    "infer_patch_size": None,
    "sw_overlap": 0.25,
}


def _config_error(source, message: str) -> ModelError:
    return ModelError(f"{source}: {message}")


def load_retinanet_config(path: PathLike) -> Dict[str, Any]:
    """Read and validate a RetinaNet detector configuration (plain JSON, see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: detector configuration not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read the detector configuration: {exc}") from None
    return check_retinanet_config(raw, path)


def _int_list(value, length: Optional[int], key: str, source) -> List[int]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and length is not None:
        value = [value] * length
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        raise _config_error(source, f"{key!r} must be a list of {length or 'some'} integers, got {value!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) == int(v) for v in value):
        raise _config_error(source, f"{key!r} must hold integers, got {value!r}")
    return [int(v) for v in value]


def _positive_list(value, length: int, key: str, source) -> List[float]:
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise _config_error(source, f"{key!r} must be a list of {length} numbers, got {value!r}")
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        raise _config_error(source, f"{key!r} must hold numbers, got {value!r}") from None
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise _config_error(source, f"{key!r} must hold positive numbers, got {value!r}")
    return out


def _config_labels(raw, source) -> Dict[int, str]:
    labels = raw.get("labels")
    if labels is None:
        raise _config_error(source, "missing 'labels' (class index -> name, e.g. {\"0\": \"nodule\"})")
    if isinstance(labels, list):
        labels = dict(enumerate(labels))
    if not isinstance(labels, Mapping) or not labels:
        raise _config_error(source, f"'labels' must be a non-empty object or list, got {labels!r}")
    out = {}
    for key, name in labels.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise _config_error(source, f"'labels' key {key!r} is not a class index") from None
        if not isinstance(name, str) or not name.strip():
            raise _config_error(source, f"'labels' entry {key!r} has an empty or non-string name {name!r}")
        out[index] = name.strip()
    return out


def check_retinanet_config(raw: Mapping[str, Any], source: Any = "detector configuration") -> Dict[str, Any]:
    """Fill defaults into a RetinaNet configuration and validate it; raises :class:`ModelError`."""
    if not isinstance(raw, Mapping):
        raise _config_error(source, "the configuration must be a JSON object")
    unknown = sorted(set(raw) - set(_DEFAULT_CONFIG) - {"labels", "num_classes", "conv1_t_stride"})
    if unknown:
        log.warning("%s: ignoring unknown configuration key(s) %s", source, ", ".join(unknown))
    cfg = {k: raw.get(k, v) for k, v in _DEFAULT_CONFIG.items()}
    cfg["backbone"] = {**_DEFAULT_CONFIG["backbone"], **dict(raw.get("backbone") or {})}
    if "conv1_t_stride" in raw and "conv1_t_stride" not in (raw.get("backbone") or {}):
        cfg["backbone"]["conv1_t_stride"] = raw["conv1_t_stride"]
    labels = _config_labels(raw, source)
    num_classes = int(raw.get("num_classes", len(labels)))
    if sorted(labels) != list(range(num_classes)):
        raise _config_error(source, f"'labels' must name every class 0..{num_classes - 1}, got indices "
                                    f"{sorted(labels)}")
    cfg["labels"], cfg["num_classes"] = labels, num_classes
    if cfg["spatial_dims"] != 3:
        raise _config_error(source, f"only 3D detectors are supported, got spatial_dims {cfg['spatial_dims']!r}")
    if cfg["n_input_channels"] != 1:
        raise _config_error(source, f"only single-channel images are supported, got n_input_channels "
                                    f"{cfg['n_input_channels']!r}")
    bb = cfg["backbone"]
    if bb["block"] not in ("basic", "bottleneck"):
        raise _config_error(source, f"backbone 'block' must be 'basic' or 'bottleneck', got {bb['block']!r}")
    bb["layers"] = _int_list(bb["layers"], 4, "backbone.layers", source)
    bb["block_inplanes"] = _int_list(bb["block_inplanes"], 4, "backbone.block_inplanes", source)
    bb["conv1_t_size"] = _int_list(bb["conv1_t_size"], 3, "backbone.conv1_t_size", source)
    bb["conv1_t_stride"] = _int_list(bb["conv1_t_stride"], 3, "backbone.conv1_t_stride", source)
    layers = _int_list(cfg["returned_layers"], None, "returned_layers", source)
    if not layers or min(layers) < 1 or max(layers) > 4:
        raise _config_error(source, f"'returned_layers' must be in 1..4, got {layers}")
    cfg["returned_layers"] = layers
    shapes = cfg["base_anchor_shapes"]
    if not isinstance(shapes, (list, tuple)) or not shapes:
        raise _config_error(source, f"'base_anchor_shapes' must be a list of [w, h, d], got {shapes!r}")
    cfg["base_anchor_shapes"] = [_positive_list(s, 3, "base_anchor_shapes", source) for s in shapes]
    if cfg["feature_map_scales"] is None:
        cfg["feature_map_scales"] = [2 ** n for n in range(len(layers) + 1)]
    cfg["feature_map_scales"] = _positive_list(cfg["feature_map_scales"], len(layers) + 1,
                                               "feature_map_scales", source)
    if cfg["size_divisible"] is None:
        cfg["size_divisible"] = [2 * s * 2 ** max(layers) for s in bb["conv1_t_stride"]]
    cfg["size_divisible"] = _int_list(cfg["size_divisible"], 3, "size_divisible", source)
    if str(cfg["orientation"]).upper() not in ("RAS", "IJK"):
        raise _config_error(source, f"'orientation' must be 'RAS' or 'IJK', got {cfg['orientation']!r}")
    cfg["orientation"] = str(cfg["orientation"]).upper()
    if cfg["spacing"] is not None:
        cfg["spacing"] = _positive_list(cfg["spacing"], 3, "spacing", source)
    if cfg["infer_patch_size"] is not None:
        cfg["infer_patch_size"] = _int_list(cfg["infer_patch_size"], 3, "infer_patch_size", source)
    cfg["intensity"] = _check_intensity(cfg["intensity"], source)
    for key in ("score_thresh", "nms_thresh", "sw_overlap"):
        if not isinstance(cfg[key], (int, float)) or not 0 <= float(cfg[key]) <= 1:
            raise _config_error(source, f"{key!r} must be a number in 0..1, got {cfg[key]!r}")
    for key in ("detections_per_img", "topk_candidates_per_level"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise _config_error(source, f"{key!r} must be a positive integer, got {cfg[key]!r}")
    return cfg


def _check_intensity(value, source) -> Optional[Dict[str, Any]]:
    if value is None:
        return None
    if not isinstance(value, Mapping) or "a_min" not in value or "a_max" not in value:
        raise _config_error(source, f"'intensity' must be null or hold a_min and a_max, got {value!r}")
    out = {"a_min": value["a_min"], "a_max": value["a_max"], "b_min": value.get("b_min", 0.0),
           "b_max": value.get("b_max", 1.0)}
    try:
        out = {k: float(v) for k, v in out.items()}
    except (TypeError, ValueError):
        raise _config_error(source, f"'intensity' values must be numbers, got {value!r}") from None
    if not all(math.isfinite(v) for v in out.values()) or out["a_max"] <= out["a_min"]:
        raise _config_error(source, f"'intensity' needs finite values with a_max > a_min, got {value!r}")
    out["clip"] = bool(value.get("clip", True))
    return out


@dataclass(frozen=True)
class ModelFrame:
    """The model's array frame: the volume's IJK axes permuted/flipped to RAS and resampled.

    Model axis ``m`` (x, y, z of the network input) is IJK axis ``perm[m]``, reversed when
    ``flip[m]``; it has ``size[m]`` voxels, resampled from ``n_ijk[perm[m]]`` with
    ``torch.nn.functional.interpolate(align_corners=False)``, so in voxel *edge* coordinates a model
    position ``e`` is ``e * n / size`` voxels along the (possibly reversed) IJK axis.
    """

    perm: Tuple[int, int, int]
    flip: Tuple[bool, bool, bool]
    size: Tuple[int, int, int]
    n_ijk: Tuple[int, int, int]

    @classmethod
    def build(cls, shape_kji: Sequence[int], ijk_to_ras, orientation: str = "RAS",
              spacing_mm: Optional[Sequence[float]] = None) -> "ModelFrame":
        """Frame for a volume; ``orientation`` "RAS" (like MONAI's Orientationd) or "IJK" (as stored)."""
        matrix = _checked_matrix(ijk_to_ras)
        n_ijk = tuple(int(s) for s in shape_kji[::-1])
        if orientation == "RAS":
            direction = matrix[:3, :3] / geometry.spacing(matrix)
            perm = max(itertools.permutations(range(3)),
                       key=lambda p: sum(abs(direction[m, p[m]]) for m in range(3)))
            flip = tuple(bool(direction[m, perm[m]] < 0) for m in range(3))
        else:
            perm, flip = (0, 1, 2), (False, False, False)
        vox = geometry.spacing(matrix)
        size = []
        for m in range(3):
            n = n_ijk[perm[m]]
            if spacing_mm is None:
                size.append(n)
            else:
                size.append(max(1, int(round(n * vox[perm[m]] / float(spacing_mm[m])))))
        return cls(tuple(int(p) for p in perm), flip, tuple(size), n_ijk)

    def to_model(self, array_kji: np.ndarray) -> np.ndarray:
        """The volume as a float32 ``[x, y, z]`` array in the model frame (trilinear resampling)."""
        import torch
        import torch.nn.functional as F

        arr = np.asarray(array_kji, dtype=np.float32).transpose(2, 1, 0).transpose(self.perm)
        flips = [m for m in range(3) if self.flip[m]]
        if flips:
            arr = np.flip(arr, axis=flips)
        arr = np.ascontiguousarray(arr)
        if tuple(arr.shape) != self.size:
            t = torch.from_numpy(arr)[None, None]
            arr = F.interpolate(t, size=self.size, mode="trilinear", align_corners=False)[0, 0].numpy()
        return arr

    def box_to_ijk(self, box_model) -> BoxIJK:
        """A model-frame box ``(x0, y0, z0, x1, y1, z1)`` (voxel edges) -> inclusive IJK box."""
        b = np.asarray(box_model, dtype=np.float64).reshape(2, 3)
        lo_ijk, hi_ijk = np.zeros(3), np.zeros(3)
        for m in range(3):
            c = self.perm[m]
            n = self.n_ijk[c]
            scale = n / self.size[m]
            e0, e1 = sorted((b[0, m] * scale, b[1, m] * scale))
            if self.flip[m]:
                e0, e1 = n - e1, n - e0
            lo_ijk[c], hi_ijk[c] = e0 - 0.5, e1 - 0.5  # edges -> voxel-centre coordinates
        return _voxels_inside(lo_ijk, hi_ijk)


def _scale_intensity(arr: np.ndarray, intensity: Optional[Mapping[str, Any]]) -> np.ndarray:
    if intensity is None:
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    a0, a1, b0, b1 = (intensity[k] for k in ("a_min", "a_max", "b_min", "b_max"))
    out = (arr - a0) / (a1 - a0) * (b1 - b0) + b0
    if intensity["clip"]:
        out = np.clip(out, min(b0, b1), max(b0, b1))
    return out.astype(np.float32)


def build_retinanet(cfg: Mapping[str, Any], network=None):
    """A MONAI ``RetinaNetDetector`` for a validated config; ``network`` (e.g. TorchScript) or a new RetinaNet."""
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.apps.detection.networks.retinanet_network import RetinaNet, resnet_fpn_feature_extractor
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
    from monai.networks.nets import resnet

    if network is None:
        bb = cfg["backbone"]
        backbone = resnet.ResNet(block=bb["block"], layers=bb["layers"], block_inplanes=bb["block_inplanes"],
                                 spatial_dims=3, n_input_channels=cfg["n_input_channels"],
                                 conv1_t_size=bb["conv1_t_size"], conv1_t_stride=bb["conv1_t_stride"])
        extractor = resnet_fpn_feature_extractor(backbone, 3, False, cfg["returned_layers"], None)
        network = RetinaNet(spatial_dims=3, num_classes=cfg["num_classes"],
                            num_anchors=len(cfg["base_anchor_shapes"]), feature_extractor=extractor,
                            size_divisible=cfg["size_divisible"])
    anchors = AnchorGeneratorWithAnchorShape(feature_map_scales=cfg["feature_map_scales"],
                                             base_anchor_shapes=cfg["base_anchor_shapes"])
    detector = RetinaNetDetector(network, anchors, spatial_dims=3, num_classes=cfg["num_classes"],
                                 size_divisible=cfg["size_divisible"])
    detector.set_box_selector_parameters(score_thresh=float(cfg["score_thresh"]),
                                         topk_candidates_per_level=cfg["topk_candidates_per_level"],
                                         nms_thresh=float(cfg["nms_thresh"]),
                                         detections_per_img=cfg["detections_per_img"])
    if cfg["infer_patch_size"] is not None:
        detector.set_sliding_window_inferer(roi_size=cfg["infer_patch_size"], sw_batch_size=1,
                                            overlap=float(cfg["sw_overlap"]), mode="constant")
    return detector


def _state_dict(obj, path: Path) -> Dict[str, Any]:
    """The network state dict inside a checkpoint (plain, or under 'model'/'state_dict'/'network')."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "network"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ModelError(f"{path}: not a state dict of a RetinaNet network")
    keys = list(obj)
    if all(k.startswith("network.") for k in keys):
        obj = {k[len("network."):]: v for k, v in obj.items()}
    return dict(obj)


def _sidecar_config(path: Path) -> Path:
    for candidate in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if candidate.is_file():
            return candidate
    raise ModelError(f"{path}: no configuration found next to the TorchScript file "
                     f"(expected {path.name}.json or {path.with_suffix('.json').name})")


class MonaiRetinaNetDetector:
    """A MONAI RetinaNet detector from a local bundle folder or a TorchScript file.

    See the module docstring for the files and the configuration. The model is loaded when the
    detector is made (a missing or mismatching file raises :class:`ModelError`). ``detect``
    reorients/resamples/scales the volume as configured, runs the network on ``device`` and maps
    the boxes back to voxel indices; class indices are named by the configuration's ``labels``.
    """

    def __init__(self, path: PathLike, device: str = "cpu"):
        import torch

        self.path = Path(path)
        self.device = torch.device(device)
        if self.path.is_dir():
            config_path = self.path / "configs" / "detector.json"
            weights = self.path / "models" / "model.pt"
            script = self.path / "models" / "model.ts"
            self.config = load_retinanet_config(config_path)
            if weights.is_file():
                network = self._load_state_dict(weights)
            elif script.is_file():
                network = self._load_script(script)
            else:
                raise ModelError(f"{self.path}: bundle has neither models/model.pt nor models/model.ts")
        elif self.path.is_file():
            self.config = load_retinanet_config(_sidecar_config(self.path))
            network = self._load_script(self.path)
        else:
            raise ModelError(f"{self.path}: no such bundle folder or TorchScript file")
        self._detector = build_retinanet(self.config, network).to(self.device).eval()
        self.labels: Tuple[str, ...] = tuple(self.config["labels"][n] for n in range(self.config["num_classes"]))

    def _load_state_dict(self, weights: Path):
        import torch

        try:
            obj = torch.load(weights, map_location=self.device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad checkpoint
            raise ModelError(f"{weights}: cannot load the checkpoint: {exc}") from None
        detector = build_retinanet(self.config)
        try:
            missing, unexpected = detector.network.load_state_dict(_state_dict(obj, weights), strict=False)
        except RuntimeError as exc:  # tensor shape mismatches
            raise ModelError(f"{weights}: does not match the configured network: {exc}") from None
        if missing or unexpected:
            raise ModelError(f"{weights}: does not match the configured network "
                             f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                             f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
        return detector.network

    def _load_script(self, script: Path):
        import torch

        try:
            return torch.jit.load(str(script), map_location=self.device)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive
            raise ModelError(f"{script}: not a loadable TorchScript file: {exc}") from None

    def detect(self, array_kji: np.ndarray, ijk_to_ras) -> List[Detection]:
        """Detections (score, class name, IJK box) of the network on the volume."""
        import torch

        arr = np.asarray(array_kji)
        if arr.ndim != 3:
            raise InputError(f"the image must be a 3D [k, j, i] array, got shape {arr.shape}")
        frame = ModelFrame.build(arr.shape, ijk_to_ras, self.config["orientation"], self.config["spacing"])
        model_xyz = _scale_intensity(frame.to_model(arr), self.config["intensity"])
        image = torch.from_numpy(np.ascontiguousarray(model_xyz, dtype=np.float32))[None].to(self.device)
        use_inferer = self.config["infer_patch_size"] is not None
        with torch.no_grad():
            result = self._detector([image], use_inferer=use_inferer)[0]
        boxes = result[self._detector.target_box_key].detach().cpu().numpy()
        classes = result[self._detector.target_label_key].detach().cpu().numpy()
        scores = result[self._detector.pred_score_key].detach().float().cpu().numpy()
        out = [Detection(self.labels[int(c)], float(s), box_ijk=frame.box_to_ijk(b))
               for b, c, s in zip(boxes, classes, scores)]
        log.info("%s: %d detection(s) (model frame %s)", self.path, len(out), frame.size)
        return out


# --------------------------------------------------------------------------- chaining

def _clip_box(box: Sequence[float], bounds: Sequence[int]):
    """Clip an inclusive box (lo..., hi...) to ``0..bounds-1``: (clipped box | None if outside, changed)."""
    d = len(bounds)
    lo = [float(v) for v in box[:d]]
    hi = [float(v) for v in box[d:]]
    if any(h < 0 or l > n - 1 for l, h, n in zip(lo, hi, bounds)):
        return None, True
    c_lo = [max(l, 0.0) for l in lo]
    c_hi = [min(h, n - 1.0) for h, n in zip(hi, bounds)]
    return tuple(c_lo + c_hi), (c_lo != lo or c_hi != hi)


def _split_box(box_ijk: BoxIJK, axis: str) -> List[Tuple[int, BoxXY]]:
    """Per-slice 2D boxes of a 3D IJK box along ``axis``."""
    i0, (x0, y0) = geometry.ijk_to_slice(box_ijk[0], axis)
    i1, (x1, y1) = geometry.ijk_to_slice(box_ijk[1], axis)
    box_xy = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    return [(index, box_xy) for index in range(min(i0, i1), max(i0, i1) + 1)]


def _detection_slices(det: Detection, axis: str, shape_kji: Sequence[int]):
    """(slice boxes clipped to the volume, clip status: "" / "clipped" / "outside")."""
    n_slices = geometry.num_slices(shape_kji, axis)
    height, width = geometry.slice_shape(shape_kji, axis)
    own = [(i, b) for a, i, b in det.slice_boxes or () if a == axis]
    if own:
        raw = own
    elif det.box_ijk is not None:
        bounds_ijk = tuple(int(s) for s in shape_kji[::-1])
        clipped, changed = _clip_box(det.box_ijk[0] + det.box_ijk[1], bounds_ijk)
        if clipped is None:
            return [], "outside"
        box = (tuple(int(round(v)) for v in clipped[:3]), tuple(int(round(v)) for v in clipped[3:]))
        return _split_box(box, axis), "clipped" if changed else ""
    else:
        hull = _slice_boxes_hull(det.slice_boxes)
        log.info("detection %r has slice boxes only on %s; using their 3D hull on %s",
                 det.label, ", ".join(det.axes()), axis)
        return _detection_slices(Detection(det.label, det.score, box_ijk=hull), axis, shape_kji)
    out, changed_any = [], False
    for index, box_xy in raw:
        if not 0 <= index < n_slices:
            changed_any = True
            continue
        clipped, changed = _clip_box(box_xy, (width, height))
        changed_any |= changed
        if clipped is not None:
            out.append((index, clipped))
    if not out:
        return [], "outside"
    return out, "clipped" if changed_any else ""


def _slice_boxes_hull(slice_boxes: Sequence[SliceBox]) -> BoxIJK:
    points = []
    for axis, index, (x0, y0, x1, y1) in slice_boxes:
        points.append(geometry.slice_to_ijk(index, (x0, y0), axis))
        points.append(geometry.slice_to_ijk(index, (x1, y1), axis))
    pts = np.array(points)
    return tuple(int(v) for v in pts.min(axis=0)), tuple(int(v) for v in pts.max(axis=0))


def _with_margin(box_xy: Sequence[float], margin: int, width: int, height: int) -> IntBoxXY:
    x0 = max(0, int(math.floor(box_xy[0])) - margin)
    y0 = max(0, int(math.floor(box_xy[1])) - margin)
    x1 = min(width - 1, int(math.ceil(box_xy[2])) + margin)
    y1 = min(height - 1, int(math.ceil(box_xy[3])) + margin)
    return x0, y0, x1, y1


def _extend_slices(items: List[Tuple[int, IntBoxXY]], slice_margin: int, n_slices: int):
    """Copy the end slices' boxes ``slice_margin`` slices outward (within the volume)."""
    if slice_margin <= 0 or not items:
        return items
    first = min(i for i, _ in items)
    last = max(i for i, _ in items)
    extra = []
    for d in range(1, slice_margin + 1):
        extra += [(first - d, b) for i, b in items if i == first and first - d >= 0]
        extra += [(last + d, b) for i, b in items if i == last and last + d < n_slices]
    return items + extra


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two inclusive pixel boxes ``(x0, y0, x1, y1)``."""
    ix = min(a[2], b[2]) - max(a[0], b[0]) + 1
    iy = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return float(inter) / float(area(a) + area(b) - inter)


def merge_boxes(scored: Sequence[Tuple[float, IntBoxXY]], iou: float, mode: str = "nms") -> List[IntBoxXY]:
    """Merge boxes of one label on one slice whose IoU exceeds ``iou``.

    ``nms`` keeps the highest-scoring box of each overlapping group; ``union`` replaces the group by
    its enclosing box (repeated until no two remaining boxes overlap by more than ``iou``).
    """
    if mode not in MERGE_MODES:
        raise InputError(f"unknown merge mode {mode!r}; expected one of {', '.join(MERGE_MODES)}")
    ordered = [b for _, b in sorted(scored, key=lambda sb: -sb[0])]
    kept: List[IntBoxXY] = []
    for box in ordered:
        if mode == "nms":
            if all(box_iou(box, k) <= iou for k in kept):
                kept.append(box)
            continue
        merged = box
        while True:
            hit = next((k for k in kept if box_iou(merged, k) > iou), None)
            if hit is None:
                break
            kept.remove(hit)
            merged = (min(merged[0], hit[0]), min(merged[1], hit[1]), max(merged[2], hit[2]), max(merged[3], hit[3]))
        kept.append(merged)
    return kept


def _check_plan_args(shape_kji, axis, score_threshold, margin_vox, slice_margin, nms_iou, merge):
    shape = tuple(int(s) for s in shape_kji)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"shape_kji must be 3 positive sizes, got {tuple(shape_kji)}")
    try:
        geometry.check_axis(axis)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    for name, value in (("score_threshold", score_threshold), ("nms_iou", nms_iou)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value!r}")
    for name, value in (("margin_vox", margin_vox), ("slice_margin", slice_margin)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise InputError(f"{name} must be a non-negative integer, got {value!r}")
    if merge not in MERGE_MODES:
        raise InputError(f"unknown merge mode {merge!r}; expected one of {', '.join(MERGE_MODES)}")
    return shape


def _empty_report(axis: str, count: int) -> Dict[str, Any]:
    return {"axis": axis, "detections": count, "kept": {}, "below_threshold": [], "clipped": [],
            "outside": [], "merged": {}, "slices": {}}


def detections_to_slice_boxes(detections: Sequence[Detection], shape_kji: Sequence[int], axis: str = "axial",
                              score_threshold: float = 0.5, margin_vox: int = 2, nms_iou: float = 0.5,
                              *, slice_margin: int = 0, merge: str = "nms",
                              report: Optional[Dict[str, Any]] = None) -> Dict[str, List[Tuple[int, IntBoxXY]]]:
    """Plan per-slice box prompts: ``{label: [(slice index, (x0, y0, x1, y1)), ...]}`` sorted by index.

    Per detection (score below ``score_threshold`` dropped): its own slice boxes on ``axis`` if it
    has some, else its 3D box split into one 2D box per slice; boxes are clipped to the volume
    (partly outside: clipped; entirely outside: dropped, both logged and reported); then the
    in-plane ``margin_vox`` is added (within the slice) and the end slices are repeated
    ``slice_margin`` slices outward. Overlapping boxes of one label on one slice (IoU > ``nms_iou``)
    are merged by ``merge`` (``"nms"``: best score wins, ``"union"``: enclosing box); several
    boxes may remain on a slice. Boxes are integer, inclusive, in slice pixel coordinates.

    ``report``, when given, is filled with ``axis``, ``detections`` (count), ``kept`` ({label: n}),
    ``below_threshold``, ``clipped`` and ``outside`` (lists of ``{"label", "score"}``), ``merged``
    ({label: boxes removed by merging}) and ``slices`` ({label: slices with a box}).
    """
    shape = _check_plan_args(shape_kji, axis, score_threshold, margin_vox, slice_margin, nms_iou, merge)
    rep = _empty_report(axis, len(detections))
    n_slices = geometry.num_slices(shape, axis)
    height, width = geometry.slice_shape(shape, axis)
    per_slice: Dict[str, Dict[int, List[Tuple[float, IntBoxXY]]]] = {}
    for det in detections:
        if not isinstance(det, Detection):
            raise InputError(f"expected Detection objects, got {type(det).__name__}")
        entry = {"label": det.label, "score": det.score}
        if det.score < score_threshold:
            rep["below_threshold"].append(entry)
            continue
        slices, status = _detection_slices(det, axis, shape)
        if status == "outside":
            log.warning("detection %r (score %.3g) lies entirely outside the volume; dropped", det.label, det.score)
            rep["outside"].append(entry)
            continue
        if status == "clipped":
            log.warning("detection %r (score %.3g) extends outside the volume; clipped", det.label, det.score)
            rep["clipped"].append(entry)
        items = [(i, _with_margin(b, int(margin_vox), width, height)) for i, b in slices]
        items = _extend_slices(items, int(slice_margin), n_slices)
        target = per_slice.setdefault(det.label, {})
        for index, box in items:
            target.setdefault(index, []).append((det.score, box))
        rep["kept"][det.label] = rep["kept"].get(det.label, 0) + 1
    if rep["below_threshold"]:
        log.info("%d detection(s) below the score threshold %g", len(rep["below_threshold"]), score_threshold)
    out: Dict[str, List[Tuple[int, IntBoxXY]]] = {}
    for label, slices in per_slice.items():
        boxes, removed = [], 0
        for index in sorted(slices):
            merged = merge_boxes(slices[index], float(nms_iou), merge)
            removed += len(slices[index]) - len(merged)
            boxes += [(index, b) for b in sorted(merged)]
        out[label] = boxes
        rep["merged"][label] = removed
        rep["slices"][label] = len(slices)
    if report is not None:
        report.update(rep)
    return out


@dataclass
class ChainResult:
    """Masks of :func:`chain`: ``{label: uint8 mask_kji}`` and a report of what was done."""

    masks: Dict[str, np.ndarray] = field(default_factory=dict)
    report: Dict[str, Any] = field(default_factory=dict)


SegmentLabel = Callable[[str, List[Tuple[int, IntBoxXY]]], np.ndarray]


def _select_labels(detections: List[Detection], known: Optional[Tuple[str, ...]],
                   wanted: Optional[Sequence[str]], name: str) -> List[Detection]:
    if known is not None:
        stray = sorted({d.label for d in detections} - set(known))
        if stray:
            raise InputError(f"detector {name} returned label(s) {', '.join(map(repr, stray))} that are not "
                             f"in its label map ({', '.join(known) or 'empty'})")
    if wanted is None:
        return detections
    return [d for d in detections if d.label in set(wanted)]


def _check_wanted(wanted: Optional[Sequence[str]], known: Optional[Tuple[str, ...]], name: str):
    if wanted is None:
        return None
    if isinstance(wanted, str):
        wanted = [wanted]
    wanted = [_check_label(w) for w in wanted]
    if known is not None:
        unknown = [w for w in wanted if w not in known]
        if unknown:
            shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
            raise InputError(f"unknown label(s) {', '.join(map(repr, unknown))} for detector {name}; "
                             f"it knows: {shown or 'nothing'}")
    return wanted


def chain(detector: Detector, array_kji: np.ndarray, ijk_to_ras, segment_label: SegmentLabel, *,
          axis: str = "axial", labels: Optional[Sequence[str]] = None, score_threshold: float = 0.5,
          margin_vox: int = 2, nms_iou: float = 0.5, slice_margin: int = 0, merge: str = "nms",
          progress: Optional[Callable[[float, str], None]] = None,
          should_stop: Optional[Callable[[], bool]] = None) -> ChainResult:
    """Detect, plan per-slice boxes, and segment each label with ``segment_label``.

    ``segment_label(label, [(index, box_xy), ...])`` gets the boxes of one label on ``axis`` (bind
    the axis and the model into it, e.g. with ``functools.partial``) and returns a mask the shape of
    ``array_kji`` (non-zero = inside). ``labels`` restricts the run to these names (a name the
    detector's ``labels`` does not know raises :class:`InputError`). ``progress(fraction, message)``
    is called as labels complete; ``should_stop()`` returning True raises :class:`Cancelled`
    between labels. A detector that finds nothing gives an empty result (logged), not an error.
    The report is that of :func:`detections_to_slice_boxes` plus ``detector``, ``not_found`` and
    ``voxels`` ({label: mask voxels}).
    """
    arr = np.asarray(array_kji)
    if arr.ndim != 3:
        raise InputError(f"the image must be a 3D [k, j, i] array, got shape {arr.shape}")
    matrix = _checked_matrix(ijk_to_ras)
    name = type(detector).__name__
    known = detector_labels(detector)
    wanted = _check_wanted(labels, known, name)
    _check_plan_args(arr.shape, axis, score_threshold, margin_vox, slice_margin, nms_iou, merge)
    if progress:
        progress(0.0, f"detecting with {name}")
    detections = list(detector.detect(arr, matrix))
    detections = _select_labels(detections, known, wanted, name)
    report: Dict[str, Any] = {}
    plan = detections_to_slice_boxes(detections, arr.shape, axis, score_threshold, margin_vox, nms_iou,
                                     slice_margin=slice_margin, merge=merge, report=report)
    report["detector"] = name
    report["not_found"] = [w for w in (wanted or []) if w not in plan]
    report["voxels"] = {}
    if not plan:
        log.warning("detector %s found nothing to segment (%d detection(s), %d below score threshold %g, "
                    "%d outside the volume)", name, len(detections), len(report["below_threshold"]),
                    score_threshold, len(report["outside"]))
        if progress:
            progress(1.0, "nothing detected")
        return ChainResult({}, report)
    for label in report["not_found"]:
        log.warning("label %r was not detected", label)
    masks: Dict[str, np.ndarray] = {}
    for n, (label, boxes) in enumerate(plan.items()):
        if should_stop is not None and should_stop():
            raise Cancelled(f"detector chain stopped before label {label!r} ({n} of {len(plan)} done)")
        if progress:
            progress(n / len(plan), f"segmenting {label} ({len(boxes)} box(es))")
        mask = np.asarray(segment_label(label, boxes))
        if mask.shape != arr.shape:
            raise MedFMError(f"segment_label returned a mask of shape {mask.shape} for {label!r}; "
                             f"expected the image shape {arr.shape}")
        masks[label] = (mask != 0).astype(np.uint8)
        report["voxels"][label] = int(masks[label].sum())
    if progress:
        progress(1.0, f"segmented {len(masks)} label(s)")
    return ChainResult(masks, report)


# --------------------------------------------------------------------------- spec factory

_SPEC_OPTION = re.compile(r"^(per-component|fully-connected|min-voxels=\d+|device=[\w:]+)$")


def _split_spec_options(rest: str) -> Tuple[str, List[str]]:
    """``PATH:opt1:opt2`` -> (PATH, [opt1, opt2]), options recognised from the right."""
    options = []
    while ":" in rest:
        head, tail = rest.rsplit(":", 1)
        if not _SPEC_OPTION.match(tail):
            break
        options.insert(0, tail)
        rest = head
    return rest, options


def detector_from_spec(spec: str) -> Detector:
    """Make a detector from a CLI spec (see :data:`DETECTOR_SPEC_HELP`); bad specs raise InputError."""
    if not isinstance(spec, str) or ":" not in spec:
        raise InputError(f"detector spec {spec!r} must be KIND:PATH[:options]\n{DETECTOR_SPEC_HELP}")
    kind, rest = spec.split(":", 1)
    kind = kind.strip().lower()
    path, options = _split_spec_options(rest)
    if not path:
        raise InputError(f"detector spec {spec!r} has no path")
    allowed = {"labelmap": ("per-component", "fully-connected", "min-voxels"), "boxes": (),
               "monai": ("device",)}
    if kind not in allowed:
        raise InputError(f"unknown detector kind {kind!r} in {spec!r}; expected one of "
                         f"{', '.join(allowed)}\n{DETECTOR_SPEC_HELP}")
    opts: Dict[str, str] = {}
    for opt in options:
        key, _, value = opt.partition("=")
        if key not in allowed[kind]:
            raise InputError(f"option {opt!r} does not apply to a {kind} detector (spec {spec!r})")
        opts[key] = value
    if kind == "boxes":
        return BoxFileDetector(path)
    if kind == "monai":
        return MonaiRetinaNetDetector(path, device=opts.get("device") or "cpu")
    if not Path(path).exists():
        raise InputError(f"{path}: labelmap file not found (spec {spec!r})")
    return LabelmapDetector(path, per_component="per-component" in opts,
                            min_voxels=int(opts.get("min-voxels") or 10),
                            fully_connected="fully-connected" in opts)
