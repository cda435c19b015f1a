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
   candidate overlaps it enough (on thick slices the limit allows a 45-degree border's change, as
   propagation does), or where it becomes too small; the slices beyond stay empty.

Opt-in, measured and not the default (README, "ROI -> 3D"): ``RoiConfig(select="path")`` chooses every
slice's answer together (``roi_path.py``), and ``prior_weight < 1`` fuses the model's probability with the
ellipsoid inscribed in the ROI (``fuse_with_prior``).

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
    slope_overlap_factor: float = 0.5  # ... at most this x (r / (r + slice spacing))^2 (thick slices)
    min_area_mm2: float = 4.0
    margin_mm: float = 2.0  # the previous mask's box grows by this for the next slice's second prompt
    track_multimask: bool = False  # also offer the multimask answers while tracking (seed: always)
    rect_bonus: float = 0.1  # tracking score = IoU with the previous mask + this for the ROI rectangle's answer
    iou_weight: float = 0.1  # ... + this times the predicted IoU
    intensity_tol: float = float("inf")  # mean intensity further than this many seed SDs from the seed's: ended
    # The ROI's own shape as a prior: the mask is w x the model's probability (sigmoid(logit / temperature), the
    # tracked answer's; 0 off the tracked object) + (1 - w) x a soft ellipsoid inscribed in the ROI
    # (sigmoid(pixels inside its border / softness)), above 0.5. w = 1: the model alone.
    prior_weight: float = 1.0
    prior_temperature: float = 1.0
    prior_softness_px: float = 1.0
    keep_logits: bool = False  # keep each answer's logits (always with prior_weight < 1): fuse_with_prior afterwards
    # "track": the seed on the middle slice, then slice by slice (above); "path": every slice's answer chosen
    # together by dynamic programming (roi_path.py) with these weights
    select: str = "track"
    path_iou_weight: float = 1.0
    path_prior_weight: float = 0.5
    path_pair_weight: float = 1.0
    path_empty_score: float = 0.6


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

    def __init__(self, session, axis, crop, rect, keep_logits: bool = False):
        self.session, self.axis, self.crop = session, axis, crop
        self.keep_logits = keep_logits  # logits in the rectangle per answer (for the prior fusion and the path)
        self.shape = geometry.slice_shape(session.shape, axis)
        x0, y0, x1, y1 = (int(round(v)) for v in rect)
        self.inside = np.zeros(self.shape, bool)
        self.inside[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True
        self.rect_px = (max(y0, 0), y1 + 1, max(x0, 0), x1 + 1)  # rows, columns of the rectangle
        self._memo: Dict[tuple, List[Tuple[np.ndarray, float]]] = {}
        self._logits: Dict[tuple, List[np.ndarray]] = {}  # the same key -> each answer's logits in the rectangle
        self.encoded = 0

    def logits(self, index: int, box, answer: int) -> np.ndarray:
        """Logits of answer ``answer`` (0: the single one) of an earlier call, cut to the ROI rectangle (None
        unless ``keep_logits``)."""
        if not self.keep_logits:
            return None
        return self._logits[(index, tuple(round(float(v), 2) for v in box))][answer]

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
        out, kept = [], []
        r0, r1, c0, c1 = self.rect_px
        # one decoder run for the single and the multimask answers, on the exported decoder as the session decodes
        logits, iou = s.model.decode_all(emb, box_model, fast=True, adapter=s.adapter)
        for c in range(logits.shape[0]):
            on_slice = model_to_slice(logits[c], self.crop, self.shape)
            if self.keep_logits:
                kept.append(on_slice[r0:r1, c0:c1].copy())
            mask = (on_slice > s.config.mask_threshold) & self.inside
            if mask.any():
                mask = keep_components_touching(mask.astype(np.uint8), in_box) > 0
            out.append((mask, float(np.clip(iou[c], 0, 1))))
        self._memo[key], self._logits[key] = out, kept
        return out if multimask else out[:1]


def tracking_min_overlap(cfg: RoiConfig, prev_area_px: int, pixel_mm2: float, spacing_mm: float) -> float:
    """``min_overlap``, loosened on thick slices to a 45-degree border's change as propagation does: a disc of
    radius r (mm, the previous mask's equivalent radius) becomes r + spacing, IoU (r / (r + s))^2, times
    ``slope_overlap_factor``."""
    r = float(np.sqrt(max(prev_area_px, 1) * pixel_mm2 / np.pi))
    return min(cfg.min_overlap, cfg.slope_overlap_factor * (r / (r + spacing_mm)) ** 2)


def _grown(mask: np.ndarray, radius: int) -> np.ndarray:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.BinaryDilate(img, [radius, radius], sitk.sitkCross)) > 0


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


