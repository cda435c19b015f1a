"""3D segmentation from a few prompts: slice-by-slice propagation, a pure function of a session.

```python
vol = propagate(session, axis="axial", progress=cb, should_stop=flag.is_set)   # -> VolumeResult
vol = propagate(session, axis="axial", previous=vol.mask, from_index=63)      # after a correction
vol = segment_roi(session, roi_ijk=((i0, j0, k0), (i1, j1, k1)), axis="axial")
```

Every slice the user prompted on ``axis`` is a fixed seed: its mask is kept as the user left it and
never overwritten. From each seed the object is carried outward one slice at a time: the previous
slice's mask, grown by a margin, becomes the next slice's box. Propagation stops where the object
ends (empty mask, area collapse or predicted IoU below a floor), at the volume's edge, at the ROI's
edge, or where it meets the next seed (slices between two seeds take the nearer seed's result).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import geometry
from .errors import Cancelled, InputError
from .session import keep_components_touching

log = logging.getLogger(__name__)

Progress = Optional[Callable[[float, str], None]]
ShouldStop = Optional[Callable[[], bool]]


@dataclass
class PropagationConfig:
    # Measured on the demo sample (Thalamus_L / Putamen_L 3D Dice): 1 mm 0.52 / -, 2 mm 0.66 / 0.61,
    # 1 mm + 10 % of the side 0.74 / 0.39 (leaks into neighbours).
    margin_mm: float = 2.0  # grow the previous mask's box by this much for the next slice ...
    margin_frac: float = 0.0  # ... plus this fraction of the box's side
    min_score: float = 0.35  # predicted IoU below this ends the object
    min_area_mm2: float = 4.0  # smaller masks end the object
    min_area_ratio: float = 0.2  # area / previous area below this ends the object
    max_area_ratio: float = 3.0  # a sudden jump is a leak: the object ends
    min_overlap: float = 0.3  # IoU with the previous slice's mask below this: the object ends
    intensity_tol: float = 1.0  # mean intensity further than this many seed SDs from the seed's: ends


@dataclass
class VolumeResult:
    mask: np.ndarray  # uint8 [k, j, i]
    axis: str
    scores: Dict[int, float] = field(default_factory=dict)  # slice index -> predicted IoU
    seeds: List[int] = field(default_factory=list)
    stopped: Dict[str, str] = field(default_factory=dict)  # "down"/"up" per seed -> why it stopped
    seconds: float = 0.0
    encoded: int = 0  # slices whose image embedding had to be computed


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


def _walk(session, axis, start_mask, start, stop, step, cfg, clamp_box, result, fixed, progress_tick,
          should_stop) -> str:
    """Carry ``start_mask`` from slice ``start`` toward ``stop`` (exclusive) in direction ``step``."""
    shape_yx = geometry.slice_shape(session.shape, axis)
    sy, sx = geometry.slice_pixel_spacing(session.ijk_to_ras, axis)
    mx, my = cfg.margin_mm / sx, cfg.margin_mm / sy
    min_area = cfg.min_area_mm2 / (sx * sy)
    seed_values = session.normalised_slice(axis, start)[start_mask > 0].astype(np.float32)
    seed_mean, seed_sd = float(seed_values.mean()), max(float(seed_values.std()), 4.0)
    prev = start_mask
    index = start + step
    while index != stop:
        if index in fixed:
            return f"reached seed slice {index}"
        if not 0 <= index < geometry.num_slices(session.shape, axis):
            return "reached the edge of the volume"
        _check_callbacks(should_stop)
        box = geometry.box_from_mask(prev)
        if box is not None:
            fx, fy = cfg.margin_frac * (box[2] - box[0] + 1), cfg.margin_frac * (box[3] - box[1] + 1)
            box = _grow_box(box, shape_yx, mx + fx, my + fy, clamp_box)
        if box is None:
            return f"left the ROI at slice {index}"
        before = session.cache.misses
        r = session.segment_box(axis, index, box)
        result.encoded += session.cache.misses - before
        mask = r.mask
        if mask.any():  # keep what continues the object from the previous slice
            mask = keep_components_touching(mask, _dilate(prev > 0, 2))
        area, prev_area = int(mask.sum()), int(prev.sum())
        progress_tick(index)
        if area < min_area:
            return f"object ended at slice {index} (area {area} px)"
        if r.score < cfg.min_score:
            return f"object ended at slice {index} (predicted IoU {r.score:.2f})"
        if area < cfg.min_area_ratio * prev_area:
            return f"object ended at slice {index} (area fell from {prev_area} to {area} px)"
        if area > cfg.max_area_ratio * prev_area:
            return f"stopped at slice {index}: area jumped from {prev_area} to {area} px (leak)"
        overlap = (mask & (prev > 0)).sum() / max(((mask > 0) | (prev > 0)).sum(), 1)
        if overlap < cfg.min_overlap:
            return f"object ended at slice {index} (overlap with the previous slice {overlap:.2f})"
        mean = float(session.normalised_slice(axis, index)[mask > 0].mean())
        if abs(mean - seed_mean) > cfg.intensity_tol * seed_sd:
            return f"object ended at slice {index} (intensity {mean:.0f} vs {seed_mean:.0f} +- {seed_sd:.0f} at the seed)"
        geometry.set_slice(result.mask, axis, index, mask)
        result.scores[index] = r.score
        prev = mask
        index += step
    return "reached the end of the range"


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(r):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def propagate(session, axis: Optional[str] = None, direction: str = "both", seeds: Optional[Sequence[int]] = None,
              previous: Optional[np.ndarray] = None, from_index: Optional[int] = None,
              limits: Optional[Tuple[int, int]] = None, clamp_box=None,
              config: Optional[PropagationConfig] = None, progress: Progress = None,
              should_stop: ShouldStop = None) -> VolumeResult:
    """Carry the session's prompted slices through the volume along ``axis`` (see module docstring).

    - ``seeds``: slice indices to start from (default: every prompted slice on ``axis``);
    - ``previous`` + ``from_index``: re-propagate after a correction on slice ``from_index``: only the
      slices between its neighbouring seeds are recomputed, the rest of ``previous`` is kept;
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
    fixed = {i for a, i in prompted if a == axis}
    seeds = sorted(fixed if seeds is None else {int(s) for s in seeds})
    if not seeds:
        raise InputError(f"no prompted slice on the {axis} axis to propagate from")
    for s in seeds:
        if (axis, s) not in prompted:
            raise InputError(f"{axis} slice {s} has no prompt: it cannot seed propagation")
    lo, hi = (0, n - 1) if limits is None else (max(int(limits[0]), 0), min(int(limits[1]), n - 1))
    result = VolumeResult(np.zeros(session.shape, np.uint8), axis, seeds=list(seeds))
    if previous is not None:
        if previous.shape != tuple(session.shape):
            raise InputError(f"previous mask has shape {previous.shape}, the volume {session.shape}")
        result.mask[...] = previous > 0
    all_fixed = sorted(fixed)

    def reach(s):  # exclusive (down, up) stops of seed s: slices between seeds go to the nearer one
        below = [f for f in all_fixed if f < s]
        above = [f for f in all_fixed if f > s]
        return ((below[-1] + s) // 2 if below else lo - 1), ((s + above[0]) // 2 + 1 if above else hi + 1)

    if from_index is not None:
        if from_index not in fixed:
            raise InputError(f"{axis} slice {from_index} has no prompt: nothing to re-propagate from")
        down, up = reach(from_index)
        sl = [slice(None)] * 3
        sl[geometry.array_axis(axis)] = slice(down + 1, up)
        result.mask[tuple(sl)] = 0  # the corrected seed's own range is recomputed; the rest is kept
        seeds = [from_index]
        result.seeds = [from_index]
    for s in all_fixed:  # user slices are fixed: their masks stand as they are
        geometry.set_slice(result.mask, axis, s, session.slice_state(axis, s).mask)
    total = max(sum((s - reach(s)[0] - 1 if direction in ("both", "down") else 0)
                    + (reach(s)[1] - s - 1 if direction in ("both", "up") else 0) for s in seeds), 1)
    done = [0]

    def tick(index):
        done[0] += 1
        if progress is not None:
            progress(min(done[0] / total, 1.0), f"{axis} slice {index}")

    for s in seeds:
        mask = session.slice_state(axis, s).mask
        if not mask.any():
            result.stopped[f"{s}"] = "seed mask is empty"
            continue
        down, up = reach(s)
        for name, stop, step in (("down", down, -1), ("up", up, +1)):
            if direction in ("both", name):
                result.stopped[f"{s} {name}"] = _walk(session, axis, mask, s, stop, step, cfg, clamp_box, result,
                                                      fixed - {s}, tick, should_stop)
    if progress is not None:
        progress(1.0, "done")
    result.seconds = time.perf_counter() - t0
    log.info("propagated %s from seeds %s in %.1f s (%d slices encoded): %s", axis, seeds, result.seconds,
             result.encoded, result.stopped)
    return result


def segment_roi(session, roi_ijk, axis: str = "axial", config: Optional[PropagationConfig] = None,
                progress: Progress = None, should_stop: ShouldStop = None) -> VolumeResult:
    """Segment the object framed by a 3D box (inclusive IJK corners): see ``roi.segment_roi``.

    Kept here for existing callers; a ``PropagationConfig`` passes its margin and minimum area on.
    """
    from . import roi

    cfg = None if config is None else roi.RoiConfig(margin_mm=config.margin_mm, min_area_mm2=config.min_area_mm2)
    return roi.segment_roi(session, roi_ijk, axis=axis, config=cfg, progress=progress, should_stop=should_stop)
