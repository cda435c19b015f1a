"""Corrected slices in the prompts file: ``"corrections"`` of a segment, read from a labelmap.

A segment may carry ::

    "corrections": {"labelmap": "corr.nii.gz", "value": 1, "axis": "axial", "slices": [12, 17, 25]}

The listed ``axis`` slices of ``labelmap == value`` are the user's corrected masks: each is pinned in the
prompt session (``PromptSession.set_slice_mask``: kept exactly, it seeds and bounds propagation); a listed
slice without a voxel of ``value`` is a corrected *empty* slice ("the object is absent here").

- ``labelmap`` (required): an integer label image on the volume's voxel grid (same size, spacing, origin
  and directions); in a file read by ``load_prompts`` a relative path is relative to the prompts file.
- ``value`` (default 1): the non-zero integer label of this segment in the labelmap.
- ``axis`` (default ``"axial"``): the slicing axis of the listed slices. When the segment propagates,
  the corrections must lie on the axis its boxes and points (or its ``roi_axis``) use: they seed and
  bound that propagation, and a corrected slice across it would be overwritten by it.
- ``slices`` (required): a non-empty list of distinct slice indices (0-based) inside the volume.
- ``adapt`` (default true): update the segment's organ adapter from its non-empty corrected slices before
  propagating (online adaptation, ``MedFMTrainLib.online``; when the caller supplies it, as the ``medfm`` CLI
  does); false propagates with the segment's adapter (or the base model) as it is.

A ``value`` absent from the whole labelmap is allowed (every listed slice is then a corrected empty
slice) and reported as a warning. Bad input (another grid, an unreadable or truncated file, an index
outside the volume, a slice listed twice, ...) is an :class:`~MedFMSegmentLib.errors.InputError` naming
the key path, e.g. ``segments[0].corrections.slices[2]``, found when the prompts are resolved on the
volume (before any model loads).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import geometry
from .errors import InputError
from .prompts_json import MAX_PROMPTS, MAX_PROMPTS_BYTES, _Problems, _axis, _check_keys, _object, _type_name

log = logging.getLogger(__name__)

KEYS = ("labelmap", "value", "axis", "slices", "adapt")
DEFAULT_VALUE = 1
MAX_CORRECTED_SLICES = 10_000  # over all segments of a prompts file (each is a slice-sized mask in memory)
MAX_LABEL = 2 ** 31 - 1


@dataclass(eq=False)
class CorrectedSlice:
    """One corrected slice: ``mask`` uint8 ``(H, W)`` of ``axis`` slice ``index`` (may be empty)."""
    axis: str
    index: int
    mask: np.ndarray


@dataclass(eq=False)
class Corrections:
    """A segment's corrections, read from its labelmap and placed on the volume."""
    labelmap: str
    value: int
    axis: str
    slices: List[CorrectedSlice] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    adapt: bool = True  # online adaptation from the corrected slices (when the caller supplies it)

    @property
    def indices(self) -> List[int]:
        return [s.index for s in self.slices]

    @property
    def empty(self) -> List[int]:
        return [s.index for s in self.slices if not s.mask.any()]

    def to_dict(self) -> dict:
        """The prompts-file form (the labelmap path as resolved)."""
        return {"labelmap": self.labelmap, "value": self.value, "axis": self.axis, "slices": self.indices,
                "adapt": self.adapt}

    def report(self) -> dict:
        """For a run's report: the file form plus the listed slices that are corrected empty slices."""
        return {**self.to_dict(), "empty": self.empty}


# --------------------------------------------------------------------------- the JSON value

