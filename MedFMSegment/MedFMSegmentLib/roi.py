"""ROI mode: segment the object a 3D box frames, slice by slice inside the box.

```python
vol = segment_roi(session, roi_ijk=((i0, j0, k0), (i1, j1, k1)), axis="axial")   # -> VolumeResult
```

An ROI says "the object is inside this box, centred, filling much of it". So:

1. **One model window for the whole ROI**: every slice is seen through the crop the session makes for
   the ROI's rectangle, so each slice is encoded once and every prompt below only runs the decoder.
2. **Seed object**: on the middle slice the model's candidate masks for the ROI rectangle (its single
   answer and its three multimask answers) are scored by the predicted IoU, how much of the rectangle
   the candidate's extent fills, how central it is, and how well it agrees with the candidates of the
   slices ``seed_neighbours`` away on each side (the same object continues; a neighbour does not).
3. **Slice by slice toward both ends**: each slice's candidates come from the ROI rectangle and from
   the previous slice's mask box (grown by ``margin_mm``, clamped to the rectangle); the candidate that
   overlaps the previous slice's mask most is kept (components touching it). The object ends where no
   candidate overlaps it enough, or where it becomes too small; the slices beyond stay empty.

Nothing is recorded in the session (prompts and undo history are untouched). Uses only the session's
public API: ``crop_for``, ``embedding``, ``model.decode`` and the slice geometry.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import geometry
from .errors import Cancelled, InputError
from .preprocess import model_to_slice
from .results import Progress, ShouldStop, VolumeResult
from .session import keep_components_touching

log = logging.getLogger(__name__)


@dataclass
class RoiConfig:
    seed_neighbours: int = 2  # slices each side of the middle whose candidates vote for the seed object
    fill_weight: float = 0.5  # seed score: + fill of the rectangle by the candidate's extent (0..1)
    centre_weight: float = 0.5  # - distance of its centroid from the rectangle's centre (half-sides)
    agree_weight: float = 0.5  # + mean best IoU with the neighbouring slices' candidates
    full_fill: float = 0.9  # a candidate covering more of the rectangle's area than this is the frame
    min_overlap: float = 0.3  # no candidate overlaps the previous slice's mask this much: object ended
    min_area_mm2: float = 4.0
    margin_mm: float = 2.0  # the previous mask's box grows by this for the next slice's second prompt
    track_multimask: bool = False  # also offer the multimask answers while tracking (seed: always)
    rect_bonus: float = 0.1  # tracking score = IoU with the previous mask + this for the ROI rectangle's answer
    iou_weight: float = 0.1  # ... + this times the predicted IoU
    intensity_tol: float = float("inf")  # mean intensity further than this many seed SDs from the seed's: ended


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return float((a & b).sum()) / union if union else 0.0


def _roi_bounds(session, roi_ijk, axis):
    """(first, last) slice indices and the slice rectangle of an inclusive IJK box (clipped to the volume)."""
    try:
        (i0, j0, k0), (i1, j1, k1) = [[float(v) for v in c] for c in roi_ijk]
    except (TypeError, ValueError):
        raise InputError(f"ROI must be two (i, j, k) corners, got {roi_ijk!r}") from None
    if not np.all(np.isfinite([i0, j0, k0, i1, j1, k1])):
        raise InputError(f"ROI {roi_ijk!r} contains NaN or inf")
    lo_ijk = np.floor(np.minimum([i0, j0, k0], [i1, j1, k1])).astype(int)
    hi_ijk = np.ceil(np.maximum([i0, j0, k0], [i1, j1, k1])).astype(int)
    shape_ijk = np.array(session.shape[::-1])
    if np.any(hi_ijk < 0) or np.any(lo_ijk > shape_ijk - 1):
        raise InputError(f"ROI {roi_ijk} lies outside the volume (i, j, k sizes {tuple(shape_ijk)})")
    lo_ijk, hi_ijk = np.maximum(lo_ijk, 0), np.minimum(hi_ijk, shape_ijk - 1)
    first = geometry.ijk_to_slice(lo_ijk, axis)[0]
    last = geometry.ijk_to_slice(hi_ijk, axis)[0]
    _, rect = geometry.box_ijk_to_slice(lo_ijk, hi_ijk, axis)
    return min(first, last), max(first, last), tuple(float(v) for v in rect)


class _Candidates:
    """Candidate masks per (slice, box), decoded from one cached embedding per slice."""

    def __init__(self, session, axis, crop, rect):
        self.session, self.axis, self.crop = session, axis, crop
        self.shape = geometry.slice_shape(session.shape, axis)
        x0, y0, x1, y1 = (int(round(v)) for v in rect)
        self.inside = np.zeros(self.shape, bool)
        self.inside[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True
        self._memo: Dict[tuple, List[Tuple[np.ndarray, float]]] = {}
        self.encoded = 0

    def __call__(self, index: int, box, multimask: bool = True) -> List[Tuple[np.ndarray, float]]:
        """The single answer first, then (``multimask``) the three multimask answers."""
        key = (index, tuple(round(float(v), 2) for v in box))
        if key in self._memo:
            return self._memo[key] if multimask else self._memo[key][:1]
        s = self.session
        before = s.cache.misses
        emb = s.embedding(self.axis, index, self.crop)
        self.encoded += s.cache.misses - before
        box_model = self.crop.box_to_model(box)
        bx0, by0, bx1, by1 = (int(round(v)) for v in box)
        in_box = np.zeros(self.shape, bool)
        in_box[max(by0, 0):by1 + 1, max(bx0, 0):bx1 + 1] = True
        out = []
        ctx = s.adapter.applied(s.model) if s.adapter is not None else _Null()
        with ctx:
            # one decoder run for the single and the multimask answers, on the exported decoder without an
            # adapter, as the session decodes (the torch one with it)
            logits, iou = s.model.decode_all(emb, box_model, fast=s.adapter is None)
        for c in range(logits.shape[0]):
            mask = (model_to_slice(logits[c], self.crop, self.shape) > s.config.mask_threshold) & self.inside
            if mask.any():
                mask = keep_components_touching(mask.astype(np.uint8), in_box) > 0
            out.append((mask, float(np.clip(iou[c], 0, 1))))
        self._memo[key] = out
        return out if multimask else out[:1]


def _grown(mask: np.ndarray, radius: int) -> np.ndarray:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.BinaryDilate(img, [radius, radius], sitk.sitkCross)) > 0


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _seed_score(mask, iou, rect, neighbours, cfg) -> float:
    if not mask.any():
        return -np.inf
    x0, y0, x1, y1 = rect
    rw, rh = x1 - x0 + 1, y1 - y0 + 1
    bx0, by0, bx1, by1 = geometry.box_from_mask(mask)
    fill = min((bx1 - bx0 + 1) / rw, 1.0) * min((by1 - by0 + 1) / rh, 1.0)
    if mask.sum() > cfg.full_fill * rw * rh:  # the whole frame, not an object inside it
        fill = 0.0
    ys, xs = np.nonzero(mask)
    off = np.hypot((xs.mean() - (x0 + x1) / 2) / (rw / 2), (ys.mean() - (y0 + y1) / 2) / (rh / 2))
    agree = np.mean([max((_iou(mask, m) for m, _ in cands), default=0.0) for cands in neighbours]) if neighbours else 0.0
    return iou + cfg.fill_weight * fill - cfg.centre_weight * off + cfg.agree_weight * agree


def segment_roi(session, roi_ijk, axis: str = "axial", config: Optional[RoiConfig] = None,
                progress: Progress = None, should_stop: ShouldStop = None) -> VolumeResult:
    """Segment the object framed by a 3D box (inclusive IJK corners) on every slice inside it (see module
    docstring). Raises ``Cancelled`` (nothing changed) when ``should_stop()`` turns true."""
    t0 = time.perf_counter()
    cfg = config or RoiConfig()
    geometry.check_axis(axis)
    first, last, rect = _roi_bounds(session, roi_ijk, axis)
    crop = session.crop_for(axis, rect, (first + last) // 2)  # one window (and CT window) for the whole ROI
    cands = _Candidates(session, axis, crop, rect)
    sy, sx = geometry.slice_pixel_spacing(session.ijk_to_ras, axis)
    mx, my = cfg.margin_mm / sx, cfg.margin_mm / sy
    min_area = cfg.min_area_mm2 / (sx * sy)
    h, w = cands.shape
    total, done = last - first + 1, [0]

    def tick(index):
        if should_stop is not None and should_stop():
            raise Cancelled("ROI segmentation was stopped; the segmentation is unchanged")
        done[0] += 1
        if progress is not None:
            progress(min(done[0] / total, 1.0), f"{axis} slice {index}")

    middle = (first + last) // 2
    tick(middle)
    seed_cands = cands(middle, rect)
    neighbours = [cands(n, rect) for n in (middle - cfg.seed_neighbours, middle + cfg.seed_neighbours)
                  if cfg.seed_neighbours and first <= n <= last and n != middle]
    scores = [_seed_score(m, iou, rect, neighbours, cfg) for m, iou in seed_cands]
    best = int(np.argmax(scores))
    seed, seed_iou = seed_cands[best]
    result = VolumeResult(np.zeros(session.shape, np.uint8), axis, seeds=[middle])
    if not seed.any() or seed.sum() < min_area:
        result.stopped[f"{middle}"] = "no object on the middle slice"
        result.encoded, result.seconds = cands.encoded, time.perf_counter() - t0
        return result
    geometry.set_slice(result.mask, axis, middle, seed.astype(np.uint8))
    result.scores[middle] = seed_iou
    values = session.normalised_slice(axis, middle)[seed].astype(np.float32)
    seed_mean, seed_sd = float(values.mean()), max(float(values.std()), 4.0)
    for name, step, stop in (("down", -1, first - 1), ("up", +1, last + 1)):
        prev, index, why = seed, middle + step, "reached the end of the ROI"
        while index != stop:
            tick(index)
            options = [(m, iou, cfg.rect_bonus if n == 0 else 0.0)
                       for n, (m, iou) in enumerate(cands(index, rect, cfg.track_multimask))]
            bx0, by0, bx1, by1 = geometry.box_from_mask(prev)
            box = (max(bx0 - mx, rect[0], 0), max(by0 - my, rect[1], 0),
                   min(bx1 + mx, rect[2], w - 1), min(by1 + my, rect[3], h - 1))
            options += [(m, iou, 0.0) for m, iou in cands(index, box, cfg.track_multimask)]
            k = int(np.argmax([_iou(m, prev) + bonus + cfg.iou_weight * iou for m, iou, bonus in options]))
            mask, iou, _ = options[k]
            if mask.any():
                mask = keep_components_touching(mask.astype(np.uint8), _grown(prev, 2)) > 0
            if mask.sum() < min_area:
                why = f"object ended at slice {index} (area {int(mask.sum())} px)"
                break
            if _iou(mask, prev) < cfg.min_overlap:
                why = f"object ended at slice {index} (overlap with the previous slice {_iou(mask, prev):.2f})"
                break
            mean = float(session.normalised_slice(axis, index)[mask].mean())
            if abs(mean - seed_mean) > cfg.intensity_tol * seed_sd:
                why = f"object ended at slice {index} (intensity {mean:.0f} vs {seed_mean:.0f} +- {seed_sd:.0f})"
                break
            geometry.set_slice(result.mask, axis, index, mask.astype(np.uint8))
            result.scores[index] = iou
            prev = mask
            index += step
        result.stopped[f"{middle} {name}"] = why
    if progress is not None:
        progress(1.0, "done")
    result.encoded, result.seconds = cands.encoded, time.perf_counter() - t0
    log.info("ROI %s slices %d..%d, seed candidate %d of %d (scores %s), %.1f s, %d encoded: %s", axis, first, last,
             best, len(seed_cands), [round(s, 2) for s in scores], result.seconds, result.encoded, result.stopped)
    return result
