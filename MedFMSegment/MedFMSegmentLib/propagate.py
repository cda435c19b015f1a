"""3D segmentation from a few prompts: slice-by-slice propagation, a pure function of a session.

```python
vol = propagate(session, axis="axial", progress=cb, should_stop=flag.is_set)   # -> VolumeResult
vol = propagate(session, axis="axial", previous=vol.mask, from_index=63)      # after a correction
vol = segment_roi(session, roi_ijk=((i0, j0, k0), (i1, j1, k1)), axis="axial")
```

Every slice the user prompted on ``axis`` is a fixed seed: its mask is kept as the user left it and
never overwritten. From each seed the object is carried outward one slice at a time: the previous
slice's mask, grown by a margin (at least one slice spacing: thick slices), becomes the next slice's
box. Propagation stops where the object ends (empty mask, area collapse, a sliver of the object's
largest section, intensity away from the seed's (optionally: unless the next slice is like it), or
predicted IoU below a floor), at the volume's edge, at the ROI's edge, or where it meets the next seed
(slices between two seeds take the nearer seed's result). A walk from a corrected slice compares with
the object's section behind it, so a correction on the object's last slice does not walk on past it.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import geometry, review as review_features
from .errors import Cancelled, InputError
from .masks2d import dilate
from .session import keep_components_touching

log = logging.getLogger(__name__)

from .results import Progress, ShouldStop, VolumeResult  # noqa: E402,F401  (public here)
from .shape_interp import interpolate_shape  # noqa: E402  (public here)


@dataclass
class PropagationConfig:
    # Measured on the demo sample (Thalamus_L / Putamen_L 3D Dice): 1 mm 0.52 / -, 2 mm 0.66 / 0.61,
    # 1 mm + 10 % of the side 0.74 / 0.39 (leaks into neighbours).
    margin_mm: float = 2.0  # grow the previous mask's box by this much for the next slice ...
    margin_frac: float = 0.0  # ... plus this fraction of the box's side
    # ... and at least this many slice spacings (mm): a border inclined at 45 degrees moves one spacing
    # in-plane per slice, so a 6.5 mm slice needs a 6.5 mm margin (thin slices keep margin_mm)
    margin_slices: float = 1.0
    min_score: float = 0.35  # predicted IoU below this ends the object
    min_area_mm2: float = 4.0  # smaller masks end the object
    min_area_ratio: float = 0.2  # area / previous area below this ends the object
    max_area_ratio: float = 3.0  # a sudden jump is a leak: the object ends
    min_overlap: float = 0.3  # IoU with the previous slice's mask below this: the object ends
    # The two thresholds above hold for a slice spacing small against the object; for a thick slice the
    # expected change is that of a 45-degree border: a disc of radius r (mm, the previous mask's
    # equivalent radius) becomes r + spacing, area ratio ((r + s) / r)^2 and IoU (r / (r + s))^2; the
    # thresholds are loosened to that expected change (scaled by these factors) when it is larger.
    slope_area_factor: float = 1.0  # max area ratio >= this x ((r + s) / r)^2
    slope_overlap_factor: float = 0.5  # min overlap <= this x (r / (r + s))^2
    # area below this fraction of the object's largest known section (the seed, the walk so far, for a
    # walk from a correction the fixed slice behind it): the object ends. bench_3d, 6 structures, mean
    # 3D Dice by fraction 0 / 0.15 / 0.25 / 0.3 / 0.35: 0.536 / 0.539 / 0.552 / 0.555 / 0.541 (the gain:
    # Pallidum_L's up walk drifting off the object, T12's ends); leave-one-dataset-out picks 0.3 (0.35
    # with the chest CT held out), held out 0.548
    min_sliver_frac: float = 0.25
    intensity_tol: float = 1.0  # mean intensity further than this many seed SDs from the seed's: ends
    # With the look-ahead, a slice failing on intensity alone is kept when the next one passes every check (walks
    # from a prompted slice). One box: held out (leave-one-dataset-out, two boxes) Colin27 0.387 -> 0.394, chest CT
    # 0.664 -> 0.659, tumour 0.524 -> 0.647; but the correction loop lost (bench_effort Tumour / Amygdala_L, mean
    # 3D Dice over 10 corrections, guided 0.767 / 0.833 -> 0.775 / 0.795, oracle 0.908 / 0.853 -> 0.707 / 0.831).
    intensity_look_ahead: bool = False  # off: README "Session 10: where one box + propagation stops"
    min_stability: float = 0.0  # Dice of the mask with its jittered-box mask below this: the object ends
    # Between two fixed slices of which at least one is pinned (a correction): the prompt is the
    # shape interpolated between them (centroid-aligned signed distances), the result the model's
    # probability fused with it; the model's weight grows with the distance to the nearer fixed slice.
    fill_model_weight: float = 0.5
    fill_ramp_slices: float = 4.0
    prior_softness_px: float = 1.0  # signed distance -> probability: sigmoid(distance / this)
    jitter_px: float = 3.0  # the confidence's jittered box: grown by this many pixels on every side
    # review confidence = weighted mean of the per-slice signals present (see VolumeResult.signals),
    # times exp(-distance / confidence_decay_slices): the distance to the nearest fixed slice ranks the
    # true slice Dice best of the signals measured (bench_effort, Thalamus_L: Spearman 0.84 alone, the
    # model signals 0.16-0.26; with the decay, guided rows: Thalamus_L 0.82, Putamen_L 0.53, Pallidum_L
    # 0.44, CT_intracranial 0.02, was 0.27 / -0.10 without); a border slice's confidence (the object
    # really ends there) grows with its distance instead: a walk that stops right next to its seed
    # probably stopped too early.
    confidence_weights: Tuple[Tuple[str, float], ...] = (("iou", 1.0), ("jitter", 1.0), ("agree", 1.0))
    confidence_decay_slices: float = 10.0
    # The two weights above make the *base* confidence: review.slice_features' "confidence" / "log_doubt"
    # and the expected wrong pixels of its sums, what the review order's weights were fitted on. The
    # confidence a result reports (VolumeResult.confidence / review) is its own rule, ``review_confidence``:
    # the weighted mean of these signals times exp(-distance / value_decay_slices), x (1 - outside_factor)
    # beyond the outermost fixed slice (walks toward an end: the corrections' true Dice there is lower), x
    # ((1 - area_weight) + area_weight x the slice's area over the result's largest section) (slivers near
    # the ends go wrong). bench_effort guided rows, 11 structures, Spearman with the true slice Dice, chosen
    # leave-one-dataset-out from a grid (decay 10 / 20, with / without agree, outside 0 / 0.2 / 0.5, area
    # 0 / 0.25 / 0.5): held out 0.643, the base confidence 0.54 (fit in README, "Correction loop").
    value_weights: Tuple[Tuple[str, float], ...] = (("iou", 1.0), ("jitter", 1.0))
    value_decay_slices: float = 20.0
    value_outside_factor: float = 0.2
    value_area_weight: float = 0.5
    # The review order: None (the default) sorts by expected_wrong of the base confidence, (1 - confidence) x
    # area; weights sort by the predicted wrong pixels, (1 + area) x exp(review_order . features) - 1
    # (review.slice_features; Testing/benchmarks/fit_review.py fits them: ridge least squares of log((1 +
    # wrong) / (1 + area)) on bench_effort's review rows). Not the default: fitted leave-one-dataset-out
    # they lost held out (bench_effort, 11 structures, guided mean 3D Dice over 10 corrections 0.668 vs
    # 0.696, reached 0.90 on 1 vs 2 structures; in sample 0.706, 4 structures: README "Correction loop").
    review_order: Optional[Tuple[Tuple[str, float], ...]] = None


def _check_callbacks(should_stop: ShouldStop):
    if should_stop is not None and should_stop():
        raise Cancelled("propagation was stopped; the segmentation is unchanged")


def _grow_box(box, shape_yx, mx, my, clamp=None):
    x0, y0, x1, y1 = box
    h, w = shape_yx
    x0, y0, x1, y1 = max(x0 - mx, 0), max(y0 - my, 0), min(x1 + mx, w - 1), min(y1 + my, h - 1)
    if clamp is not None:
        cx0, cy0, cx1, cy1 = clamp
        x0, y0, x1, y1 = max(x0, cx0), max(y0, cy0), min(x1, cx1), min(y1, cy1)
        if x1 < x0 or y1 < y0:
            return None
    return x0, y0, x1, y1


def _dice2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


class _Runner:
    """Model runs of one propagation call: window reuse (cached embeddings), signals, bookkeeping."""

    def __init__(self, session, axis, cfg, result, crops, tick, should_stop, decodes=None, adapter_id=None):
        self.session, self.axis, self.cfg, self.result = session, axis, cfg, result
        self.crops, self.tick, self.should_stop = crops, tick, should_stop
        self.decodes = decodes or {}  # the previous result's decodes (re-propagation)
        self.decode_tag = (adapter_id, repr(session.config))
        self.shape_yx = geometry.slice_shape(session.shape, axis)
        sy, sx = geometry.slice_pixel_spacing(session.ijk_to_ras, axis)
        self.spacing_mm = geometry.slice_spacing(session.ijk_to_ras, axis)
        margin = max(cfg.margin_mm, cfg.margin_slices * self.spacing_mm)
        self.mx, self.my = margin / sx, margin / sy
        self.pixel_mm2 = sx * sy
        self.min_area = cfg.min_area_mm2 / (sx * sy)
        self.last_crop = None  # the window of the slice walked last (reused while the object fits)

    def change_limits(self, prev_area: int) -> Tuple[float, float]:
        """(max area ratio, min overlap) from the previous slice to the next: the configured limits,
        loosened to a 45-degree border's change when the slice spacing is large against the object."""
        cfg = self.cfg
        r = float(np.sqrt(max(prev_area, 1) * self.pixel_mm2 / np.pi))
        grow = ((r + self.spacing_mm) / r) ** 2
        return max(cfg.max_area_ratio, cfg.slope_area_factor * grow), min(cfg.min_overlap, cfg.slope_overlap_factor / grow)

    def box_around(self, mask, clamp=None):
        box = geometry.box_from_mask(mask)
        if box is None:
            return None
        fx = self.cfg.margin_frac * (box[2] - box[0] + 1)
        fy = self.cfg.margin_frac * (box[3] - box[1] + 1)
        return _grow_box(box, self.shape_yx, self.mx + fx, self.my + fy, clamp)

    def predict(self, index, box, remember: bool = True):
        """(logits, score, mask, jitter Dice) on a slice; the slice's earlier window is reused if the box fits.
        ``remember``: keep the slice's window for later calls (not for a look-ahead past a stop)."""
        s = self.session
        crop = self.crops.get(index)
        if crop is None or not s.window_fits(self.axis, crop, box):
            # the previous slice's window while the object fits in it: the slice ahead, encoded in the
            # background in that window, is then the one this walk asks for next
            last = self.last_crop
            crop = last if last is not None and s.window_fits(self.axis, last, box) else s.crop_for(self.axis, box, index)
        self.last_crop = crop
        s.look_ahead(self.axis, index, crop, walking=True)  # encode the next slice ahead in this window
        before = s.cache.misses
        logits, score, mask = self.decode(index, box, crop)
        self.result.encoded += s.cache.misses - before
        if remember:  # the window the slice was decoded in (online adaptation reads its embedding there)
            self.crops[index] = crop
        j = self.cfg.jitter_px
        jbox = _grow_box(box, self.shape_yx, j, j)
        jitter = 1.0
        if j > 0 and s.window_fits(self.axis, crop, jbox):
            _, _, jmask = self.decode(index, jbox, crop)  # same window: decoder only
            jitter = _dice2(keep_components_touching(jmask, mask > 0) if mask.any() else jmask, mask)
        if index not in self.result.recomputed:  # a look-ahead slice (see _walk) may be asked for twice
            self.result.recomputed.append(index)
        return logits, score, mask, jitter

    def decode(self, index, box, crop):
        """``session.predict`` of a box through a window, or the same prompt's result from the previous call
        (the decoder is deterministic on a cached embedding: the result is identical)."""
        key = (self.session._key(self.axis, index, crop), tuple(float(v) for v in box), self.decode_tag)
        out = self.result.decodes.get(key) or self.decodes.get(key)
        if out is None:
            out = self.session.predict(self.axis, index, box, crop=crop)
            self.result.decoded += 1
        self.result.decodes[key] = out
        return out

    def accept(self, index, mask, signals):
        geometry.set_slice(self.result.mask, self.axis, index, mask)
        self.result.signals[index] = signals


