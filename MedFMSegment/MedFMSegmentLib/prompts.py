"""The prompts file: what to segment and where, shared by batch mode, the scripting API and Slicer.

A prompts file is JSON::

    {
      "space": "RAS",
      "segments": [
        {
          "name": "Thalamus_L",
          "roi": [[-20, -30, -5], [-2, -4, 18]],
          "roi_axis": "axial",
          "boxes": [{"corners": [[-20, -30, 6], [-2, -4, 6]], "axis": "axial"}],
          "points": [{"position": [-11, -18, 6], "positive": true, "axis": "axial"}],
          "adapter": "adapters/thalamus",
          "propagate": true
        }
      ]
    }

Top level
  ``space`` (required): ``"RAS"`` (millimetres in Slicer's patient RAS frame, as shown in Slicer)
  or ``"IJK"`` (voxel indices ``(i, j, k)`` of the input volume, 0-based, may be fractional).
  ITK/DICOM LPS coordinates are not accepted: negate x and y to get RAS.
  ``segments`` (required): a non-empty list of segments.

Segment
  ``name`` (required): a non-empty string without control characters, unique in the file.
  At least one prompt is required: ``roi``, ``boxes`` or ``points``.

  ``roi``: a 3D box ``[[x0, y0, z0], [x1, y1, z1]]`` (two opposite corners, any order); every
  ``roi_axis`` slice inside it is segmented. It is converted to inclusive voxel bounds (voxels it
  touches by more than half a voxel). A ROI partly outside the volume is clipped with a warning;
  entirely outside it is an error. Zero extent across the slices is an error (zero extent along
  ``roi_axis`` is allowed: a single slice).
  ``roi_axis``: the axis the ROI is sliced along (default ``"axial"``); only with ``roi``.

  ``boxes``: 2D boxes ``{"corners": [[x, y, z], [x, y, z]], "axis": "axial"}``, each on one slice:
  both corners must lie on the same ``axis`` slice (within 0.5 voxel); the box needs a non-zero
  width and height on that slice. A box partly outside the slice is clipped with a warning.
  ``points``: ``{"position": [x, y, z], "positive": true, "axis": "axial"}``; ``positive``
  (default true) marks foreground, false background. The position must be inside the volume.
  ``axis`` (boxes and points, default ``"axial"``) is ``"axial"`` (k), ``"coronal"`` (j) or
  ``"sagittal"`` (i): slicing directions of the volume's voxel grid, also in RAS space.

  ``adapter``: optional path to a per-segment adapter folder; in a file read by
  :func:`load_prompts` a relative path is relative to the prompts file's folder.
  ``propagate`` (default true): carry the 2D prompts (boxes, points) through the volume;
  false segments only the prompted slices.
  ``corrections``: user-corrected slices read from a labelmap, ``{"labelmap": "corr.nii.gz",
  "value": 1, "axis": "axial", "slices": [12, 17, 25]}``: each listed slice of ``labelmap == value``
  is kept exactly and seeds the propagation (see :mod:`MedFMSegmentLib.corrections`); a relative
  ``labelmap`` path is relative to the prompts file, like ``adapter``. Corrections alone are a prompt.

Validation
  Any error (malformed JSON with its line and column, unknown key, missing or wrong-typed value,
  wrong length, NaN/Infinity, unknown space or axis, duplicate name, a segment without prompt,
  a degenerate box, corners on different slices, a prompt outside the volume) raises
  :class:`~MedFMSegmentLib.errors.InputError` whose message names the file and the key path, e.g.
  ``prompts.json: segments[1].boxes[0].corners: ...``; all problems found are listed together.
  Unknown keys are errors (a typo must not silently drop a prompt), except keys starting with
  ``_``, which are ignored and can hold comments. A segment whose only prompts are negative
  (background) clicks is an error: there is nothing to segment (the key path is named). Files over
  :data:`MAX_PROMPTS_BYTES`, more than :data:`MAX_PROMPTS` boxes + points or :data:`MAX_SEGMENTS`
  segments, integers over :data:`MAX_DIGITS` digits and JSON nested too deeply are refused at once.

Python API
  :func:`parse_prompts` / :func:`load_prompts` validate and normalise the file (a plain dict with
  all defaults filled in, coordinates still in the file's space); :func:`resolve` converts it
  into the voxel frame of one volume (:class:`PromptSet`); :func:`to_dict` /
  :func:`dump_prompts` write a :class:`PromptSet` back, in IJK or RAS.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import corrections as corrections_mod
from . import geometry
from .corrections import Corrections
from .errors import InputError
from .prompts_json import (  # noqa: F401  (the JSON layer; re-exported)
    MAX_DIGITS,
    MAX_PROMPTS,
    MAX_PROMPTS_BYTES,
    MAX_SEGMENTS,
    _MAX_LISTED_ERRORS,
    _Problems,
    _DuplicateKey,
    _no_duplicates,
    _BadInteger,
    _parse_int,
    _loads,
    _type_name,
    _check_keys,
    _object,
    _number,
    _vector3,
    _corners,
    _axis,
    _boolean,
    _list,
    _name)

log = logging.getLogger(__name__)

SPACES: Tuple[str, ...] = ("RAS", "IJK")
DEFAULT_AXIS = "axial"
SLICE_TOLERANCE = 0.5  # voxels: how far apart the two corners of a 2D box may be across its slice
_EPS = 1e-6
#: Limits that refuse a hostile or broken prompts file in well under a second (a real one is a few kB).

_TOP_KEYS = ("space", "segments")
_SEGMENT_KEYS = ("name", "roi", "roi_axis", "boxes", "points", "adapter", "propagate", "corrections")
_BOX_KEYS = ("corners", "axis")
_POINT_KEYS = ("position", "positive", "axis")
_IJK = "ijk"


# --------------------------------------------------------------------------- data classes

@dataclass(frozen=True)
class Box2D:
    """A box on one slice: inclusive ``box_xy = (x0, y0, x1, y1)`` in slice coordinates."""
    axis: str
    index: int
    box_xy: Tuple[float, float, float, float]


@dataclass(frozen=True)
class Point:
    """A click on one slice at ``xy_slice = (x, y)``; ``positive`` False marks background."""
    axis: str
    index: int
    xy_slice: Tuple[float, float]
    positive: bool = True


RoiIJK = Tuple[Tuple[int, int, int], Tuple[int, int, int]]


@dataclass
class SegmentPrompts:
    """The prompts of one segment in the voxel frame of a volume.

    ``roi_ijk`` is inclusive voxel bounds ``((i0, j0, k0), (i1, j1, k1))`` inside the volume, or None.
    """
    name: str
    roi_ijk: Optional[RoiIJK] = None
    boxes: List[Box2D] = field(default_factory=list)
    points: List[Point] = field(default_factory=list)
    propagate: bool = True
    adapter: Optional[str] = None
    roi_axis: str = DEFAULT_AXIS
    corrections: Optional[Corrections] = None  # corrected slices (pinned), read from a labelmap


@dataclass
class PromptSet:
    """All segments of a prompts file, resolved to one volume."""
    segments: List[SegmentPrompts] = field(default_factory=list)

    def names(self) -> List[str]:
        return [s.name for s in self.segments]

    def get(self, name: str) -> SegmentPrompts:
        for segment in self.segments:
            if segment.name == name:
                return segment
        raise KeyError(name)


def _parse_box(value: Any, where: str, problems: _Problems) -> Optional[dict]:
    box = _object(value, where, problems)
    if box is None:
        return None
    _check_keys(box, _BOX_KEYS, where, problems)
    if "corners" not in box:
        problems.add(f"{where}.corners", "missing (two opposite corners [[x, y, z], [x, y, z]])")
        return None
    corners = _corners(box["corners"], f"{where}.corners", problems)
    axis = _axis(box.get("axis", DEFAULT_AXIS), f"{where}.axis", problems)
    return {"corners": corners, "axis": axis}


def _parse_point(value: Any, where: str, problems: _Problems) -> Optional[dict]:
    point = _object(value, where, problems)
    if point is None:
        return None
    _check_keys(point, _POINT_KEYS, where, problems)
    if "position" not in point:
        problems.add(f"{where}.position", "missing ([x, y, z])")
        return None
    position = _vector3(point["position"], f"{where}.position", problems)
    positive = _boolean(point.get("positive", True), f"{where}.positive", problems)
    axis = _axis(point.get("axis", DEFAULT_AXIS), f"{where}.axis", problems)
    return {"position": position, "positive": positive, "axis": axis}


def _parse_segment(value: Any, where: str, problems: _Problems) -> Optional[dict]:
    seg = _object(value, where, problems)
    if seg is None:
        return None
    _check_keys(seg, _SEGMENT_KEYS, where, problems)
    name = _name(seg["name"], f"{where}.name", problems) if "name" in seg else None
    if "name" not in seg:
        problems.add(f"{where}.name", "missing (every segment needs a name)")
    roi = _corners(seg["roi"], f"{where}.roi", problems) if seg.get("roi") is not None else None
    roi_axis = _axis(seg.get("roi_axis", DEFAULT_AXIS), f"{where}.roi_axis", problems)
    if "roi_axis" in seg and "roi" not in seg:
        problems.add(f"{where}.roi_axis", "given without a roi")
    boxes = [_parse_box(b, f"{where}.boxes[{n}]", problems)
             for n, b in enumerate(_list(seg.get("boxes", []), f"{where}.boxes", problems))]
    points = [_parse_point(p, f"{where}.points[{n}]", problems)
              for n, p in enumerate(_list(seg.get("points", []), f"{where}.points", problems))]
    adapter = seg.get("adapter")
    if adapter is not None and (not isinstance(adapter, str) or not adapter.strip()):
        problems.add(f"{where}.adapter", f"expected a path string or null, got {_type_name(adapter)} {adapter!r}")
    propagate = _boolean(seg.get("propagate", True), f"{where}.propagate", problems)
    corrections = (corrections_mod.parse_corrections(seg["corrections"], f"{where}.corrections", problems)
                   if seg.get("corrections") is not None else None)
    label = f" {name!r}" if name else ""
    if seg.get("roi") is None and not seg.get("boxes") and not seg.get("points") and seg.get("corrections") is None:
        problems.add(where, f"segment{label} has no prompt: give a roi, boxes, points or corrections")
    elif seg.get("roi") is None and not boxes and points and seg.get("corrections") is None \
            and all(p and p["positive"] is False for p in points):
        problems.add(f"{where}.points", f"segment{label} has only negative (background) clicks: they say "
                     f"where the structure is not, so nothing would be segmented; add a box, a roi or a "
                     f"positive click")
    return {"name": name, "roi": roi, "roi_axis": roi_axis, "boxes": boxes, "points": points,
            "adapter": adapter, "propagate": propagate, "corrections": corrections}


def parse_prompts(text_or_dict: Union[str, bytes, dict], source: str = "<string>") -> dict:
    """Validate a prompts file given as JSON text or an already parsed dict.

    Returns a normalised copy: ``{"space", "segments": [{"name", "roi" (or None), "roi_axis",
    "boxes": [{"corners", "axis"}], "points": [{"position", "positive", "axis"}], "adapter"
    (or None), "propagate", "corrections" (or None)}]}`` with every default filled in and every coordinate a float, still
    in the file's ``space``. Raises :class:`InputError` naming ``source`` and each bad key path.
    """
    if isinstance(text_or_dict, str) and text_or_dict.strip().lower().endswith(".json") \
            and not text_or_dict.lstrip().startswith("{"):
        raise InputError(f"{text_or_dict.strip()}: prompts file not found")  # a path, not JSON text
    data = _loads(text_or_dict, source) if isinstance(text_or_dict, (str, bytes)) else text_or_dict
    if not isinstance(data, dict):
        raise InputError(f"{source}: the prompts must be a JSON object {{\"space\": ..., \"segments\": [...]}}, "
                         f"got {_type_name(data)}")
    top = data
    problems = _Problems(source)
    _check_keys(top, _TOP_KEYS, "", problems)
    space = top.get("space")
    if "space" not in top:
        problems.add("space", f"missing (one of {', '.join(SPACES)})")
    elif space not in SPACES:
        hint = " (LPS is not accepted: negate x and y to get RAS)" if space == "LPS" else ""
        problems.add("space", f"unknown space {space!r}: expected one of {', '.join(SPACES)}{hint}")
    if "segments" not in top:
        problems.add("segments", "missing (a list of segments)")
    raw_segments = _list(top.get("segments", []), "segments", problems)
    _check_counts(raw_segments, source)
    if "segments" in top and isinstance(top.get("segments"), list) and not raw_segments:
        problems.add("segments", "is empty: give at least one segment")
    segments = [_parse_segment(s, f"segments[{n}]", problems) for n, s in enumerate(raw_segments)]
    _check_unique_names(segments, problems)
    problems.raise_if_any()
    return {"space": space, "segments": copy.deepcopy(segments)}


def _check_counts(raw_segments: List[Any], source: str) -> None:
    """Refuse absurd sizes before validating item by item (1M boxes would take minutes to list)."""
    if len(raw_segments) > MAX_SEGMENTS:
        raise InputError(f"{source}: segments: {len(raw_segments)} segments is more than the limit of {MAX_SEGMENTS}")
    total = 0
    for seg in raw_segments:
        if isinstance(seg, dict):
            total += sum(len(seg[key]) for key in ("boxes", "points") if isinstance(seg.get(key), list))
    if total > MAX_PROMPTS:
        raise InputError(f"{source}: segments: {total} boxes and points in all is more than the limit of "
                         f"{MAX_PROMPTS}")
    corrected = sum(len(seg["corrections"]["slices"]) for seg in raw_segments if isinstance(seg, dict)
                    and isinstance(seg.get("corrections"), dict) and isinstance(seg["corrections"].get("slices"), list))
    if corrected > corrections_mod.MAX_CORRECTED_SLICES:  # each one is a slice-sized mask in memory
        raise InputError(f"{source}: segments: {corrected} corrected slices in all is more than the limit of "
                         f"{corrections_mod.MAX_CORRECTED_SLICES}")


def _check_unique_names(segments: Sequence[Optional[dict]], problems: _Problems) -> None:
    first: Dict[str, int] = {}
    for n, seg in enumerate(segments):
        name = seg and seg.get("name")
        if not name:
            continue
        if name in first:
            problems.add(f"segments[{n}].name", f"duplicate name {name!r} (also segments[{first[name]}])")
        else:
            first[name] = n


def load_prompts(path: Union[str, os.PathLike]) -> dict:
    """Read and validate a prompts JSON file (see :func:`parse_prompts`).

    Relative ``adapter`` and corrections ``labelmap`` paths are made relative to the prompts file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: prompts file not found" if not path.exists()
                         else f"{path}: is not a file")
    try:
        size = path.stat().st_size
        if size > MAX_PROMPTS_BYTES:  # refused before reading it
            raise InputError(f"{path}: {size} bytes of prompts is more than the limit of {MAX_PROMPTS_BYTES} "
                             f"(a prompts file is normally a few kB)")
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the prompts file ({exc.strerror})") from exc
    raw = parse_prompts(data, source=str(path))
    for seg in raw["segments"]:
        adapter = seg["adapter"]
        if adapter is not None and not Path(adapter).expanduser().is_absolute():
            seg["adapter"] = str(path.parent / adapter)
        corrections_mod.resolve_path(seg["corrections"], path.parent)
    return raw


