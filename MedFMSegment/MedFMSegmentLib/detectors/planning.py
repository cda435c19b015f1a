"""Box planning: detections -> per-slice 2D box prompts on one axis (:func:`detections_to_slice_boxes`).

Score threshold, clipping to the volume, in-plane and through-plane margins, and per-slice merging
(NMS or union) of overlapping boxes of one label.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import geometry
from ..errors import InputError
from .base import BoxIJK, BoxXY, Detection, IntBoxXY, SliceBox

log = logging.getLogger(__name__)

MERGE_MODES = ("nms", "union")


def _clip_box(box: Sequence[float], bounds: Sequence[int]):
    """Clip an inclusive box (lo..., hi...) to ``0..bounds-1``: (clipped box | None if outside, changed)."""
    d = len(bounds)
    lo = [float(v) for v in box[:d]]
    hi = [float(v) for v in box[d:]]
    if any(h < 0 or l > n - 1 for l, h, n in zip(lo, hi, bounds)):
        return None, True
    c_lo = [max(l, 0.0) for l in lo]
    c_hi = [min(h, n - 1.0) for h, n in zip(hi, bounds)]
    return tuple(c_lo + c_hi), (c_lo != lo or c_hi != hi)


def _split_box(box_ijk: BoxIJK, axis: str) -> List[Tuple[int, BoxXY]]:
    """Per-slice 2D boxes of a 3D IJK box along ``axis``."""
    i0, (x0, y0) = geometry.ijk_to_slice(box_ijk[0], axis)
    i1, (x1, y1) = geometry.ijk_to_slice(box_ijk[1], axis)
    box_xy = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    return [(index, box_xy) for index in range(min(i0, i1), max(i0, i1) + 1)]


def _detection_slices(det: Detection, axis: str, shape_kji: Sequence[int]):
    """(slice boxes clipped to the volume, clip status: "" / "clipped" / "outside")."""
    n_slices = geometry.num_slices(shape_kji, axis)
    height, width = geometry.slice_shape(shape_kji, axis)
    own = [(i, b) for a, i, b in det.slice_boxes or () if a == axis]
    if own:
        raw = own
    elif det.box_ijk is not None:
        bounds_ijk = tuple(int(s) for s in shape_kji[::-1])
        clipped, changed = _clip_box(det.box_ijk[0] + det.box_ijk[1], bounds_ijk)
        if clipped is None:
            return [], "outside"
        box = (tuple(int(round(v)) for v in clipped[:3]), tuple(int(round(v)) for v in clipped[3:]))
        return _split_box(box, axis), "clipped" if changed else ""
    else:
        hull = _slice_boxes_hull(det.slice_boxes)
        log.info("detection %r has slice boxes only on %s; using their 3D hull on %s",
                 det.label, ", ".join(det.axes()), axis)
        return _detection_slices(Detection(det.label, det.score, box_ijk=hull), axis, shape_kji)
    out, changed_any = [], False
    for index, box_xy in raw:
        if not 0 <= index < n_slices:
            changed_any = True
            continue
        clipped, changed = _clip_box(box_xy, (width, height))
        changed_any |= changed
        if clipped is not None:
            out.append((index, clipped))
    if not out:
        return [], "outside"
    return out, "clipped" if changed_any else ""


def _slice_boxes_hull(slice_boxes: Sequence[SliceBox]) -> BoxIJK:
    points = []
    for axis, index, (x0, y0, x1, y1) in slice_boxes:
        points.append(geometry.slice_to_ijk(index, (x0, y0), axis))
        points.append(geometry.slice_to_ijk(index, (x1, y1), axis))
    pts = np.array(points)
    return tuple(int(v) for v in pts.min(axis=0)), tuple(int(v) for v in pts.max(axis=0))


def _with_margin(box_xy: Sequence[float], margin: int, width: int, height: int) -> IntBoxXY:
    x0 = max(0, int(math.floor(box_xy[0])) - margin)
    y0 = max(0, int(math.floor(box_xy[1])) - margin)
    x1 = min(width - 1, int(math.ceil(box_xy[2])) + margin)
    y1 = min(height - 1, int(math.ceil(box_xy[3])) + margin)
    return x0, y0, x1, y1


def _extend_slices(items: List[Tuple[int, IntBoxXY]], slice_margin: int, n_slices: int):
    """Copy the end slices' boxes ``slice_margin`` slices outward (within the volume)."""
    if slice_margin <= 0 or not items:
        return items
    first = min(i for i, _ in items)
    last = max(i for i, _ in items)
    extra = []
    for d in range(1, slice_margin + 1):
        extra += [(first - d, b) for i, b in items if i == first and first - d >= 0]
        extra += [(last + d, b) for i, b in items if i == last and last + d < n_slices]
    return items + extra


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two inclusive pixel boxes ``(x0, y0, x1, y1)``."""
    ix = min(a[2], b[2]) - max(a[0], b[0]) + 1
    iy = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return float(inter) / float(area(a) + area(b) - inter)


def merge_boxes(scored: Sequence[Tuple[float, IntBoxXY]], iou: float, mode: str = "nms") -> List[IntBoxXY]:
    """Merge boxes of one label on one slice whose IoU exceeds ``iou``.

    ``nms`` keeps the highest-scoring box of each overlapping group; ``union`` replaces the group by
    its enclosing box (repeated until no two remaining boxes overlap by more than ``iou``).
    """
    if mode not in MERGE_MODES:
        raise InputError(f"unknown merge mode {mode!r}; expected one of {', '.join(MERGE_MODES)}")
    ordered = [b for _, b in sorted(scored, key=lambda sb: -sb[0])]
    kept: List[IntBoxXY] = []
    for box in ordered:
        if mode == "nms":
            if all(box_iou(box, k) <= iou for k in kept):
                kept.append(box)
            continue
        merged = box
        while True:
            hit = next((k for k in kept if box_iou(merged, k) > iou), None)
            if hit is None:
                break
            kept.remove(hit)
            merged = (min(merged[0], hit[0]), min(merged[1], hit[1]), max(merged[2], hit[2]), max(merged[3], hit[3]))
        kept.append(merged)
    return kept


def _check_plan_args(shape_kji, axis, score_threshold, margin_vox, slice_margin, nms_iou, merge):
    shape = tuple(int(s) for s in shape_kji)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"shape_kji must be 3 positive sizes, got {tuple(shape_kji)}")
    try:
        geometry.check_axis(axis)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    for name, value in (("score_threshold", score_threshold), ("nms_iou", nms_iou)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value!r}")
    for name, value in (("margin_vox", margin_vox), ("slice_margin", slice_margin)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise InputError(f"{name} must be a non-negative integer, got {value!r}")
    if merge not in MERGE_MODES:
        raise InputError(f"unknown merge mode {merge!r}; expected one of {', '.join(MERGE_MODES)}")
    return shape


def _empty_report(axis: str, count: int) -> Dict[str, Any]:
    return {"axis": axis, "detections": count, "kept": {}, "below_threshold": [], "clipped": [],
            "outside": [], "merged": {}, "slices": {}}


def detections_to_slice_boxes(detections: Sequence[Detection], shape_kji: Sequence[int], axis: str = "axial",
                              score_threshold: float = 0.5, margin_vox: int = 2, nms_iou: float = 0.5,
                              *, slice_margin: int = 0, merge: str = "nms",
                              report: Optional[Dict[str, Any]] = None) -> Dict[str, List[Tuple[int, IntBoxXY]]]:
    """Plan per-slice box prompts: ``{label: [(slice index, (x0, y0, x1, y1)), ...]}`` sorted by index.

    Per detection (score below ``score_threshold`` dropped): its own slice boxes on ``axis`` if it
    has some, else its 3D box split into one 2D box per slice; boxes are clipped to the volume
    (partly outside: clipped; entirely outside: dropped, both logged and reported); then the
    in-plane ``margin_vox`` is added (within the slice) and the end slices are repeated
    ``slice_margin`` slices outward. Overlapping boxes of one label on one slice (IoU > ``nms_iou``)
    are merged by ``merge`` (``"nms"``: best score wins, ``"union"``: enclosing box); several
    boxes may remain on a slice. Boxes are integer, inclusive, in slice pixel coordinates.

    ``report``, when given, is filled with ``axis``, ``detections`` (count), ``kept`` ({label: n}),
    ``below_threshold``, ``clipped`` and ``outside`` (lists of ``{"label", "score"}``), ``merged``
    ({label: boxes removed by merging}) and ``slices`` ({label: slices with a box}).
    """
    shape = _check_plan_args(shape_kji, axis, score_threshold, margin_vox, slice_margin, nms_iou, merge)
    rep = _empty_report(axis, len(detections))
    n_slices = geometry.num_slices(shape, axis)
    height, width = geometry.slice_shape(shape, axis)
    per_slice: Dict[str, Dict[int, List[Tuple[float, IntBoxXY]]]] = {}
    for det in detections:
        if not isinstance(det, Detection):
            raise InputError(f"expected Detection objects, got {type(det).__name__}")
        entry = {"label": det.label, "score": det.score}
        if det.score < score_threshold:
            rep["below_threshold"].append(entry)
            continue
        slices, status = _detection_slices(det, axis, shape)
        if status == "outside":
            log.warning("detection %r (score %.3g) lies entirely outside the volume; dropped", det.label, det.score)
            rep["outside"].append(entry)
            continue
        if status == "clipped":
            log.warning("detection %r (score %.3g) extends outside the volume; clipped", det.label, det.score)
            rep["clipped"].append(entry)
        items = [(i, _with_margin(b, int(margin_vox), width, height)) for i, b in slices]
        items = _extend_slices(items, int(slice_margin), n_slices)
        target = per_slice.setdefault(det.label, {})
        for index, box in items:
            target.setdefault(index, []).append((det.score, box))
        rep["kept"][det.label] = rep["kept"].get(det.label, 0) + 1
    if rep["below_threshold"]:
        log.info("%d detection(s) below the score threshold %g", len(rep["below_threshold"]), score_threshold)
    out: Dict[str, List[Tuple[int, IntBoxXY]]] = {}
    for label, slices in per_slice.items():
        boxes, removed = [], 0
        for index in sorted(slices):
            merged = merge_boxes(slices[index], float(nms_iou), merge)
            removed += len(slices[index]) - len(merged)
            boxes += [(index, b) for b in sorted(merged)]
        out[label] = boxes
        rep["merged"][label] = removed
        rep["slices"][label] = len(slices)
    if report is not None:
        report.update(rep)
    return out