def _integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def parse_corrections(value: Any, where: str, problems: _Problems) -> Optional[dict]:
    """Validate a segment's ``"corrections"`` object; returns ``{"labelmap", "value", "axis", "slices"}``."""
    corr = _object(value, where, problems)
    if corr is None:
        return None
    _check_keys(corr, KEYS, where, problems)
    ok = True
    labelmap = corr.get("labelmap")
    if "labelmap" not in corr:
        problems.add(f"{where}.labelmap", "missing (the path of the labelmap holding the corrected slices)")
        ok = False
    elif not isinstance(labelmap, str) or not labelmap.strip():
        problems.add(f"{where}.labelmap", f"expected a path string, got {_type_name(labelmap)} {labelmap!r}")
        ok = False
    label = corr.get("value", DEFAULT_VALUE)
    if not _integer(label):
        problems.add(f"{where}.value", f"expected an integer label value (e.g. 1), got {_type_name(label)} {label!r}")
        ok = False
    elif label == 0:
        problems.add(f"{where}.value", "0 is the background of a labelmap: give the segment's label value")
        ok = False
    elif abs(int(label)) > MAX_LABEL:
        problems.add(f"{where}.value", f"{float(label):.3g} is not a label value (at most {MAX_LABEL} in magnitude)")
        ok = False
    axis = _axis(corr.get("axis", "axial"), f"{where}.axis", problems)
    slices = _parse_slices(corr.get("slices"), "slices" in corr, f"{where}.slices", problems)
    adapt = corr.get("adapt", True)
    if not isinstance(adapt, bool):
        problems.add(f"{where}.adapt", f"expected true or false, got {_type_name(adapt)} {adapt!r}")
        ok = False
    if not ok or axis is None or slices is None:
        return None
    return {"labelmap": labelmap, "value": int(label), "axis": axis, "slices": slices, "adapt": adapt}


def _parse_slices(value: Any, given: bool, where: str, problems: _Problems) -> Optional[List[int]]:
    if not given:
        problems.add(where, "missing (the list of corrected slice indices, e.g. [12, 17, 25])")
        return None
    if not isinstance(value, list):
        problems.add(where, f"expected a list of slice indices, got {_type_name(value)}")
        return None
    if not value:
        problems.add(where, "is empty: list the corrected slices (or leave out \"corrections\")")
        return None
    if len(value) > MAX_CORRECTED_SLICES:
        problems.add(where, f"{len(value)} slices is more than the limit of {MAX_CORRECTED_SLICES}")
        return None
    out: List[int] = []
    first: Dict[int, int] = {}
    for n, index in enumerate(value):
        if not _integer(index):
            problems.add(f"{where}[{n}]", f"expected a slice index (an integer), got {_type_name(index)} {index!r}")
        elif index < 0:
            problems.add(f"{where}[{n}]", f"slice index {index} is negative (slices count from 0)")
        elif int(index) in first:
            problems.add(f"{where}[{n}]", f"slice {index} is listed twice (also {where}[{first[int(index)]}])")
        else:
            first[int(index)] = n
            out.append(int(index))
    return out if len(out) == len(value) else None


def resolve_path(corr: Optional[dict], folder: Path) -> None:
    """Make a relative ``labelmap`` path relative to ``folder`` (the prompts file's), in place."""
    if corr and isinstance(corr.get("labelmap"), str) and not Path(corr["labelmap"]).expanduser().is_absolute():
        corr["labelmap"] = str(folder / corr["labelmap"])


# --------------------------------------------------------------------------- on the volume

def grid_text(shape_kji: Sequence[int], ijk_to_ras) -> str:
    """A voxel grid for a message: size (i x j x k), spacing, origin and directions (RAS)."""
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    direction = m[:3, :3] / spacing
    size = "x".join(str(int(s)) for s in tuple(shape_kji)[::-1])
    return (f"size {size}, spacing {' x '.join(f'{s:.4g}' for s in spacing)} mm, origin (RAS) "
            f"({', '.join(f'{v:.4g}' for v in m[:3, 3])}), directions "
            f"({'; '.join(', '.join(f'{v:.3g}' for v in col) for col in direction.T)})")


def _same_grid(shape_a, matrix_a, shape_b, matrix_b) -> bool:
    return tuple(shape_a) == tuple(shape_b) and np.allclose(matrix_a, matrix_b, rtol=1e-5, atol=1e-4)