def _walk(run: _Runner, start_mask, start, stop, step, fixed, clamp_box, largest: int = 0,
          object_values: Sequence[np.ndarray] = (), corrected: bool = False) -> str:
    """Carry ``start_mask`` from slice ``start`` toward ``stop`` (exclusive) in direction ``step``.

    ``largest``: the object's largest section (pixels) known behind the start (a walk from a slice
    corrected at the object's end knows the object was larger): a mask below ``min_sliver_frac`` of
    the largest section seen ends the object. ``object_values``: the object's intensities on each of the
    other corrected slices (``_pinned_values``), pooled with the start slice's for the intensity check;
    ``corrected``: the start slice is a correction (no intensity look-ahead: it is what the object looks like).
    """
    session, axis, cfg, result = run.session, run.axis, run.cfg, run.result
    largest = max(int(largest), int((start_mask > 0).sum()))
    # windows are reused along one walk only: never the window another walk ended in, so a walk's masks
    # do not depend on the walks before it (bench_3d Pallidum_L: 0.152 or 0.242 by the down walk's end;
    # starting in the seed's own window instead: no better on Pallidum_L / Tumour)
    run.last_crop = None
    seed_values = session.normalised_slice(axis, start)[start_mask > 0].astype(np.float32)
    looks = [(float(seed_values.mean()), max(float(seed_values.std()), 4.0), "the start slice")]
    if object_values:  # pooled over the corrected slices: the mean of all their pixels, the SD within a slice
        parts = [seed_values] + list(object_values)
        n = sum(p.size for p in parts)
        looks.append((float(sum(float(p.sum()) for p in parts) / n),
                      max(float(np.sqrt(sum(p.size * float(p.var()) for p in parts) / n)), 4.0),
                      f"{len(parts)} corrected slices"))
    prev, index, n = start_mask, start + step, geometry.num_slices(session.shape, axis)
    look_ahead = cfg.intensity_look_ahead and not corrected

    def border(why, score=None):  # the slice past the object's end: the user may want to extend it
        if 0 <= index < n and index not in fixed:
            result.signals[index] = {"border": 1.0 - (score if score is not None else 0.0),
                                     "distance": float(abs(index - start)), "area": float((prev > 0).sum())}
        return why

    def step_to(index, prev, remember=True):  # the next slice's (score, mask, jitter) from the previous slice's mask
        box = run.box_around(prev, clamp_box)
        if box is None:
            return None
        _, score, mask, jitter = run.predict(index, box, remember)  # keep what continues the previous slice
        return score, keep_components_touching(mask, dilate(prev > 0, 2)) if mask.any() else mask, jitter

    def check(index, score, mask, jitter, prev, largest):
        """Why slice ``index`` ends the object (None: it continues it) and whether that is the intensity rule."""
        area, prev_area = int(mask.sum()), int(prev.sum())
        max_ratio, min_overlap = run.change_limits(prev_area)
        overlap = (mask & (prev > 0)).sum() / max(((mask > 0) | (prev > 0)).sum(), 1)
        for bad, why in ((area < run.min_area, f"object ended at slice {index} (area {area} px)"),
                         (score < cfg.min_score, f"object ended at slice {index} (predicted IoU {score:.2f})"),
                         (area < cfg.min_area_ratio * prev_area,
                          f"object ended at slice {index} (area fell from {prev_area} to {area} px)"),
                         (area > max_ratio * prev_area,
                          f"stopped at slice {index}: area jumped from {prev_area} to {area} px (leak)"),
                         (overlap < min_overlap,
                          f"object ended at slice {index} (overlap with the previous slice {overlap:.2f})"),
                         (jitter < cfg.min_stability,
                          f"object ended at slice {index} (unstable under a jittered box: {jitter:.2f})")):
            if bad:  # the first failing check, in this order
                return why, False
        sliver = area < cfg.min_sliver_frac * largest
        mean = float(session.normalised_slice(axis, index)[mask > 0].mean())
        unlike = [(m, sd, what) for m, sd, what in looks if abs(mean - m) > cfg.intensity_tol * sd]
        if unlike:  # unlike the slice it starts from, or unlike the object the corrections show
            m, sd, what = unlike[-1]
            return (f"object ended at slice {index} (intensity {mean:.0f} vs {m:.0f} +- {sd:.0f} on {what})",
                    not sliver)
        if sliver:
            return (f"object ended at slice {index} (area {area} px, a sliver of its largest section "
                    f"{largest} px)"), False
        return None, False

    while index != stop:
        if index in fixed:
            return f"reached seed slice {index}"
        if not 0 <= index < n:
            return "reached the edge of the volume"
        _check_callbacks(run.should_stop)
        if (out := step_to(index, prev)) is None:
            return f"left the ROI at slice {index}"
        score, mask, jitter = out
        area = int(mask.sum())
        run.tick(index)
        why, by_intensity = check(index, score, mask, jitter, prev, largest)
        ahead = index + step  # a slice unlike the seed's intensity alone, next to one that continues the object: kept
        if why and by_intensity and look_ahead and ahead != stop and ahead not in fixed and 0 <= ahead < n:
            if (nxt := step_to(ahead, mask, False)) and check(ahead, *nxt, mask, max(largest, area))[0] is None:
                why = None
        if why is not None:
            return border(why, score if area else 0.0)
        largest = max(largest, area)
        run.accept(index, mask, {"iou": score, "jitter": jitter, "agree": _dice2(mask, prev),
                                 "distance": float(abs(index - start)), "area": float(area)})
        result.scores[index] = score
        prev = mask
        index += step
    return "reached the end of the range"


