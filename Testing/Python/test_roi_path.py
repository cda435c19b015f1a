"""ROI mode's path selection (roi_path.py): the dynamic programme on synthetic candidates, the ellipsoid's
sections, and the ROI prior fusion (roi.fuse_with_prior)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from MedFMSegmentLib import roi_path
from MedFMSegmentLib.roi import RoiConfig, RoiParts, fuse_with_prior, ellipsoid_prior


def disc(shape, cy, cx, r):
    ys, xs = np.ogrid[:shape[0], :shape[1]]
    return (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r


def problem(options, empty_prior, first=0):
    """A PathProblem from per-slice [(mask, predicted IoU, prior Dice)] lists."""
    last = first + len(options) - 1
    prob = roi_path.PathProblem(first, last, (first + last) // 2)
    for n, opts in enumerate(options):
        prob.options[first + n] = [(m, iou, None, d) for m, iou, d in opts]
        prob.empty_prior[first + n] = empty_prior[n]
    for k in range(first, last):
        a, b = prob.options[k], prob.options[k + 1]
        prob.pair_iou[k] = np.array([[roi_path._iou(x[0], y[0]) for y in b] for x in a], float).reshape(len(a), len(b))
    return prob


def brute_force(prob, iou_w, prior_w, pair_w, empty):
    """Best contiguous run through the middle, every option combination scored by the module's formula."""
    ks = list(range(prob.first, prob.last + 1))
    best, best_choice = -np.inf, None
    for a in ks:
        for b in ks:
            if not (a <= prob.middle <= b) or any(not prob.options[k] for k in range(a, b + 1)):
                continue
            run = list(range(a, b + 1))
            for picks in itertools.product(*[range(len(prob.options[k])) for k in run]):
                s = sum(empty + prior_w * prob.empty_prior[k] for k in ks if k < a or k > b)
                for k, i in zip(run, picks):
                    o = prob.options[k][i]
                    s += iou_w * o[1] + prior_w * o[3]
                for n in range(len(run) - 1):
                    s += pair_w * prob.pair_iou[run[n]][picks[n], picks[n + 1]]
                if s > best + 1e-12:
                    best = s
                    best_choice = {k: None for k in ks} | dict(zip(run, picks))
    return best_choice


def test_solve_is_the_best_contiguous_path_through_the_middle():
    rng = np.random.default_rng(0)
    shape = (20, 20)
    for trial in range(30):
        n = int(rng.integers(3, 7))
        options = []
        for _ in range(n):
            opts = [(disc(shape, 10 + rng.integers(-4, 5), 10 + rng.integers(-4, 5), rng.integers(2, 7)),
                     float(rng.uniform(0.3, 1.0)), float(rng.uniform(0, 1))) for _ in range(int(rng.integers(1, 4)))]
            options.append(opts)
        empty_prior = list(rng.uniform(0, 1, n))
        prob = problem(options, empty_prior, first=int(rng.integers(0, 5)))
        weights = (1.0, float(rng.choice([0.0, 0.5, 1.0])), float(rng.choice([0.5, 1.0, 2.0])),
                   float(rng.choice([0.3, 0.9, 1.5])))
        assert roi_path.solve(prob, *weights) == brute_force(prob, *weights), trial


def test_solve_follows_the_consistent_object_not_the_louder_neighbour():
    shape = (30, 30)
    obj = [disc(shape, 15, 15, r) for r in (3, 5, 6, 5, 3)]
    other = disc(shape, 5, 25, 4)  # a neighbour the model prefers on the middle slice only
    options = [[(obj[0], 0.6, 0.3)], [(obj[1], 0.7, 0.6), (other, 0.9, 0.0)], [(other, 0.95, 0.0), (obj[2], 0.7, 0.8)],
               [(obj[3], 0.7, 0.6)], [(obj[4], 0.6, 0.3)]]
    choice = roi_path.solve(problem(options, [0.9, 0.4, 0.0, 0.4, 0.9]), 1.0, 0.5, 1.0, 0.3)
    assert choice == {0: 0, 1: 0, 2: 1, 3: 0, 4: 0}
    masks = roi_path.masks_of(problem(options, [0.9, 0.4, 0.0, 0.4, 0.9]), choice)
    assert all(np.array_equal(masks[k][0], obj[k]) for k in range(5))


def test_solve_leaves_the_ends_empty_when_nothing_is_expected_there():
    shape = (30, 30)
    big = disc(shape, 15, 15, 6)
    drift = disc(shape, 15, 22, 6)  # the end slices' answers moved off the object
    options = [[(drift, 0.5, 0.0)], [(big, 0.8, 0.7)], [(big, 0.9, 0.9)], [(big, 0.8, 0.7)], [(drift, 0.5, 0.0)]]
    prob = problem(options, [0.95, 0.3, 0.0, 0.3, 0.95])
    assert roi_path.solve(prob, 1.0, 1.0, 1.0, 0.3) == {0: None, 1: 0, 2: 0, 3: 0, 4: None}
    # with no cost for the drift and no reward for stopping, the path runs to both ends
    assert roi_path.solve(prob, 1.0, 0.0, 1.0, 0.0) == {0: 0, 1: 0, 2: 0, 3: 0, 4: 0}


def test_a_middle_slice_without_candidates_does_not_break_the_path():
    shape = (10, 10)
    m = disc(shape, 5, 5, 3)
    prob = problem([[(m, 0.8, 0.5)], [], [(m, 0.8, 0.5)]], [0.5, 0.0, 0.5])
    choice = roi_path.solve(prob, 1.0, 0.5, 1.0, 0.3)
    assert choice[1] is None and len(choice) == 3


