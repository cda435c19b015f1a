"""The review confidence and order (MedFMSegmentLib.propagate.confidence_of / expected_wrong): pure functions."""
from __future__ import annotations

from MedFMSegmentLib.propagate import PropagationConfig, confidence_of, expected_wrong


def test_confidence_falls_with_distance_and_a_border_slice_rises_with_it():
    cfg = PropagationConfig()
    near = {"iou": 0.9, "jitter": 0.9, "agree": 0.9, "distance": 1.0, "area": 400.0}
    far = dict(near, distance=20.0)
    assert 0.0 <= confidence_of(far, cfg) < confidence_of(near, cfg) <= 0.9
    assert confidence_of(dict(near, iou=0.5, jitter=0.5, agree=0.5), cfg) < confidence_of(near, cfg)
    b_near, b_far = {"border": 0.8, "distance": 1.0, "area": 300.0}, {"border": 0.8, "distance": 30.0, "area": 300.0}
    assert confidence_of(b_near, cfg) < confidence_of(b_far, cfg) <= 0.8
    off = PropagationConfig(confidence_decay_slices=0.0)  # the decay off: the plain weighted mean
    assert abs(confidence_of(far, off) - 0.9) < 1e-9 and abs(confidence_of(b_near, off) - 0.8) < 1e-9


def test_expected_wrong_puts_a_doubtful_large_slice_before_a_doubtful_sliver():
    big, sliver = {"area": 500.0}, {"area": 20.0}
    assert expected_wrong(big, 0.6) > expected_wrong(sliver, 0.2)
    assert expected_wrong(big, 1.0) == 0.0
