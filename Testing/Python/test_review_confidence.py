"""The review confidence and order (MedFMSegmentLib.propagate.confidence_of / expected_wrong): pure functions."""
from __future__ import annotations

from MedFMSegmentLib.propagate import PropagationConfig, confidence_of, expected_wrong, review_confidence


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


def test_slice_features_place_a_slice_among_the_fixed_slices():
    import numpy as np

    from MedFMSegmentLib.review import FEATURES, linear, slice_features

    mask = np.zeros((12, 8, 8), np.uint8)
    for k, side in {2: 2, 3: 4, 4: 4, 5: 4, 6: 4, 7: 4, 8: 2}.items():
        mask[k, :side, :side] = 1
    signals = {k: {"iou": 0.8, "jitter": 0.9, "agree": 0.7, "distance": float(min(abs(k - 4), abs(k - 7))),
                   "area": float(mask[k].sum())} for k in (2, 3, 5, 6, 8)}
    signals[9] = {"border": 0.6, "distance": 2.0, "area": 4.0}
    f = slice_features(signals, mask, "axial", fixed=[4, 7], prompted=[4], scores={4: 0.95})
    assert sorted(f) == [2, 3, 4, 5, 6, 8, 9] and all(set(v) == set(FEATURES) for v in f.values())
    assert f[5]["inside"] == 1 and f[5]["log_gap"] == np.log1p(3) and f[5]["outside"] == 0
    assert f[3]["outside"] == 1 and f[8]["outside"] == 1 and f[3]["log_gap"] == 0
    assert f[9]["border"] == 1 and f[9]["border_score"] == 0.6 and f[9]["border_log_distance"] == np.log1p(2)
    assert f[4]["prompted"] == 1 and f[4]["iou"] == 0.95 and f[4]["no_model"] == 0 and f[4]["outside"] == 0
    assert f[2]["end"] == 1 and f[8]["end"] == 1 and f[5]["end"] == 0
    assert f[5]["rel_area"] == 1.0 and f[2]["rel_area"] == 0.25
    assert f[8]["area_jump"] > f[5]["area_jump"] == 0.0  # 4 px between 16 px and none
    assert linear(f[5], (("bias", 2.0), ("agree", -1.0))) == 2.0 - 0.7


def test_reported_confidence_doubts_walks_toward_an_end_and_small_sections():
    cfg = PropagationConfig()
    sig = {"iou": 0.9, "jitter": 0.9, "agree": 0.2, "distance": 0.0, "area": 400.0}
    inside = {"outside": 0.0, "rel_area": 1.0, "confidence": 0.3}
    assert abs(review_confidence(sig, inside, cfg) - 0.9) < 1e-9  # iou + jitter: agree is not in the value
    assert review_confidence(sig, dict(inside, outside=1.0), cfg) < review_confidence(sig, inside, cfg)
    assert review_confidence(sig, dict(inside, rel_area=0.2), cfg) < review_confidence(sig, inside, cfg)
    assert review_confidence(None, inside, cfg) == 0.3  # no signals (a prompted slice): its base confidence
    off = PropagationConfig(value_outside_factor=0.0, value_area_weight=0.0)
    assert review_confidence(sig, dict(inside, outside=1.0, rel_area=0.1), off) == review_confidence(sig, inside, off)
