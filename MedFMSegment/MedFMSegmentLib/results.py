"""What a 3D run returns (:class:`VolumeResult`) and its callback types, shared by ``propagate`` and
``roi`` (kept apart so that neither imports the other).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

Progress = Optional[Callable[[float, str], None]]
ShouldStop = Optional[Callable[[], bool]]


@dataclass
class VolumeResult:
    mask: np.ndarray  # uint8 [k, j, i]
    axis: str
    scores: Dict[int, float] = field(default_factory=dict)  # slice index -> predicted IoU (walked slices)
    seeds: List[int] = field(default_factory=list)
    stopped: Dict[str, str] = field(default_factory=dict)  # "down"/"up" per seed -> why it stopped
    seconds: float = 0.0
    encoded: int = 0  # slices whose image embedding had to be computed
    pinned: List[int] = field(default_factory=list)  # corrected slices on ``axis`` (kept exactly)
    # per non-fixed slice: {"iou": predicted IoU, "jitter": Dice with the jittered box's mask, "agree":
    # Dice with the interpolation between fixed slices or with the previous slice's mask, "distance":
    # slices to the nearest fixed slice, "area": mask pixels}; border slices (the first empty slice
    # past an end) have "border" and the area of the last slice before it
    signals: Dict[int, Dict[str, float]] = field(default_factory=dict)
    # every non-fixed slice touched or bordering -> the confidence reported (propagate.review_confidence)
    confidence: Dict[int, float] = field(default_factory=dict)
    # [{"axis", "index", "confidence", "expected_wrong"}]: the slice a correction probably helps most first,
    # i.e. by (1 - base confidence) x mask area (propagate.expected_wrong; PropagationConfig.review_order:
    # fitted weights instead), then least confident first
    review: List[dict] = field(default_factory=list)
    features: Dict[int, Dict[str, float]] = field(default_factory=dict)  # reviewed slice -> review.slice_features
    recomputed: List[int] = field(default_factory=list)  # slices computed by this call (the rest were kept)
    crops: Dict[int, object] = field(default_factory=dict)  # slice -> model window (reused: cached embeddings)
    jobs: Dict[tuple, Tuple[int, int]] = field(default_factory=dict)  # job signature -> (first, last) slice
    decoded: int = 0  # decoder runs of this call (the rest were the same prompt as before: see ``decodes``)
    # (embedding key, box, adapter, session config) -> (logits, score, mask) of the decodes this call used:
    # a re-propagation (``previous=``) asks the decoder again only for a prompt it has not seen
    decodes: Dict[tuple, tuple] = field(default_factory=dict, repr=False)