def ellipsoid_prior(first: int, last: int, rect_px, index: int, softness_px: float) -> np.ndarray:
    """Soft ellipsoid inscribed in the ROI (slices first..last, the rectangle's rows r0:r1 and columns c0:c1), cut
    on slice ``index`` and to the rectangle: sigmoid(signed distance inside its border in pixels / softness)."""
    r0, r1, c0, c1 = rect_px
    ck, rk = (first + last) / 2, (last - first + 1) / 2
    cy, ry = (r0 + r1 - 1) / 2, (r1 - r0) / 2
    cx, rx = (c0 + c1 - 1) / 2, (c1 - c0) / 2
    ys = ((np.arange(r0, r1) - cy) / ry)[:, None]
    xs = ((np.arange(c0, c1) - cx) / rx)[None, :]
    rho = np.sqrt(((index - ck) / rk) ** 2 + ys ** 2 + xs ** 2)
    inside_px = (1.0 - rho) * (rx + ry) / 2  # about the in-plane distance to the border near the middle slice
    return 1.0 / (1.0 + np.exp(-np.clip(inside_px / max(softness_px, 1e-3), -50, 50)))


@dataclass
class RoiParts:
    """What the tracking kept, for fusing the prior afterwards (``track_roi``)."""
    first: int
    last: int
    rect_px: Tuple[int, int, int, int]  # rows r0:r1, columns c0:c1 of the ROI rectangle on the slice
    chosen: Dict[int, Tuple[np.ndarray, np.ndarray]]  # slice -> (kept mask, its answer's logits in the rectangle)
    problem: Optional[object] = None  # select="path": the decoded candidates (roi_path.PathProblem), reusable


def fuse_with_prior(parts: RoiParts, shape, axis: str, cfg: RoiConfig) -> np.ndarray:
    """The tracked masks with the ellipsoid prior fused in (``RoiConfig.prior_weight``), on every ROI slice."""
    first, last, rect_px, chosen = parts.first, parts.last, parts.rect_px, parts.chosen
    r0, r1, c0, c1 = rect_px
    w = float(cfg.prior_weight)
    out = np.zeros(shape, np.uint8)
    slice_shape = geometry.slice_shape(shape, axis)
    for index in range(first, last + 1):
        q = ellipsoid_prior(first, last, rect_px, index, cfg.prior_softness_px)
        p = np.zeros_like(q)
        if index in chosen:
            mask, logits = chosen[index]
            if logits is None:
                raise ValueError("fuse_with_prior needs the answers' logits: run with RoiConfig(keep_logits=True)")
            p = 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float32) / max(cfg.prior_temperature, 1e-3), -50, 50)))
            p[(p > 0.5) & ~mask[r0:r1, c0:c1]] = 0.0  # components the tracking dropped stay dropped
        fused = np.zeros(slice_shape, np.uint8)
        fused[r0:r1, c0:c1] = (w * p + (1.0 - w) * q) > 0.5
        geometry.set_slice(out, axis, index, fused)
    return out


