"""Training-slice lists for the Slicer module: parse what the user typed, list the slices a segment covers."""
from __future__ import annotations

import re
from typing import List

import numpy as np

from MedFMSegmentLib import geometry
from MedFMSegmentLib.errors import InputError


def parse_slice_list(text: str) -> List[int]:
    """"40, 45;50 45" -> [40, 45, 50] (sorted, without repeats); empty or blank -> []."""
    tokens = [t for t in re.split(r"[,\s;]+", text or "") if t]
    bad = [t for t in tokens if not re.fullmatch(r"\d+", t)]
    if bad:
        raise InputError(f"training slices must be slice numbers separated by commas, not {', '.join(bad)!r}")
    return sorted({int(t) for t in tokens})


def nonempty_slices(mask_kji: np.ndarray, axis: str) -> List[int]:
    """Indices of the ``axis`` slices where ``mask_kji`` has a voxel."""
    across = tuple(a for a in range(3) if a != geometry.array_axis(geometry.check_axis(axis)))
    return [int(i) for i in np.flatnonzero(np.asarray(mask_kji).any(axis=across))]