# --------------------------------------------------------------------------- resolution

class _Volume:
    """The volume a prompt set is resolved against, for conversions and messages."""

    def __init__(self, ijk_to_ras, shape_kji: Sequence[int], space: str):
        try:
            self.matrix = geometry.check_matrix(ijk_to_ras)
        except ValueError as exc:
            raise InputError(f"invalid ijk_to_ras: {exc}") from exc
        shape = tuple(shape_kji)
        if len(shape) != 3 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape):
            raise InputError(f"shape_kji must be 3 positive integers (k, j, i), got {shape_kji!r}")
        self.shape_kji = tuple(int(s) for s in shape)
        self.size_ijk = np.array(self.shape_kji[::-1])
        self.space = space

    def to_ijk(self, points) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64)
        return geometry.ras_to_ijk(p, self.matrix) if self.space == "RAS" else p

    def extent_text(self) -> str:
        ni, nj, nk = self.size_ijk
        text = f"the volume spans i 0..{ni - 1}, j 0..{nj - 1}, k 0..{nk - 1}"
        if self.space == "RAS":
            corners = np.array([[i, j, k] for i in (0, ni - 1) for j in (0, nj - 1) for k in (0, nk - 1)])
            ras = geometry.ijk_to_ras(corners, self.matrix)
            lo, hi = ras.min(axis=0), ras.max(axis=0)
            text += " (RAS " + ", ".join(f"{a} {_f1(lo[n])}..{_f1(hi[n])}" for n, a in enumerate("RAS")) + ")"
        return text

    def describe(self, point_ijk, given) -> str:
        ijk = ", ".join(_f1(v) for v in point_ijk)
        if self.space == "RAS":
            return f"RAS ({', '.join(f'{v:g}' for v in given)}) = voxel ({ijk})"
        return f"voxel ({ijk})"