def _path_roi(session, cands, first, last, rect, axis, cfg, tick, t0, problem=None, tracked=None):
    from . import roi_path

    prob = problem if problem is not None else roi_path.build_problem(cands, first, last, rect, cands.rect_px,
                                                                      cfg.full_fill, tick, tracked)
    choice = roi_path.solve(prob, cfg.path_iou_weight, cfg.path_prior_weight, cfg.path_pair_weight,
                            cfg.path_empty_score)
    result = VolumeResult(np.zeros(session.shape, np.uint8), axis, seeds=[prob.middle])
    chosen = {}
    for index, (mask, iou, logits) in roi_path.masks_of(prob, choice).items():
        geometry.set_slice(result.mask, axis, index, mask.astype(np.uint8))
        chosen[index] = (mask, logits)
        result.scores[index] = iou
    kept = sorted(chosen)
    result.stopped["path"] = f"object on slices {kept[0]}..{kept[-1]}" if kept else "no object found"
    parts = RoiParts(first, last, cands.rect_px, chosen, prob)
    if cfg.prior_weight < 1.0:
        result.mask = fuse_with_prior(parts, session.shape, axis, cfg)
    result.encoded, result.seconds = cands.encoded, time.perf_counter() - t0
    return result, parts


def segment_roi(session, roi_ijk, axis: str = "axial", config: Optional[RoiConfig] = None,
                progress: Progress = None, should_stop: ShouldStop = None) -> VolumeResult:
    """Segment the object framed by a 3D box (inclusive IJK corners) on every slice inside it (see module
    docstring). Raises ``Cancelled`` (nothing changed) when ``should_stop()`` turns true."""
    return track_roi(session, roi_ijk, axis, config, progress, should_stop)[0]