def _fill(run: _Runner, a, b, mask_a, mask_b) -> str:
    """Slices strictly between fixed slices ``a`` < ``b`` (both non-empty): interpolation + model, fused."""
    cfg = run.cfg
    run.last_crop = None
    for index in range(a + 1, b):
        _check_callbacks(run.should_stop)
        t = (index - a) / (b - a)
        sdf = interpolate_shape(mask_a, mask_b, t)
        prior = (sdf > 0).astype(np.uint8)
        distance = float(min(index - a, b - index))
        run.tick(index)
        if not prior.any():
            run.accept(index, prior, {"agree": 0.0, "distance": distance, "area": 0.0})
            continue
        box = run.box_around(prior)
        logits, score, model_mask, jitter = run.predict(index, box)
        w = cfg.fill_model_weight * min(1.0, distance / max(cfg.fill_ramp_slices, 1e-6))
        logits_t = np.clip(logits - run.session.config.mask_threshold, -30, 30)
        p = w / (1 + np.exp(-logits_t)) + (1 - w) / (1 + np.exp(-np.clip(sdf / cfg.prior_softness_px, -30, 30)))
        mask = (p > 0.5).astype(np.uint8)
        if mask.any():
            mask = keep_components_touching(mask, prior > 0)
        run.accept(index, mask, {"iou": score, "jitter": jitter, "agree": _dice2(model_mask, prior),
                                 "distance": distance, "area": float(max(mask.sum(), prior.sum()))})
    return "filled between the fixed slices"