def read_labelmap(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """(labels [k, j, i] integer, ijk_to_ras); InputError naming the file (missing, corrupt, not labels)."""
    from . import io  # lazy: SimpleITK only when a prompts file has corrections

    labels, matrix = io.read_volume(path)
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise InputError(f"{path}: has non-integer voxel values; a corrections labelmap must hold integer labels")
        labels = labels.astype(np.int64)
    elif labels.dtype.kind not in "iub":
        raise InputError(f"{path}: has voxel type {labels.dtype}; a corrections labelmap must hold integer labels")
    return labels, matrix


def _has_value(labels: np.ndarray, value: int) -> bool:
    info = np.iinfo(labels.dtype) if labels.dtype.kind in "iu" else None
    if info is not None and not info.min <= value <= info.max:
        return False
    return bool(np.any(labels == value))


def propagation_axes(seg: dict) -> List[str]:
    """The axes a segment's own prompts propagate along (roi_axis, and the boxes' and points' axes)."""
    axes = [seg["roi_axis"]] if seg.get("roi") is not None else []
    if seg.get("propagate", True):
        axes += [p["axis"] for p in list(seg.get("boxes") or []) + list(seg.get("points") or []) if p]
    return sorted(set(axes))


def resolve_corrections(seg: dict, where: str, shape_kji: Sequence[int], ijk_to_ras, problems: _Problems,
                        cache: Dict[str, object]) -> Optional[Corrections]:
    """Read a segment's corrections (see :func:`parse_corrections`) on the volume; problems are collected.

    ``cache`` maps a labelmap path to what reading it gave (the array and matrix, or the error) so that
    segments sharing a labelmap read it once.
    """
    corr = seg["corrections"]
    where = f"{where}.corrections"
    axis, name = corr["axis"], seg["name"]
    axes = propagation_axes(seg)
    if axes and axes != [axis]:
        problems.add(f"{where}.axis", f"segment {name!r}: the corrections are on {axis} slices but the segment's "
                     f"prompts propagate along {' and '.join(axes)}; corrected slices seed and bound that "
                     f"propagation, so they must lie on its axis (list {axes[0]} slices, or give this "
                     f"segment's boxes and points on {axis} slices)")
        return None
    n = geometry.num_slices(shape_kji, axis)
    bad = False
    for k, index in enumerate(corr["slices"]):
        if index >= n:
            problems.add(f"{where}.slices[{k}]", f"segment {name!r}: {axis} slice {index} is outside the volume "
                         f"({axis} slices 0..{n - 1})")
            bad = True
    path = corr["labelmap"]
    if path not in cache:
        try:
            cache[path] = read_labelmap(path)
        except InputError as exc:
            cache[path] = exc
    got = cache[path]
    if isinstance(got, InputError):
        problems.add(f"{where}.labelmap", str(got))
        return None
    labels, matrix = got
    if not _same_grid(labels.shape, matrix, shape_kji, ijk_to_ras):
        problems.add(f"{where}.labelmap", f"{path} is not on the volume's voxel grid: the labelmap has "
                     f"{grid_text(labels.shape, matrix)}; the volume has {grid_text(shape_kji, ijk_to_ras)}; "
                     f"resample it onto the volume (nearest neighbour) first")
        return None
    if bad:
        return None
    value = corr["value"]
    out = Corrections(path, value, axis, adapt=corr.get("adapt", True))
    present = _has_value(labels, value)
    for index in corr["slices"]:
        mask = (geometry.get_slice(labels, axis, index) == value) if present else \
            np.zeros(geometry.slice_shape(shape_kji, axis), bool)
        out.slices.append(CorrectedSlice(axis, index, np.ascontiguousarray(mask, dtype=np.uint8)))
    if not present:
        out.warnings.append(f"segment {name!r}: {path} has no voxel of value {value}: every listed {axis} "
                            f"slice ({', '.join(map(str, out.indices))}) is a corrected empty slice")
    for text in out.warnings:
        log.warning("%s: %s", where, text)
    return out


def labelmap_paths(prompts_path: os.PathLike) -> List[str]:
    """The corrections labelmaps a prompts file names (absolute), best effort: never raises.

    Batch mode hashes them with the case's other inputs, so editing a labelmap reruns the case.
    """
    try:
        path = Path(prompts_path)
        if path.stat().st_size > MAX_PROMPTS_BYTES:
            return []
        text = path.read_bytes()
        if b'"corrections"' not in text or text.count(b'"corners"') + text.count(b'"position"') > MAX_PROMPTS:
            return []  # no second parse of a large file (one over the caps is refused by load_prompts)
        data = json.loads(text)
        out = []
        for seg in data.get("segments", []):
            corr = seg.get("corrections") if isinstance(seg, dict) else None
            if isinstance(corr, dict) and isinstance(corr.get("labelmap"), str) and corr["labelmap"].strip():
                p = Path(corr["labelmap"]).expanduser()
                out.append(os.path.abspath(p if p.is_absolute() else path.parent / p))
        return sorted(set(out))
    except (OSError, ValueError, TypeError, AttributeError, RecursionError):
        return []