def test_ellipse_sections_shrink_to_the_ends_and_stay_in_the_rectangle():
    rect_px = (10, 31, 20, 61)  # rows 10..30, columns 20..60
    areas = []
    for k in range(0, 11):
        box, mask = roi_path.ellipse_section(0, 10, rect_px, k, (50, 80))
        areas.append(int(mask.sum()))
        assert not mask[:10].any() and not mask[31:].any() and not mask[:, :20].any() and not mask[:, 61:].any()
        assert box[0] >= 20 and box[2] <= 60 and box[1] >= 10 and box[3] <= 30
    assert areas[5] == max(areas) and areas[0] < areas[2] < areas[5] and areas[10] < areas[8] < areas[5]
    assert abs(areas[0] - areas[10]) <= 0.05 * areas[5] + 2  # symmetric about the middle
    assert roi_path.ellipse_section(0, 10, rect_px, 12, (50, 80))[0] is None


def test_prior_fusion_is_the_model_at_weight_one_and_the_ellipsoid_at_zero():
    shape = (5, 40, 40)
    rect_px = (5, 35, 5, 35)
    logits = np.where(disc((30, 30), 12, 12, 6), 8.0, -8.0).astype(np.float32)
    mask = logits > 0
    full_mask = np.zeros((40, 40), bool)
    full_mask[5:35, 5:35] = mask
    parts = RoiParts(0, 4, rect_px, {2: (full_mask, logits)})
    model_only = fuse_with_prior(parts, shape, "axial", RoiConfig(prior_weight=1.0))
    assert np.array_equal(model_only[2] > 0, full_mask) and not model_only[[0, 1, 3, 4]].any()
    prior_only = fuse_with_prior(parts, shape, "axial", RoiConfig(prior_weight=0.0))
    for k in range(5):
        expected = ellipsoid_prior(0, 4, rect_px, k, 1.0) > 0.5
        assert np.array_equal(prior_only[k, 5:35, 5:35] > 0, expected)
    assert prior_only[2].sum() > prior_only[0].sum() > 0
    # a component the tracking dropped stays dropped even where the model's logits are high
    dropped = np.zeros((40, 40), bool)
    half = fuse_with_prior(RoiParts(0, 4, rect_px, {2: (dropped, logits)}), shape, "axial",
                           RoiConfig(prior_weight=0.9))
    assert not half[2].any()



def test_tracking_overlap_limit_is_loosened_on_thick_slices_only():
    from MedFMSegmentLib.roi import tracking_min_overlap

    cfg = RoiConfig()
    assert tracking_min_overlap(cfg, 200, 1.0, 1.0) == cfg.min_overlap  # Colin27: 1 mm, a 200 mm2 section
    assert tracking_min_overlap(cfg, 2000, 0.957 ** 2, 1.5) == cfg.min_overlap  # head CT, 1.5 mm slices
    # the brain tumour's 6.5 mm slices: a 1,100 px section of 0.78 mm pixels, r = 14.6 mm -> 0.5 x 0.48
    assert tracking_min_overlap(cfg, 1100, 0.78 ** 2, 6.5) == pytest.approx(0.24, abs=0.01)
    assert tracking_min_overlap(RoiConfig(slope_overlap_factor=1.0), 1100, 0.78 ** 2, 6.5) == cfg.min_overlap


def test_roi_tracking_keeps_the_thick_slice_lesion_to_its_ends(shared_data, litemedsam):
    """Brain tumour MRI (6.5 mm slices, extent k = 11..17), ROI = ground-truth box + 2 voxels: the middle
    slice k = 14 is the lesion's waist (247 px against 626 on k = 13), so the next slice's mask overlaps it
    little (IoU 0.26 with the bf16 encoder): with the thin-slice limit (0.3) the walk ended there, leaving
    11..13 empty (bench_3d ROI Dice 0.368, now 0.422). The result covers every slice of the lesion."""
    from MedFMSegmentLib import geometry, io
    from MedFMSegmentLib.roi import segment_roi
    from MedFMSegmentLib.session import PromptSession

    volume = shared_data / "brain_tumour_mr" / "brain1_image.nrrd"
    label = shared_data / "brain_tumour_mr" / "brain1_label.nrrd"
    if not volume.is_file() or not label.is_file():
        pytest.skip("the brain tumour MRI is not in the shared data")
    array, matrix = io.read_volume(volume)
    truth = io.read_volume(label)[0] > 0
    session = PromptSession(litemedsam)
    session.set_volume(array, matrix)
    (k0, j0, i0), (k1, j1, i1) = geometry.bbox_kji(truth.astype(np.uint8))
    sh = truth.shape
    roi_ijk = ((max(i0 - 2, 0), max(j0 - 2, 0), max(k0 - 2, 0)),
               (min(i1 + 2, sh[2] - 1), min(j1 + 2, sh[1] - 1), min(k1 + 2, sh[0] - 1)))
    mask = segment_roi(session, roi_ijk, axis="axial").mask > 0
    assert all(mask[k].any() for k in range(k0, k1 + 1)), np.nonzero(mask.any(axis=(1, 2)))[0]
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.35


def test_prior_fusion_needs_the_logits_the_default_tracking_does_not_keep():
    parts = RoiParts(0, 2, (0, 10, 0, 10), {1: (np.ones((20, 20), bool), None)})
    with pytest.raises(ValueError, match="keep_logits"):
        fuse_with_prior(parts, (3, 20, 20), "axial", RoiConfig(prior_weight=0.5))