def confidence_of(signals: Dict[str, float], cfg: PropagationConfig) -> float:
    """One slice's review confidence in [0, 1] from its signals (see ``PropagationConfig.confidence_weights``)."""
    tau = max(float(cfg.confidence_decay_slices), 1e-6)
    decay = float(np.exp(-float(signals.get("distance", 0.0)) / tau)) if cfg.confidence_decay_slices > 0 else 1.0
    if "border" in signals:
        grow = 1.0 - decay if cfg.confidence_decay_slices > 0 else 1.0
        return float(np.clip(signals["border"] * grow, 0.0, 1.0))
    num = den = 0.0
    for name, weight in cfg.confidence_weights:
        if name in signals:
            num += weight * float(signals[name])
            den += weight
    return float(np.clip(decay * num / den, 0.0, 1.0)) if den else 0.5 * decay


def review_confidence(signals: Optional[Dict[str, float]], features: Dict[str, float], cfg: PropagationConfig) -> float:
    """The confidence a result reports for a slice (``PropagationConfig.value_*``): from its signals (a slice
    without any, e.g. a prompted one: its base confidence, ``features["confidence"]``) and its
    ``review.slice_features``."""
    if signals:
        c = confidence_of(signals, PropagationConfig(confidence_weights=cfg.value_weights,
                                                     confidence_decay_slices=cfg.value_decay_slices))
    else:
        c = float(features.get("confidence", 0.5))
    c *= 1.0 - cfg.value_outside_factor * float(features.get("outside", 0.0))
    c *= 1.0 - cfg.value_area_weight + cfg.value_area_weight * float(features.get("rel_area", 1.0))
    return float(np.clip(c, 0.0, 1.0))


