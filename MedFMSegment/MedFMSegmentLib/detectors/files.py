"""Boxes read from a CSV or JSON file (:class:`BoxFileDetector`, spec ``boxes:PATH``).

Box file formats
  CSV, with a header row; columns ``label,x0,y0,z0,x1,y1,z1`` are required, ``score`` (default 1)
  and ``space`` (``RAS`` default, ``LPS`` or ``IJK``) are optional::

      label,score,space,x0,y0,z0,x1,y1,z1
      Thalamus_L,0.93,RAS,-20.5,-30,-2,-3,-5,18

  JSON, a list (or ``{"boxes": [...]}``) of objects, either a 3D box::

      {"label": "Thalamus_L", "score": 0.93, "space": "RAS", "corners": [[x0, y0, z0], [x1, y1, z1]]}

  or a 2D box on one slice, in that slice's pixel coordinates (IJK)::

      {"label": "Thalamus_L", "score": 0.9, "axis": "axial", "index": 72, "box_xy": [x0, y0, x1, y1]}
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Tuple

import numpy as np

from ..errors import InputError
from .base import (Detection, DetectorKind, PathLike, SliceBox, _check_label, _check_score, _check_slice_boxes,
                   _checked_matrix, _finite, box_ras_to_ijk)

log = logging.getLogger(__name__)

SPACES = ("RAS", "LPS", "IJK")


def _lps_to_ras_point(p: np.ndarray) -> np.ndarray:
    return np.array([-p[0], -p[1], p[2]], dtype=np.float64)


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


KIND = DetectorKind("boxes", lambda path, options, spec: BoxFileDetector(path), help="""\
  boxes:PATH
      boxes from a CSV or JSON file (RAS, LPS or IJK), see MedFMSegmentLib.detectors.""")
