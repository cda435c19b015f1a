"""Detector-to-SAM chaining: detections -> per-slice boxes -> the promptable session -> one segment per label.

```python
from MedFMSegmentLib import chain, detectors
det = detectors.detector_from_spec("labelmap:atlas.nii.gz")
masks, report = chain.detect_and_segment(session, det, array_kji, ijk_to_ras)
```

Per-slice boxes (tight boxes from a label map, or a localizer's) are segmented slice by slice; a
plain 3D box (the same rectangle on every slice) is treated as a ROI: the middle slice is prompted
and the object carried toward both ends, boxes clamped to the ROI (``propagate.segment_roi``).
A label's adapter (``ADAPTER_DIR/<label>``) is applied when it exists.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from . import detectors, geometry
from .propagate import segment_roi

log = logging.getLogger(__name__)


def _segmenter(session, axis: str, adapter_dir: Optional[str], adapter_loader: Optional[Callable]):
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
    result = detectors.chain(detector, array_kji, ijk_to_ras, _segmenter(session, axis, adapter_dir, adapter_loader),
                             axis=axis, labels=labels, score_threshold=score_threshold, margin_vox=margin_vox,
                             progress=progress, should_stop=should_stop)
    return result.masks, result.report