def expected_wrong(signals: Dict[str, float], confidence: float) -> float:
    """Pixels a review of the slice probably fixes: (1 - confidence) x the slice's (or, past an end,
    the last slice's) mask area. The review list is ordered by it: a doubtful large slice before a
    doubtful sliver (the simulated oracle user picks the slice with the most wrong voxels)."""
    return (1.0 - float(confidence)) * float(signals.get("area", 1.0))


def _mask_digest(mask: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(mask > 0).tobytes()).hexdigest()[:16]


def _plan(session, axis, fixed, seeds, lo, hi, pinned):
    """The jobs of a propagation: ("walk", seed, stop, step) and ("fill", a, b), and what each covers."""
    jobs = []
    mask = {f: session.slice_state(axis, f).mask for f in fixed}
    empty = {f: not mask[f].any() for f in fixed}
    for s in seeds:
        below = [f for f in fixed if f < s]
        above = [f for f in fixed if f > s]
        for name, step, nb, edge in (("down", -1, below[-1] if below else None, lo - 1),
                                     ("up", +1, above[0] if above else None, hi + 1)):
            if empty[s]:
                continue
            if nb is None:
                jobs.append((name, ("walk", s, edge, step)))
            elif empty[nb]:
                jobs.append((name, ("walk", s, nb, step)))  # toward an empty slice: never crosses it
            elif s in pinned or nb in pinned:
                a, b = sorted((s, nb))
                jobs.append((name, ("fill", a, b)))
            else:  # two prompted (not corrected) slices: each takes the half nearer to it
                mid = (s + nb) // 2 + (1 if step > 0 else 0)
                jobs.append((name, ("walk", s, mid, step)))
    out, seen = [], set()
    for name, job in jobs:
        if job in seen:
            continue
        seen.add(job)
        if job[0] == "walk":
            _, s, stop, step = job
            cover = (s + 1, stop - 1) if step > 0 else (stop + 1, s - 1)
            cover = (max(cover[0], lo), min(cover[1], hi))
            sig = ("walk", s, stop, step, _mask_digest(mask[s]))
        else:
            _, a, b = job
            cover, sig = (a + 1, b - 1), ("fill", a, b, _mask_digest(mask[a]), _mask_digest(mask[b]))
        out.append((name, job, cover, sig))
    return out, empty