def _f1(value: float, digits: int = 1) -> str:
    """A coordinate for a message: 1 decimal, or 3 significant digits when huge (1e+308, not 309 digits)."""
    value = float(value)
    return f"{value:.{digits}f}" if abs(value) < 1e7 else f"{value:.3g}"


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _resolve_roi(seg: dict, where: str, vol: _Volume, problems: _Problems) -> Optional[RoiIJK]:
    c_ijk = np.clip(vol.to_ijk(seg["roi"]), -1e12, 1e12)  # huge but finite: clipped below, never cast from inf
    lo, hi = c_ijk.min(axis=0), c_ijk.max(axis=0)
    slice_component = 2 - geometry.array_axis(seg["roi_axis"])  # kji array axis -> ijk component
    for n in range(3):
        if n != slice_component and hi[n] - lo[n] < _EPS:
            problems.add(f"{where}.roi", f"zero extent along {_IJK[n]} ({lo[n]:g}..{hi[n]:g}) "
                         f"across the {seg['roi_axis']} slices")
            return None
    upper = vol.size_ijk - 0.5
    if np.any(hi < -0.5) or np.any(lo > upper):
        problems.add(f"{where}.roi", f"segment {seg['name']!r}: the roi ({_fmt(lo)}..{_fmt(hi)} in voxels) "
                     f"is entirely outside the volume; {vol.extent_text()}")
        return None
    first = np.floor(lo + 0.5).astype(int)
    last = np.ceil(hi - 0.5).astype(int)
    flip = first > last  # a roi inside one voxel
    first[flip] = last[flip] = np.round((lo[flip] + hi[flip]) / 2).astype(int)
    first_c = np.clip(first, 0, vol.size_ijk - 1)
    last_c = np.clip(last, 0, vol.size_ijk - 1)
    if np.any(first_c != first) or np.any(last_c != last):
        log.warning("%s: segment %r: the roi (voxels %s..%s) is partly outside the volume, clipped to %s..%s; %s",
                    where, seg["name"], _fmt(first), _fmt(last), _fmt(first_c), _fmt(last_c), vol.extent_text())
    return tuple(int(v) for v in first_c), tuple(int(v) for v in last_c)


