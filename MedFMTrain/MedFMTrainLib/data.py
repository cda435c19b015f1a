"""Training data from the user's work: (image slice, corrected mask) pairs on one slicing axis.

Two sources, both checked before anything is computed:

- :func:`slices_from_segmentation`: one volume, its corrected mask, and the slice indices the user
  corrected (few-shot from slices: 5 slices or more recommended; fewer are accepted with a warning);
- :func:`slices_from_volumes`: 1 to 5 fully corrected volumes; slices are sampled evenly over each
  structure (and slices without the structure become localizer negatives).

Images are normalised with :func:`MedFMSegmentLib.preprocess.normalise_volume`, exactly as
``PromptSession.set_volume`` does, so training sees what inference sees.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from MedFMSegmentLib import geometry
from MedFMSegmentLib.errors import InputError
from MedFMSegmentLib.preprocess import normalise_volume

log = logging.getLogger(__name__)

MIN_MASK_PIXELS = 4  # a slice mask smaller than this cannot teach a shape
RECOMMENDED_SLICES = 5
MAX_VOLUMES = 5


@dataclass(frozen=True)
class TrainingSlice:
    """One training pair: a normalised uint8 slice and its binary mask, both ``[y, x]``."""

    volume: str  # name of the source volume
    axis: str
    index: int
    image_u8: np.ndarray
    mask: np.ndarray  # uint8 0/1
    pixel_spacing_yx: Tuple[float, float]

    @property
    def positive(self) -> bool:
        return bool(self.mask.any())

    @property
    def box_xy(self):
        """Tight inclusive box of the mask (x0, y0, x1, y1), or None for a negative slice."""
        return geometry.box_from_mask(self.mask)


@dataclass
class TrainingSet:
    """Training pairs of one organ on one axis, plus what the manifest records about them."""

    axis: str
    preset: str
    slices: List[TrainingSlice] = field(default_factory=list)
    volumes: List[Dict] = field(default_factory=list)  # per source volume: name, shape, spacing, window

    @property
    def positives(self) -> List[TrainingSlice]:
        return [s for s in self.slices if s.positive]

    @property
    def negatives(self) -> List[TrainingSlice]:
        return [s for s in self.slices if not s.positive]

    def summary(self) -> Dict:
        """JSON-ready description of the data (for the adapter manifest)."""
        per_volume: Dict[str, Dict] = {}
        for v in self.volumes:
            per_volume[v["name"]] = dict(v, slices=[], negative_slices=[], mask_pixels=0)
        for s in self.slices:
            entry = per_volume[s.volume]
            if s.positive:
                entry["slices"].append(s.index)
                entry["mask_pixels"] += int(s.mask.sum())
            else:
                entry["negative_slices"].append(s.index)
        return {"axis": self.axis, "preset": self.preset, "positive_slices": len(self.positives),
                "negative_slices": len(self.negatives), "volumes": list(per_volume.values())}


def _check_mask(mask_kji, array_kji: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask_kji)
    if mask.ndim != 3:
        raise InputError(f"{name}: mask must be a 3D [k, j, i] array, got shape {mask.shape}")
    if mask.shape != array_kji.shape:
        raise InputError(f"{name}: mask shape {mask.shape} (k, j, i) differs from the image shape "
                         f"{array_kji.shape}: the mask must be on the image grid (resample it first)")
    if mask.dtype.kind not in "biuf":
        raise InputError(f"{name}: mask has unsupported voxel type {mask.dtype}")
    return (mask != 0).astype(np.uint8)


def _check_same_grid(ijk_to_ras, mask_ijk_to_ras, name: str) -> None:
    if mask_ijk_to_ras is None:
        return
    a, b = geometry.check_matrix(ijk_to_ras), geometry.check_matrix(mask_ijk_to_ras)
    if not np.allclose(a, b, atol=1e-4, rtol=1e-5):
        raise InputError(f"{name}: the mask's IJK-to-RAS geometry differs from the image's (largest difference "
                         f"{np.abs(a - b).max():.4g} mm): the mask must be on the image grid (resample it first)")


def _volume_entry(name: str, array_kji: np.ndarray, matrix: np.ndarray, preset: str, window) -> Dict:
    return {"name": name, "shape_kji": [int(s) for s in array_kji.shape],
            "spacing_ijk": [round(float(s), 6) for s in geometry.spacing(matrix)],
            "window": [round(float(w), 4) for w in window], "preset": preset}


def _make_slice(name, volume_u8, mask, axis, index, spacing_yx, allow_negative=False) -> TrainingSlice:
    m = np.ascontiguousarray(geometry.get_slice(mask, axis, index))
    pixels = int(m.sum())
    if pixels == 0 and not allow_negative:
        raise InputError(f"{name}: {axis} slice {index} of the mask is empty: every training slice needs "
                         f"the corrected structure on it")
    if 0 < pixels < MIN_MASK_PIXELS:
        raise InputError(f"{name}: {axis} slice {index} of the mask has only {pixels} voxel(s); a training "
                         f"slice needs at least {MIN_MASK_PIXELS} (a stray voxel is not a corrected structure)")
    image = np.ascontiguousarray(geometry.get_slice(volume_u8, axis, index))
    return TrainingSlice(name, axis, int(index), image, m, spacing_yx)


def _check_indices(indices, shape, axis: str, name: str) -> List[int]:
    if indices is None or len(indices) == 0:
        raise InputError(f"{name}: no training slice indices given")
    out = []
    for idx in indices:
        try:
            out.append(geometry.check_index(shape, axis, idx))
        except (TypeError, IndexError) as exc:
            raise InputError(f"{name}: {exc}") from None
    dupes = sorted({i for i in out if out.count(i) > 1})
    if dupes:
        raise InputError(f"{name}: {axis} slice(s) {dupes} listed more than once")
    return sorted(out)


def _check_axis(axis: str) -> str:
    try:
        return geometry.check_axis(axis)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def slices_from_segmentation(array_kji, ijk_to_ras, mask_kji, axis: str, indices: Sequence[int],
                             preset: Optional[str] = None, mask_ijk_to_ras=None, name: str = "volume",
                             negative_indices: Sequence[int] = ()) -> TrainingSet:
    """Training pairs from corrected slices of one volume.

    ``mask_kji`` is the corrected structure (non-zero = inside) on the image grid; ``indices`` are
    the corrected slices along ``axis`` (each must hold at least :data:`MIN_MASK_PIXELS` voxels of
    the structure). ``negative_indices`` are slices known to be free of the structure (they train
    only the localizer). ``mask_ijk_to_ras``, when given, must equal ``ijk_to_ras``.
    """
    axis = _check_axis(axis)
    matrix = geometry.check_matrix(ijk_to_ras)
    array = np.asarray(array_kji)
    mask = _check_mask(mask_kji, array, name)
    _check_same_grid(matrix, mask_ijk_to_ras, name)
    if not mask.any():
        raise InputError(f"{name}: the mask is empty: there is no corrected structure to learn from")
    idx = _check_indices(indices, array.shape, axis, name)
    neg = _check_indices(negative_indices, array.shape, axis, name) if len(negative_indices) else []
    overlap = sorted(set(idx) & set(neg))
    if overlap:
        raise InputError(f"{name}: {axis} slice(s) {overlap} are listed both as training and negative slices")
    volume_u8, p, window = normalise_volume(array, preset)
    spacing_yx = geometry.slice_pixel_spacing(matrix, axis)
    slices = [_make_slice(name, volume_u8, mask, axis, i, spacing_yx) for i in idx]
    for i in neg:
        s = _make_slice(name, volume_u8, mask, axis, i, spacing_yx, allow_negative=True)
        if s.positive:
            raise InputError(f"{name}: negative {axis} slice {i} holds {int(s.mask.sum())} mask voxels")
        slices.append(s)
    if len(idx) < RECOMMENDED_SLICES:
        log.warning("training from %d slice(s); few-shot tuning is designed for %d corrected slices or more",
                    len(idx), RECOMMENDED_SLICES)
    return TrainingSet(axis, p.name, slices, [_volume_entry(name, array, matrix, p.name, window)])


def even_slices(mask_kji: np.ndarray, axis: str, count: int, min_pixels: int = MIN_MASK_PIXELS) -> List[int]:
    """``count`` slice indices spread evenly over the slices where the structure has ``min_pixels``."""
    area = np.asarray(mask_kji != 0).sum(axis=tuple(a for a in range(3) if a != geometry.array_axis(axis)))
    idx = np.nonzero(area >= min_pixels)[0]
    if idx.size == 0:
        return []
    if idx.size <= count:
        return [int(i) for i in idx]
    picks = np.linspace(0, idx.size - 1, count + 2)[1:-1].round().astype(int)
    return sorted({int(idx[p]) for p in picks})


def slices_from_volumes(volumes: Sequence[Tuple], axis: str, slices_per_volume: int = 8,
                        negatives_per_volume: int = 2, preset: Optional[str] = None) -> TrainingSet:
    """Training pairs from 1 to 5 fully corrected volumes: ``[(array_kji, ijk_to_ras, mask_kji), ...]``.

    Each volume gives ``slices_per_volume`` slices spread over its structure, plus up to
    ``negatives_per_volume`` slices without it (just outside the structure: localizer negatives).
    """
    axis = _check_axis(axis)
    if not 1 <= len(volumes) <= MAX_VOLUMES:
        raise InputError(f"give 1 to {MAX_VOLUMES} corrected volumes, got {len(volumes)}")
    out: Optional[TrainingSet] = None
    for n, item in enumerate(volumes):
        if len(item) != 3:
            raise InputError(f"volume {n}: expected (array_kji, ijk_to_ras, mask_kji), got {len(item)} items")
        array, matrix, mask = item
        name = f"volume{n}"
        m = _check_mask(mask, np.asarray(array), name)
        if not m.any():
            raise InputError(f"{name}: the mask is empty: there is no corrected structure to learn from")
        idx = even_slices(m, axis, slices_per_volume)
        if not idx:
            raise InputError(f"{name}: no {axis} slice holds {MIN_MASK_PIXELS} or more mask voxels")
        neg = _negative_slices(m, axis, negatives_per_volume)
        ts = slices_from_segmentation(array, matrix, m, axis, idx, preset, name=name, negative_indices=neg)
        if out is None:
            out = ts
            preset = ts.preset  # every volume uses the first volume's preset
        else:
            out.slices += ts.slices
            out.volumes += ts.volumes
    return out


def _negative_slices(mask: np.ndarray, axis: str, count: int) -> List[int]:
    """Up to ``count`` empty slices a little outside the structure (alternating below and above)."""
    if count <= 0:
        return []
    a = geometry.array_axis(axis)
    area = mask.sum(axis=tuple(x for x in range(3) if x != a))
    idx = np.nonzero(area)[0]
    n = mask.shape[a]
    lo, hi = int(idx.min()), int(idx.max())
    gap = max(3, (hi - lo) // 4)
    cands = [lo - gap, hi + gap, lo - 2 * gap, hi + 2 * gap]
    return sorted([c for c in dict.fromkeys(cands) if 0 <= c < n and area[c] == 0][:count])