def _largest_behind(session, axis, fixed, empty, pinned, start, step) -> int:
    """A walk from a corrected (pinned) slice knows the object's section on the nearest non-empty fixed
    slice behind it: its area (pixels), which the sliver check then compares with; 0 for other walks."""
    if start not in pinned:
        return 0
    behind = [f for f in fixed if (f - start) * step < 0 and not empty[f]]
    if not behind:
        return 0
    nearest = min(behind, key=lambda f: abs(f - start))
    return int((session.slice_state(axis, nearest).mask > 0).sum())


def _pinned_values(session, axis, pinned, start) -> List[np.ndarray]:
    """For a walk from a corrected slice ``start``: the object's intensities on the other corrected (pinned)
    slices, what the user showed the object to look like (none for a walk from a prompted slice, whose
    result then does not depend on corrections elsewhere). A slice unlike the start slice or unlike the
    corrections pooled ends the walk: one slice's statistics let a walk from a correction leak into a
    neighbour a little darker than the object (bench_effort Tumour, oracle: the up walk from corrected
    slice 15, 111 +- 22, took five slices of oedema at 90 after the object's end; the three corrected
    slices pooled, 118 +- 23 within a slice, stop it there; oracle 3D Dice after 3 corrections, mean of
    11 structures, 0.713 -> 0.748, after 10 0.919 -> 0.918). Pooling alone (the pooled SD across slices)
    let Amygdala_L's walk run past its end instead."""
    if start not in pinned:
        return []
    parts = [session.normalised_slice(axis, f)[session.slice_state(axis, f).mask > 0].astype(np.float32)
             for f in sorted(pinned) if f != start]
    return [p for p in parts if p.size]