def _resolve_box(box: dict, name: str, where: str, vol: _Volume, problems: _Problems) -> Optional[Box2D]:
    axis = box["axis"]
    c0, c1 = vol.to_ijk(box["corners"])
    comp = 2 - geometry.array_axis(axis)
    letter = _IJK[comp]
    if abs(c0[comp] - c1[comp]) >= SLICE_TOLERANCE:
        problems.add(f"{where}.corners", f"the corners are not on one {axis} slice ({letter} = {_f1(c0[comp], 2)} "
                     f"and {_f1(c1[comp], 2)}; they may differ by less than {SLICE_TOLERANCE} voxel)")
        return None
    index, (x0, y0, x1, y1) = geometry.box_ijk_to_slice(c0, c1, axis)
    if x1 - x0 < _EPS or y1 - y0 < _EPS:
        problems.add(f"{where}.corners", f"the box has zero {'width' if x1 - x0 < _EPS else 'height'} on its "
                     f"{axis} slice (x {x0:g}..{x1:g}, y {y0:g}..{y1:g} in voxels)")
        return None
    n_slices = geometry.num_slices(vol.shape_kji, axis)
    height, width = geometry.slice_shape(vol.shape_kji, axis)
    outside = (not 0 <= index < n_slices or x1 < -0.5 or x0 > width - 0.5 or y1 < -0.5 or y0 > height - 0.5)
    if outside:
        problems.add(where, f"segment {name!r}: the box on {axis} slice {letter}={index} (x {_f1(x0)}..{_f1(x1)}, "
                     f"y {_f1(y0)}..{_f1(y1)}) is outside the volume; {vol.extent_text()}")
        return None
    clipped = (min(max(x0, 0.0), width - 1.0), min(max(y0, 0.0), height - 1.0),
               min(max(x1, 0.0), width - 1.0), min(max(y1, 0.0), height - 1.0))
    if x0 < -0.5 or y0 < -0.5 or x1 > width - 0.5 or y1 > height - 0.5:
        log.warning("%s: segment %r: the box (x %s..%s, y %s..%s) extends outside %s slice %d, "
                    "clipped to x %s..%s, y %s..%s", where, name, _f1(x0), _f1(x1), _f1(y0), _f1(y1), axis, index,
                    *(_f1(clipped[n]) for n in (0, 2, 1, 3)))
    return Box2D(axis, index, clipped)


