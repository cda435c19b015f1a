"""ROI mode, path selection: every slice's answer chosen together, not tracked from one seed.

The tracking in ``roi.py`` starts from the middle slice's best candidate and follows it; a wrong seed (a
neighbouring structure, a ring-shaped lesion's thin middle section) or one bad slice ends the walk or
carries the error to the end. Here every slice of the ROI gets its candidates (the model's answers to the
ROI rectangle and to the box of the ROI's inscribed ellipsoid cut on that slice, where the object is
expected to be), plus "nothing here", and one best path through them is chosen by dynamic programming:

    score = sum over slices of  iou_w x predicted IoU + prior_w x Dice(candidate, ellipsoid's section)
            + sum over neighbouring slices of  pair_w x IoU(candidate_k, candidate_k+1)
            + empty_score + prior_w x (1 - the section's area / the ellipsoid's largest) for each empty slice

with the object one contiguous run of slices that includes the ROI's middle slice ("the object is inside
this box, centred"). Slices before and after the run are empty.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return float((a & b).sum()) / union if union else 0.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float((a & b).sum()) / total if total else 1.0


def ellipse_section(first: int, last: int, rect_px, index: int, shape_yx):
    """(box, mask) of the ROI's inscribed ellipsoid cut on slice ``index`` (box None where it misses the slice)."""
    r0, r1, c0, c1 = rect_px
    ck, rk = (first + last) / 2, (last - first + 1) / 2
    f = 1.0 - ((index - ck) / rk) ** 2
    mask = np.zeros(shape_yx, bool)
    if f <= 0:
        return None, mask
    cy, ry = (r0 + r1 - 1) / 2, (r1 - r0) / 2 * np.sqrt(f)
    cx, rx = (c0 + c1 - 1) / 2, (c1 - c0) / 2 * np.sqrt(f)
    ys, xs = np.ogrid[:shape_yx[0], :shape_yx[1]]
    mask = ((ys - cy) / max(ry, 0.5)) ** 2 + ((xs - cx) / max(rx, 0.5)) ** 2 <= 1
    box = (max(cx - rx, c0), max(cy - ry, r0), min(cx + rx, c1 - 1), min(cy + ry, r1 - 1))
    return tuple(float(v) for v in box), mask


@dataclass
class PathProblem:
    """Candidates of every ROI slice and what the path's score needs, computed once (decodes are the cost)."""
    first: int
    last: int
    middle: int
    # slice -> [(mask, predicted IoU, logits in the ROI rectangle, Dice with the ellipsoid's section)]
    options: Dict[int, List[tuple]] = field(default_factory=dict)
    empty_prior: Dict[int, float] = field(default_factory=dict)  # slice -> 1 - ellipsoid section area / largest
    pair_iou: Dict[int, np.ndarray] = field(default_factory=dict)  # slice k -> IoU matrix [options k, options k+1]


def build_problem(cands, first: int, last: int, rect, rect_px, full_fill: float, tick,
                  tracked: Optional[Dict[int, tuple]] = None) -> PathProblem:
    """Decode every slice's candidates: the rectangle's answers and those of the ellipsoid section's box, after
    ``tracked`` (slice -> (mask, predicted IoU, logits in the rectangle): the tracking's answer)."""
    middle = (first + last) // 2
    prob = PathProblem(first, last, middle)
    r0, r1, c0, c1 = rect_px
    rect_area = (r1 - r0) * (c1 - c0)
    for k in range(first, last + 1):
        tick(k)
        box, section = ellipse_section(first, last, rect_px, k, cands.shape)
        seen, opts = [], []
        if tracked and k in tracked and tracked[k][0].any():
            m, iou, lg = tracked[k]
            seen.append(m)
            opts.append((m, iou, lg, _dice(m, section)))
        for b in (rect, box):
            if b is None:
                continue
            for n, (m, iou) in enumerate(cands(k, b, True)):
                if not m.any() or m.sum() > full_fill * rect_area:  # nothing, or the whole frame
                    continue
                if any(np.array_equal(m, s) for s in seen):
                    continue
                seen.append(m)
                opts.append((m, iou, cands.logits(k, b, n), _dice(m, section)))
        prob.options[k] = opts
        ck, rk = (first + last) / 2, (last - first + 1) / 2
        prob.empty_prior[k] = min(((k - ck) / rk) ** 2, 1.0)  # 1 - the ellipsoid's section / its largest
    for k in range(first, last):
        a, b = prob.options[k], prob.options[k + 1]
        prob.pair_iou[k] = np.array([[_iou(x[0], y[0]) for y in b] for x in a], float).reshape(len(a), len(b))
    return prob


def solve(prob: PathProblem, iou_weight: float, prior_weight: float, pair_weight: float,
          empty_score: float) -> Dict[int, Optional[int]]:
    """slice -> chosen option index (None: empty) of the best path (see module docstring)."""
    ks = list(range(prob.first, prob.last + 1))
    neg = -1e18
    # states per slice: 0 = before the object (empty), 1 = after it (empty), 2 + i = option i
    score, back = [], []
    for n, k in enumerate(ks):
        opts = prob.options[k]
        e = empty_score + prior_weight * prob.empty_prior[k]
        unary = np.array([e, e] + [iou_weight * o[1] + prior_weight * o[3] for o in opts])
        cur = np.full(len(unary), neg)
        ptr = np.zeros(len(unary), int)
        if n == 0:
            cur[0] = unary[0]
            cur[2:] = unary[2:]
            cur[1] = neg  # "after" needs an object before it
        else:
            prev = score[-1]
            cur[0] = prev[0] + unary[0]
            ptr[0] = 0
            # after: from after, or from any option
            best_opt = int(np.argmax(prev[2:])) + 2 if len(prev) > 2 else 1
            cands = [(prev[1], 1)] + ([(prev[best_opt], best_opt)] if len(prev) > 2 else [])
            val, src = max(cands)
            cur[1], ptr[1] = val + unary[1], src
            pair = prob.pair_iou[ks[n - 1]]
            for i in range(len(opts)):
                from_opt = prev[2:] + pair_weight * pair[:, i] if len(prev) > 2 else np.array([])
                choices = [(prev[0], 0)] + [(v, j + 2) for j, v in enumerate(from_opt)]
                val, src = max(choices)
                cur[2 + i], ptr[2 + i] = val + unary[2 + i], src
        if k == prob.middle and opts:  # the object is in the ROI's middle slice
            cur[0] = cur[1] = neg
        score.append(cur)
        back.append(ptr)
    state = int(np.argmax(score[-1]))
    out: Dict[int, Optional[int]] = {}
    for n in range(len(ks) - 1, -1, -1):
        out[ks[n]] = state - 2 if state >= 2 else None
        state = int(back[n][state])
    return out


def masks_of(prob: PathProblem, choice: Dict[int, Optional[int]]) -> Dict[int, tuple]:
    """slice -> (mask, predicted IoU, logits in the rectangle) of the chosen options (empty slices left out)."""
    return {k: prob.options[k][i][:3] for k, i in choice.items() if i is not None and prob.options[k]}


__all__ = ["PathProblem", "build_problem", "solve", "masks_of", "ellipse_section"]