def propagate(session, axis: Optional[str] = None, direction: str = "both", seeds: Optional[Sequence[int]] = None,
              previous=None, from_index: Optional[int] = None,
              limits: Optional[Tuple[int, int]] = None, clamp_box=None,
              config: Optional[PropagationConfig] = None, progress: Progress = None,
              should_stop: ShouldStop = None) -> VolumeResult:
    """Carry the session's prompted and pinned slices through the volume along ``axis`` (module docstring).

    - ``seeds``: slice indices to start from (default: every prompted slice on ``axis``);
    - ``previous``: a ``VolumeResult`` of an earlier call: only the slices whose result can change
      (those next to a fixed slice that was added, changed or removed, or all after the adapter
      changed) are recomputed, the rest is kept, and the slices' model windows are reused;
    - ``previous`` as a mask + ``from_index``: re-propagate after a correction on slice ``from_index``:
      only the slices between its neighbouring seeds are recomputed, the rest of ``previous`` is kept;
    - ``limits``: inclusive (first, last) slice range; ``clamp_box``: boxes never leave this 2D box;
    - ``progress(fraction, message)``, ``should_stop()``: raise ``Cancelled`` and change nothing.
    """
    t0 = time.perf_counter()
    cfg = config or PropagationConfig()
    prompted = session.prompted_slices()
    if axis is None:
        axes = [a for a, _ in prompted]
        if not axes:
            raise InputError("nothing to propagate: prompt at least one slice first")
        axis = max(set(axes), key=axes.count)
    geometry.check_axis(axis)
    if direction not in ("both", "up", "down"):
        raise InputError(f"direction must be both, up or down, got {direction!r}")
    n = geometry.num_slices(session.shape, axis)
    fixed = sorted({i for a, i in prompted if a == axis})
    pinned = {i for a, i in session.pinned_slices(axis)}
    seeds = sorted(fixed if seeds is None else {int(s) for s in seeds})
    if not seeds:
        raise InputError(f"no prompted slice on the {axis} axis to propagate from")
    for s in seeds:
        if (axis, s) not in prompted:
            raise InputError(f"{axis} slice {s} has no prompt: it cannot seed propagation")
    lo, hi = (0, n - 1) if limits is None else (max(int(limits[0]), 0), min(int(limits[1]), n - 1))
    result = VolumeResult(np.zeros(session.shape, np.uint8), axis, seeds=list(seeds), pinned=sorted(pinned))
    kept: Optional[VolumeResult] = None
    if isinstance(previous, VolumeResult):
        if previous.mask.shape != tuple(session.shape) or previous.axis != axis:
            raise InputError(f"previous result is on the {previous.axis} axis with shape {previous.mask.shape}; "
                             f"this propagation is {axis} on {session.shape}")
        kept = previous
        result.crops = dict(previous.crops)
    elif previous is not None:
        previous = np.asarray(previous)
        if previous.shape != tuple(session.shape):
            raise InputError(f"previous mask has shape {previous.shape}, the volume {session.shape}")
        result.mask[...] = previous > 0
    adapter_id = getattr(session.adapter, "digest", None if session.adapter is None else id(session.adapter))
    if from_index is not None:
        if from_index not in fixed:
            raise InputError(f"{axis} slice {from_index} has no prompt: nothing to re-propagate from")
        seeds = [from_index]
        result.seeds = [from_index]
    plan, empty = _plan(session, axis, fixed, seeds, lo, hi, pinned)
    plan = [p for p in plan if direction == "both" or p[0] == direction]
    ax = geometry.array_axis(axis)

    def clear(first, last):
        if first <= last:
            sl = [slice(None)] * 3
            sl[ax] = slice(first, last + 1)
            result.mask[tuple(sl)] = 0

    todo = []
    for name, job, cover, sig in plan:
        sig = sig + (adapter_id, repr(cfg), None if clamp_box is None else tuple(clamp_box))
        if job[0] == "walk":  # a walk also depends on the object's size behind it and its intensities
            pool = tuple((f, _mask_digest(session.slice_state(axis, f).mask)) for f in sorted(pinned)
                         if job[1] in pinned and f != job[1])  # the slices _pinned_values pools
            sig = sig + (_largest_behind(session, axis, fixed, empty, pinned, job[1], job[3]), pool, job[1] in pinned)
        if kept is not None and sig in kept.jobs:  # same bounds, same masks, same model: keep it
            first, last = kept.jobs[sig]
            sl = [slice(None)] * 3
            sl[ax] = slice(first, last + 1)
            result.mask[tuple(sl)] = kept.mask[tuple(sl)]
            for i in range(first, last + 1):
                if i in kept.signals:
                    result.signals[i] = kept.signals[i]
                if i in kept.scores:
                    result.scores[i] = kept.scores[i]
            result.jobs[sig] = (first, last)
            for key, out in kept.decodes.items():  # a later call may recompute these slices: keep their decodes
                if first <= key[0][5] <= last:
                    result.decodes[key] = out
            continue
        if previous is not None and not isinstance(previous, VolumeResult):
            clear(*cover)  # the corrected seed's own range is recomputed; the rest is kept
        todo.append((name, job, cover, sig))
    for s in fixed:  # user slices are fixed: their masks stand as they are
        geometry.set_slice(result.mask, axis, s, session.slice_state(axis, s).mask)
    total = max(sum(max(c[1] - c[0] + 1, 0) for _, _, c, _ in todo), 1)
    done = [0]

    def tick(index):
        done[0] += 1
        if progress is not None:
            progress(min(done[0] / total, 1.0), f"{axis} slice {index}")

    run = _Runner(session, axis, cfg, result, result.crops, tick, should_stop,
                  decodes=kept.decodes if kept is not None else None, adapter_id=adapter_id)
    for s in seeds:
        if empty[s] and (s not in pinned or len(fixed) == 1):
            result.stopped[f"{s}"] = "seed mask is empty"
    fixed_set = set(fixed)
    for name, job, cover, sig in todo:
        if job[0] == "walk":
            _, s, stop, step = job
            mask = session.slice_state(axis, s).mask
            result.stopped[f"{s} {name}"] = _walk(run, mask, s, stop, step, fixed_set - {s}, clamp_box,
                                                  _largest_behind(session, axis, fixed, empty, pinned, s, step),
                                                  _pinned_values(session, axis, pinned, s), s in pinned)
        else:
            _, a, b = job
            result.stopped[f"{a}-{b}"] = _fill(run, a, b, session.slice_state(axis, a).mask,
                                               session.slice_state(axis, b).mask)
        result.jobs[sig] = cover
    for i in fixed:
        result.signals.pop(i, None)
    touched = set(np.nonzero(result.mask.any(axis=tuple(x for x in range(3) if x != ax)))[0].tolist())
    wrong = {}
    for i, sig in result.signals.items():  # only slices the result touches or borders are reviewed
        if i in touched or "border" in sig:
            result.confidence[i] = round(confidence_of(sig, cfg), 4)
            wrong[i] = expected_wrong(sig, result.confidence[i])
    for i in touched - fixed_set - set(result.confidence):
        result.confidence[i] = 0.5
    for i in fixed_set - pinned:  # a prompted slice is the model's answer too: the user may review it
        if lo <= i <= hi:
            st = session.slice_state(axis, i)
            result.confidence[i] = round(float(st.score), 4)
            wrong[i] = expected_wrong({"area": float((st.mask > 0).sum())}, result.confidence[i])
    for i in result.confidence:
        wrong.setdefault(i, expected_wrong({"area": float(geometry.get_slice(result.mask, axis, i).sum())},
                                           result.confidence[i]))
    result.features = review_features.slice_features(result.signals, result.mask, axis, fixed, fixed_set - pinned,
                                                     indices=list(result.confidence), scores=result.confidence)
    for i, f in result.features.items():  # the reported confidence and the order: separate rules
        result.confidence[i] = round(review_confidence(result.signals.get(i), f, cfg), 4)
        if cfg.review_order:
            wrong[i] = float((1 + np.expm1(f["log_area"])) * np.exp(review_features.linear(f, cfg.review_order)) - 1)
    result.review = [{"axis": axis, "index": int(i), "confidence": c, "expected_wrong": round(wrong[i], 1)}
                     for i, c in sorted(result.confidence.items(), key=lambda kv: (-wrong[kv[0]], kv[1], kv[0]))]
    if progress is not None:
        progress(1.0, "done")
    result.seconds = time.perf_counter() - t0
    log.info("propagated %s from seeds %s in %.1f s (%d slices computed, %d encoded): %s", axis, seeds,
             result.seconds, len(result.recomputed), result.encoded, result.stopped)
    return result


def segment_roi(session, roi_ijk, axis: str = "axial", config: Optional[PropagationConfig] = None,
                progress: Progress = None, should_stop: ShouldStop = None) -> VolumeResult:
    """Segment the object framed by a 3D box (inclusive IJK corners): see ``roi.segment_roi``.

    Kept here for existing callers; a ``PropagationConfig`` passes its margin and minimum area on.
    """
    from . import roi

    cfg = None if config is None else roi.RoiConfig(margin_mm=config.margin_mm, min_area_mm2=config.min_area_mm2)
    return roi.segment_roi(session, roi_ijk, axis=axis, config=cfg, progress=progress, should_stop=should_stop)