def _resolve_point(point: dict, name: str, where: str, vol: _Volume, problems: _Problems) -> Optional[Point]:
    axis = point["axis"]
    p_ijk = vol.to_ijk(point["position"])
    if np.any(p_ijk < -0.5) or np.any(p_ijk >= vol.size_ijk - 0.5):
        problems.add(f"{where}.position", f"segment {name!r}: the point {vol.describe(p_ijk, point['position'])} "
                     f"is outside the volume; {vol.extent_text()}")
        return None
    index, (x, y) = geometry.ijk_to_slice(p_ijk, axis)
    height, width = geometry.slice_shape(vol.shape_kji, axis)
    xy = (min(max(x, 0.0), width - 1.0), min(max(y, 0.0), height - 1.0))
    return Point(axis, index, xy, bool(point["positive"]))


def _resolve_segment(seg: dict, where: str, vol: _Volume, problems: _Problems, labelmaps: dict) -> SegmentPrompts:
    name = seg["name"]
    corrections = (corrections_mod.resolve_corrections(seg, where, vol.shape_kji, vol.matrix, problems, labelmaps)
                   if seg["corrections"] is not None else None)
    roi = _resolve_roi(seg, where, vol, problems) if seg["roi"] is not None else None
    boxes = [_resolve_box(b, name, f"{where}.boxes[{n}]", vol, problems) for n, b in enumerate(seg["boxes"])]
    points = [_resolve_point(p, name, f"{where}.points[{n}]", vol, problems) for n, p in enumerate(seg["points"])]
    return SegmentPrompts(name=name, roi_ijk=roi, boxes=[b for b in boxes if b is not None],
                          points=[p for p in points if p is not None], propagate=seg["propagate"],
                          adapter=seg["adapter"], roi_axis=seg["roi_axis"], corrections=corrections)


