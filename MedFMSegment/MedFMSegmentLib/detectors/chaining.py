"""Chaining: run a detector, plan its boxes, segment each label (:func:`chain`, :func:`detect_and_segment`).

:func:`chain` is model-agnostic: it calls a caller-given ``segment_label(label, boxes) -> mask_kji``
once per label. :func:`detect_and_segment` binds that to a promptable session (``session.py``'s
``PromptSession``, used only through its public methods)::

    from MedFMSegmentLib import chain, detectors
    det = detectors.detector_from_spec("labelmap:atlas.nii.gz")
    masks, report = chain.detect_and_segment(session, det, array_kji, ijk_to_ras)

Per-slice boxes (tight boxes from a label map, or a localizer's) are segmented slice by slice; a
plain 3D box (the same rectangle on every slice) is treated as a ROI: the middle slice is prompted
and the object carried toward both ends, boxes clamped to the ROI (``propagate.segment_roi``).
A label's adapter (``ADAPTER_DIR/<label>``) is applied when it exists.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import geometry
from ..errors import Cancelled, InputError, MedFMError
from .base import Detection, Detector, IntBoxXY, _check_label, _checked_matrix, detector_labels
from .planning import _check_plan_args, detections_to_slice_boxes

log = logging.getLogger(__name__)


@dataclass
class ChainResult:
    """Masks of :func:`chain`: ``{label: uint8 mask_kji}`` and a report of what was done."""

    masks: Dict[str, np.ndarray] = field(default_factory=dict)
    report: Dict[str, Any] = field(default_factory=dict)


SegmentLabel = Callable[[str, List[Tuple[int, IntBoxXY]]], np.ndarray]


def _select_labels(detections: List[Detection], known: Optional[Tuple[str, ...]],
                   wanted: Optional[Sequence[str]], name: str) -> List[Detection]:
    if known is not None:
        stray = sorted({d.label for d in detections} - set(known))
        if stray:
            raise InputError(f"detector {name} returned label(s) {', '.join(map(repr, stray))} that are not "
                             f"in its label map ({', '.join(known) or 'empty'})")
    if wanted is None:
        return detections
    return [d for d in detections if d.label in set(wanted)]


def _check_wanted(wanted: Optional[Sequence[str]], known: Optional[Tuple[str, ...]], name: str):
    if wanted is None:
        return None
    if isinstance(wanted, str):
        wanted = [wanted]
    wanted = [_check_label(w) for w in wanted]
    if known is not None:
        unknown = [w for w in wanted if w not in known]
        if unknown:
            shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
            raise InputError(f"unknown label(s) {', '.join(map(repr, unknown))} for detector {name}; "
                             f"it knows: {shown or 'nothing'}")
    return wanted


def chain(detector: Detector, array_kji: np.ndarray, ijk_to_ras, segment_label: SegmentLabel, *,
          axis: str = "axial", labels: Optional[Sequence[str]] = None, score_threshold: float = 0.5,
          margin_vox: int = 2, nms_iou: float = 0.5, slice_margin: int = 0, merge: str = "nms",
          progress: Optional[Callable[[float, str], None]] = None,
          should_stop: Optional[Callable[[], bool]] = None) -> ChainResult:
    """Detect, plan per-slice boxes, and segment each label with ``segment_label``.

    ``segment_label(label, [(index, box_xy), ...])`` gets the boxes of one label on ``axis`` (bind
    the axis and the model into it, e.g. with ``functools.partial``) and returns a mask the shape of
    ``array_kji`` (non-zero = inside). ``labels`` restricts the run to these names (a name the
    detector's ``labels`` does not know raises :class:`InputError`). ``progress(fraction, message)``
    is called as labels complete; ``should_stop()`` returning True raises :class:`Cancelled`
    between labels. A detector that finds nothing gives an empty result (logged), not an error.
    The report is that of :func:`detections_to_slice_boxes` plus ``detector``, ``not_found`` and
    ``voxels`` ({label: mask voxels}).
    """
    arr = np.asarray(array_kji)
    if arr.ndim != 3:
        raise InputError(f"the image must be a 3D [k, j, i] array, got shape {arr.shape}")
    matrix = _checked_matrix(ijk_to_ras)
    name = type(detector).__name__
    known = detector_labels(detector)
    wanted = _check_wanted(labels, known, name)
    _check_plan_args(arr.shape, axis, score_threshold, margin_vox, slice_margin, nms_iou, merge)
    if progress:
        progress(0.0, f"detecting with {name}")
    detections = list(detector.detect(arr, matrix))
    detections = _select_labels(detections, known, wanted, name)
    report: Dict[str, Any] = {}
    plan = detections_to_slice_boxes(detections, arr.shape, axis, score_threshold, margin_vox, nms_iou,
                                     slice_margin=slice_margin, merge=merge, report=report)
    report["detector"] = name
    report["not_found"] = [w for w in (wanted or []) if w not in plan]
    report["voxels"] = {}
    if not plan:
        log.warning("detector %s found nothing to segment (%d detection(s), %d below score threshold %g, "
                    "%d outside the volume)", name, len(detections), len(report["below_threshold"]),
                    score_threshold, len(report["outside"]))
        if progress:
            progress(1.0, "nothing detected")
        return ChainResult({}, report)
    for label in report["not_found"]:
        log.warning("label %r was not detected", label)
    masks: Dict[str, np.ndarray] = {}
    for n, (label, boxes) in enumerate(plan.items()):
        if should_stop is not None and should_stop():
            raise Cancelled(f"detector chain stopped before label {label!r} ({n} of {len(plan)} done)")
        if progress:
            progress(n / len(plan), f"segmenting {label} ({len(boxes)} box(es))")
        mask = np.asarray(segment_label(label, boxes))
        if mask.shape != arr.shape:
            raise MedFMError(f"segment_label returned a mask of shape {mask.shape} for {label!r}; "
                             f"expected the image shape {arr.shape}")
        masks[label] = (mask != 0).astype(np.uint8)
        report["voxels"][label] = int(masks[label].sum())
    if progress:
        progress(1.0, f"segmented {len(masks)} label(s)")
    return ChainResult(masks, report)




def _segmenter(session, axis: str, adapter_dir: Optional[str], adapter_loader: Optional[Callable]):
    from ..propagate import segment_roi  # lazy: keeps torch and the session out of `import detectors`

    adapters: Dict[str, object] = {}

    def segment_label(label: str, boxes: List[Tuple[int, Tuple[int, int, int, int]]]) -> np.ndarray:
        session.adapter = None
        path = os.path.join(adapter_dir, label) if adapter_dir else None
        if path and os.path.isdir(path) and adapter_loader is not None:
            if label not in adapters:
                adapters[label] = adapter_loader(path, session.model)
            session.adapter = adapters[label]
            log.info("label %s: adapter %s", label, path)
        mask = np.zeros(session.shape, np.uint8)
        rects = {tuple(b) for _, b in boxes}
        indices = sorted({i for i, _ in boxes})
        try:
            if len(rects) == 1 and len(indices) > 2:  # one rectangle through many slices: a 3D ROI
                x0, y0, x1, y1 = next(iter(rects))
                c0 = geometry.slice_to_ijk(indices[0], (x0, y0), axis)
                c1 = geometry.slice_to_ijk(indices[-1], (x1, y1), axis)
                return segment_roi(session, (c0, c1), axis=axis).mask
            for index, box in boxes:
                r = session.segment_box(axis, index, box)
                geometry.get_slice(mask, axis, index)[r.mask > 0] = 1
            return mask
        finally:
            session.adapter = None

    return segment_label


def detect_and_segment(session, detector, array_kji, ijk_to_ras, axis: str = "axial", labels=None,
                       score_threshold: float = 0.5, margin_vox: int = 2, adapter_dir: Optional[str] = None,
                       adapter_loader: Optional[Callable] = None, preset: Optional[str] = None,
                       progress=None, should_stop=None):
    """Run ``detector`` and segment every detected label; returns ({label: uint8 mask}, report)."""
    session.set_volume(array_kji, ijk_to_ras, preset=preset)
    result = chain(detector, array_kji, ijk_to_ras, _segmenter(session, axis, adapter_dir, adapter_loader),
                   axis=axis, labels=labels, score_threshold=score_threshold, margin_vox=margin_vox,
                   progress=progress, should_stop=should_stop)
    return result.masks, result.report
