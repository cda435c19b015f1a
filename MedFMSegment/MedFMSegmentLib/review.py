"""The review list's per-slice features: where a propagated slice sits among the fixed slices, from a result.

```python
feats = slice_features(result.signals, result.mask, axis, fixed=[12, 30], prompted=[30])  # {index: {...}}
score = linear(feats[k], (("bias", 0.1), ("log_distance", 0.5)))
```

Features of slice ``k`` (all floats; model signals absent on a slice default to 1 with ``no_model`` = 1):
``iou``, ``jitter``, ``agree`` (the propagation's signals), ``log_distance`` (log(1 + slices to the
nearest fixed slice); 0 on a prompted slice), ``inside`` (1 between two fixed slices), ``log_gap`` (log(1 +
their distance) inside, else 0), ``outside`` (1 beyond the outermost fixed slice: a walk toward an end of
the object), ``border`` (1 on the first empty slice past an end) and ``border_score`` (1 - its predicted
IoU), ``prompted`` (a prompted, not corrected slice: the model's own answer), ``end`` (the first or last
slice of the result), ``rel_area`` (the slice's area over the result's largest section), ``log_area``
(log(1 + area)), ``area_jump`` (|log of the area over its two neighbours' mean|, areas + 1: a leak or a
dropout), ``log_to_end`` (log(1 + slices to the nearer end of the result)), and the products
``log_distance_outside``, ``border_log_distance`` (how far the walk went before it stopped) and
``agree_inside`` (agreement with the interpolated shape); ``toward_empty`` (1 between two fixed slices of
which one is empty: the object ends between them, where a walk that leaked runs on); ``confidence`` (the
slice's ``scores`` entry: propagate passes the confidence of ``confidence_of``) and ``log_doubt`` (log(1.01 -
confidence)); ``log_beyond``, ``log_behind``, ``log_gap_wrong``: see ``add_sums``.
"""
from __future__ import annotations

import bisect
from typing import Dict, Iterable, Sequence, Tuple

import numpy as np

from . import geometry

FEATURES = ("bias", "iou", "jitter", "agree", "no_model", "log_distance", "inside", "log_gap", "outside",
            "border", "border_score", "prompted", "end", "rel_area", "log_area", "area_jump", "log_to_end",
            "log_distance_outside", "border_log_distance", "agree_inside", "toward_empty", "confidence",
            "log_doubt", "log_beyond", "log_behind", "log_gap_wrong")


def slice_features(signals: Dict[int, Dict[str, float]], mask: np.ndarray, axis: str, fixed: Sequence[int],
                   prompted: Iterable[int] = (), indices: Iterable[int] = None,
                   scores: Dict[int, float] = None) -> Dict[int, Dict[str, float]]:
    """Features (module docstring) of ``indices`` (default: every slice with signals and the prompted ones).

    ``fixed``: the prompted and corrected slices of ``axis``; ``prompted``: those not corrected; ``scores``:
    each slice's confidence (a prompted slice's: its predicted IoU); ``mask``: the result's volume."""
    fixed = sorted(int(f) for f in fixed)
    prompted = {int(p) for p in prompted}
    scores = scores or {}
    ax = geometry.array_axis(axis)
    areas = mask.sum(axis=tuple(x for x in range(3) if x != ax)).astype(float)
    nz = np.nonzero(areas)[0]
    ends = {int(nz[0]), int(nz[-1])} if nz.size else set()
    largest = float(areas.max()) if areas.size else 0.0
    keys = set(signals) | prompted if indices is None else {int(i) for i in indices}
    out = {}
    for k in sorted(keys):
        sig = signals.get(k, {})
        j = bisect.bisect_left(fixed, k)
        below = fixed[j - 1] if j > 0 else None
        above = fixed[j] if j < len(fixed) and fixed[j] != k else (fixed[j + 1] if j + 1 < len(fixed) else None)
        near = [abs(k - f) for f in (below, above) if f is not None]
        distance = 0.0 if k in prompted else float(sig.get("distance", min(near) if near else 0.0))
        inside = below is not None and above is not None and k not in prompted
        area = float(sig.get("area", areas[k] if 0 <= k < areas.size else 0.0))
        f = {"bias": 1.0, "no_model": 0.0 if "iou" in sig or k in prompted else 1.0,
             "iou": float(sig.get("iou", scores.get(k, 1.0))), "jitter": float(sig.get("jitter", 1.0)),
             "agree": float(sig.get("agree", 1.0)), "log_distance": float(np.log1p(distance)),
             "inside": float(inside), "log_gap": float(np.log1p(above - below)) if inside else 0.0,
             "outside": float(not inside and k not in prompted), "border": float("border" in sig),
             "border_score": float(sig.get("border", 0.0)), "prompted": float(k in prompted),
             "end": float(k in ends), "rel_area": area / largest if largest > 0 else 0.0,
             "log_area": float(np.log1p(area))}
        nb = [areas[i] for i in (k - 1, k + 1) if 0 <= i < areas.size]
        f["area_jump"] = abs(float(np.log((1 + area) / (1 + np.mean(nb))))) if nb else 0.0
        f["log_to_end"] = float(np.log1p(min(abs(k - e) for e in ends))) if ends else 0.0
        f["log_distance_outside"] = f["log_distance"] * f["outside"]
        f["border_log_distance"] = f["log_distance"] * f["border"]
        f["agree_inside"] = f["agree"] * f["inside"]
        f["toward_empty"] = float(inside and min(areas[below], areas[above]) == 0)
        f["confidence"] = float(scores.get(k, 0.5))
        f["log_doubt"] = float(np.log(1.01 - f["confidence"]))
        out[k] = f
    return add_sums(out, fixed, {k: (1 - f["confidence"]) * np.expm1(f["log_area"]) for k, f in out.items()})


def add_sums(feats: Dict[int, Dict[str, float]], fixed: Sequence[int], wrong: Dict[int, float]):
    """Add what a correction of a slice could reach, from each reviewed slice's expected wrong pixels
    ``wrong`` (``propagate.expected_wrong``): ``log_beyond`` / ``log_behind`` (log(1 + the sum over the
    reviewed slices further out / between the slice and the fixed slice it was walked from), slices
    beyond the outermost fixed slices) and ``log_gap_wrong`` (the sum over the slices between the two
    fixed slices around a slice between them). Returns ``feats``."""
    fixed = sorted(int(x) for x in fixed)
    for k, f in feats.items():
        beyond = behind = gap = 0.0
        below = [x for x in fixed if x < k]
        above = [x for x in fixed if x > k]
        if f.get("inside"):
            gap = sum(w for j, w in wrong.items() if below[-1] < j < above[0])
        elif f.get("outside") and (below or above):
            start, out = (below[-1], 1) if not above else (above[0], -1)
            beyond = sum(w for j, w in wrong.items() if (j - k) * out > 0)
            behind = sum(w for j, w in wrong.items() if (j - k) * out < 0 and (j - start) * out > 0)
        f["log_beyond"], f["log_behind"], f["log_gap_wrong"] = (float(np.log1p(v)) for v in (beyond, behind, gap))
    return feats


def linear(features: Dict[str, float], weights: Sequence[Tuple[str, float]]) -> float:
    """sum(weight x feature) over the named features (absent features count 0)."""
    return float(sum(w * float(features.get(name, 0.0)) for name, w in weights))