def resolve(prompt_set_raw: Union[dict, str], ijk_to_ras, shape_kji: Sequence[int],
            source: str = "<prompts>") -> PromptSet:
    """Resolve validated prompts (from :func:`parse_prompts`) onto a volume's voxel grid.

    ``ijk_to_ras`` and ``shape_kji`` describe the volume. RAS coordinates are converted with
    :func:`geometry.ras_to_ijk`; boxes and points are placed on their slice with
    :func:`geometry.box_ijk_to_slice` / :func:`geometry.ijk_to_slice`. Raises :class:`InputError`
    listing every prompt that cannot be placed (naming the segment, the prompt and the volume
    extent); a roi or box partly outside the volume is clipped with a logged warning. Corrections
    labelmaps are read here (each file once) and must be on the volume's grid.
    """
    raw = parse_prompts(prompt_set_raw, source)
    vol = _Volume(ijk_to_ras, shape_kji, raw["space"])
    problems = _Problems(source)
    labelmaps: dict = {}
    segments = [_resolve_segment(seg, f"segments[{n}]", vol, problems, labelmaps)
                for n, seg in enumerate(raw["segments"])]
    problems.raise_if_any()
    return PromptSet(segments)


# --------------------------------------------------------------------------- writing back

def _round(values) -> List[float]:
    return [round(float(v), 6) + 0.0 for v in values]  # + 0.0 turns -0.0 into 0.0


