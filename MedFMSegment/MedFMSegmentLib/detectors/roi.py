"""Boxes given directly as RAS corners (:class:`RoiDetector`), e.g. extracted from Slicer ROI markups."""
from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

import numpy as np

from ..errors import InputError
from .base import Detection, _check_label, _check_score, _checked_matrix, _finite, box_ras_to_ijk


class RoiDetector:
    """Boxes given as ``(label, corner0_ras, corner1_ras)`` triples (e.g. Slicer ROI markups).

    Corners are any two opposite corners of an axis-aligned RAS box in mm (the MRML layer extracts
    them from ROI nodes). Validated when made; every ROI gets ``score``.
    """

    def __init__(self, rois: Iterable[Tuple[str, Sequence[float], Sequence[float]]], score: float = 1.0):
        self._rois = []
        for n, roi in enumerate(rois):
            try:
                label, c0, c1 = roi
            except (TypeError, ValueError):
                raise InputError(f"ROI {n} must be (label, corner0_ras, corner1_ras), got {roi!r}") from None
            label = _check_label(label)
            self._rois.append((label, _finite(c0, 3, f"ROI {label!r} corner0_ras"),
                               _finite(c1, 3, f"ROI {label!r} corner1_ras")))
        self.score = _check_score(score, "ROI")
        self.labels: Tuple[str, ...] = tuple(dict.fromkeys(r[0] for r in self._rois))

    def detect(self, array_kji: np.ndarray, ijk_to_ras) -> List[Detection]:
        """One detection per ROI, in voxel indices of the given volume."""
        matrix = _checked_matrix(ijk_to_ras)
        return [Detection(label, self.score, box_ijk=box_ras_to_ijk(c0, c1, matrix))
                for label, c0, c1 in self._rois]