def track_roi(session, roi_ijk, axis: str = "axial", config: Optional[RoiConfig] = None,
              progress: Progress = None, should_stop: ShouldStop = None,
              problem=None) -> Tuple[VolumeResult, Optional[RoiParts]]:
    """``segment_roi`` and what its tracking kept (None when no object was found on the middle slice).
    ``problem``: select="path" only, the candidates of an earlier call on the same ROI (no decoding)."""
    t0 = time.perf_counter()
    cfg = config or RoiConfig()
    if cfg.select not in ("track", "path"):
        raise InputError(f"RoiConfig.select must be 'track' or 'path', got {cfg.select!r}")
    geometry.check_axis(axis)
    first, last, rect = _roi_bounds(session, roi_ijk, axis)
    crop = session.crop_for(axis, rect, (first + last) // 2)  # one window (and CT window) for the whole ROI
    cands = _Candidates(session, axis, crop, rect, keep_logits=cfg.keep_logits or cfg.prior_weight < 1.0)
    sy, sx = geometry.slice_pixel_spacing(session.ijk_to_ras, axis)
    mx, my = cfg.margin_mm / sx, cfg.margin_mm / sy
    min_area = cfg.min_area_mm2 / (sx * sy)
    spacing_mm = geometry.slice_spacing(session.ijk_to_ras, axis)

    def min_overlap(prev) -> float:
        return tracking_min_overlap(cfg, int(prev.sum()), sx * sy, spacing_mm)

    h, w = cands.shape
    total, done = [last - first + 1], [0]

    def tick(index):
        if should_stop is not None and should_stop():
            raise Cancelled("ROI segmentation was stopped; the segmentation is unchanged")
        done[0] += 1
        if progress is not None:
            progress(min(done[0] / total[0], 1.0), f"{axis} slice {index}")

    middle = (first + last) // 2
    if cfg.select == "path":
        total[0] *= 2  # the tracking, then every slice's candidates
        if problem is not None:
            return _path_roi(session, cands, first, last, rect, axis, cfg, tick, t0, problem)
    tick(middle)
    seed_cands = cands(middle, rect)
    neighbours = [cands(n, rect) for n in (middle - cfg.seed_neighbours, middle + cfg.seed_neighbours)
                  if cfg.seed_neighbours and first <= n <= last and n != middle]
    scores = [_seed_score(m, iou, rect, neighbours, cfg) for m, iou in seed_cands]
    best = int(np.argmax(scores))
    seed, seed_iou = seed_cands[best]
    result = VolumeResult(np.zeros(session.shape, np.uint8), axis, seeds=[middle])
    chosen = {}  # slice -> (its kept mask, the logits of the answer it came from, in the rectangle)
    if not seed.any() or seed.sum() < min_area:
        if cfg.select == "path":
            return _path_roi(session, cands, first, last, rect, axis, cfg, tick, t0, None, {})
        result.stopped[f"{middle}"] = "no object on the middle slice"
        result.encoded, result.seconds = cands.encoded, time.perf_counter() - t0
        return result, None
    geometry.set_slice(result.mask, axis, middle, seed.astype(np.uint8))
    chosen[middle] = (seed, cands.logits(middle, rect, best))
    result.scores[middle] = seed_iou
    values = session.normalised_slice(axis, middle)[seed].astype(np.float32)
    seed_mean, seed_sd = float(values.mean()), max(float(values.std()), 4.0)
    for name, step, stop in (("down", -1, first - 1), ("up", +1, last + 1)):
        prev, index, why = seed, middle + step, "reached the end of the ROI"
        while index != stop:
            tick(index)
            options = [(m, iou, cfg.rect_bonus if n == 0 else 0.0, (rect, n))
                       for n, (m, iou) in enumerate(cands(index, rect, cfg.track_multimask))]
            bx0, by0, bx1, by1 = geometry.box_from_mask(prev)
            box = (max(bx0 - mx, rect[0], 0), max(by0 - my, rect[1], 0),
                   min(bx1 + mx, rect[2], w - 1), min(by1 + my, rect[3], h - 1))
            options += [(m, iou, 0.0, (box, n)) for n, (m, iou) in enumerate(cands(index, box, cfg.track_multimask))]
            k = int(np.argmax([_iou(m, prev) + bonus + cfg.iou_weight * iou for m, iou, bonus, _ in options]))
            mask, iou, _, (src_box, answer) = options[k]
            if mask.any():
                mask = keep_components_touching(mask.astype(np.uint8), _grown(prev, 2)) > 0
            if mask.sum() < min_area:
                why = f"object ended at slice {index} (area {int(mask.sum())} px)"
                break
            if _iou(mask, prev) < min_overlap(prev):
                why = f"object ended at slice {index} (overlap with the previous slice {_iou(mask, prev):.2f})"
                break
            mean = float(session.normalised_slice(axis, index)[mask].mean())
            if abs(mean - seed_mean) > cfg.intensity_tol * seed_sd:
                why = f"object ended at slice {index} (intensity {mean:.0f} vs {seed_mean:.0f} +- {seed_sd:.0f})"
                break
            geometry.set_slice(result.mask, axis, index, mask.astype(np.uint8))
            chosen[index] = (mask, cands.logits(index, src_box, answer))
            result.scores[index] = iou
            prev = mask
            index += step
        result.stopped[f"{middle} {name}"] = why
    if cfg.select == "path":  # the tracked answers join every slice's candidates
        tracked = {k: (m, result.scores[k], lg) for k, (m, lg) in chosen.items()}
        return _path_roi(session, cands, first, last, rect, axis, cfg, tick, t0, None, tracked)
    parts = RoiParts(first, last, cands.rect_px, chosen)
    if cfg.prior_weight < 1.0:
        result.mask = fuse_with_prior(parts, session.shape, axis, cfg)
    if progress is not None:
        progress(1.0, "done")
    result.encoded, result.seconds = cands.encoded, time.perf_counter() - t0
    log.info("ROI %s slices %d..%d, seed candidate %d of %d (scores %s), %.1f s, %d encoded: %s", axis, first, last,
             best, len(seed_cands), [round(s, 2) for s in scores], result.seconds, result.encoded, result.stopped)
    return result, parts