def _segment_to_dict(seg: SegmentPrompts, convert: Callable[[np.ndarray], np.ndarray]) -> dict:
    out: Dict[str, Any] = {"name": seg.name}
    if seg.roi_ijk is not None:
        out["roi"] = [_round(c) for c in convert(np.asarray(seg.roi_ijk, dtype=np.float64))]
        out["roi_axis"] = seg.roi_axis
    if seg.boxes:
        out["boxes"] = []
        for box in seg.boxes:
            x0, y0, x1, y1 = box.box_xy
            corners = np.array([geometry.slice_to_ijk(box.index, (x0, y0), box.axis),
                                geometry.slice_to_ijk(box.index, (x1, y1), box.axis)])
            out["boxes"].append({"corners": [_round(c) for c in convert(corners)], "axis": box.axis})
    if seg.points:
        out["points"] = [{"position": _round(convert(geometry.slice_to_ijk(p.index, p.xy_slice, p.axis))),
                          "positive": bool(p.positive), "axis": p.axis} for p in seg.points]
    if seg.adapter is not None:
        out["adapter"] = seg.adapter
    out["propagate"] = bool(seg.propagate)
    if seg.corrections is not None:
        out["corrections"] = seg.corrections.to_dict()
    return out


def to_dict(prompt_set: PromptSet, ijk_to_ras=None) -> dict:
    """A resolved :class:`PromptSet` as a prompts-file dict: in RAS if ``ijk_to_ras`` is given, else IJK."""
    if ijk_to_ras is None:
        space, convert = "IJK", (lambda p: p)
    else:
        try:
            matrix = geometry.check_matrix(ijk_to_ras)
        except ValueError as exc:
            raise InputError(f"invalid ijk_to_ras: {exc}") from exc
        space, convert = "RAS", (lambda p: geometry.ijk_to_ras(p, matrix))
    return {"space": space, "segments": [_segment_to_dict(s, convert) for s in prompt_set.segments]}


def dumps_prompts(prompts: Union[PromptSet, dict], ijk_to_ras=None) -> str:
    """JSON text of a :class:`PromptSet` (IJK, or RAS with ``ijk_to_ras``) or of a raw prompts dict."""
    if isinstance(prompts, PromptSet):
        data = to_dict(prompts, ijk_to_ras)
    else:
        if ijk_to_ras is not None:
            raise InputError("ijk_to_ras is only used with a resolved PromptSet; a raw prompts dict "
                             "is written in its own space")
        data = parse_prompts(prompts, "<prompts>")
        for seg in data["segments"]:  # leave defaults implicit, as a person would write the file
            if seg["roi"] is None:
                del seg["roi"], seg["roi_axis"]
            if seg["adapter"] is None:
                del seg["adapter"]
            if seg["corrections"] is None:
                del seg["corrections"]
    return _compact_json(data)


def _is_coordinates(value: Any) -> bool:
    """A list of numbers or a list of lists of numbers (kept on one line)."""
    def numbers(v):
        return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    return numbers(value) or (isinstance(value, list) and bool(value) and all(numbers(v) for v in value))


def _format_json(value: Any, indent: int) -> str:
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {_format_json(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and value and not _is_coordinates(value):
        items = [inner + _format_json(v, indent + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(value)


def _compact_json(data: dict) -> str:
    """Indented JSON with coordinates on one line: ``"corners": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]``."""
    return _format_json(data, 0) + "\n"


def dump_prompts(prompts: Union[PromptSet, dict], path: Union[str, os.PathLike], ijk_to_ras=None,
                 overwrite: bool = False) -> None:
    """Write prompts as a JSON file atomically (see :func:`dumps_prompts`)."""
    from .io import write_text_atomic  # lazy: keeps SimpleITK out of prompt-only imports

    write_text_atomic(path, dumps_prompts(prompts, ijk_to_ras), overwrite=overwrite)
