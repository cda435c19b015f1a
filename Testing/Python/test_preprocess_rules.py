"""The CT window rule chosen leave-one-dataset-out (bench_2d.py --grid), on real CT slices.

Measured (bench_2d --grid, box = tight box + 5 px, zoom context 2): chest CT 0.777 soft tissue vs 0.776 full
range (the aortic arch's axial boxes 0.887 vs 0.736); head CT 0.593 soft tissue vs 0.719 full range; the
rule 0.777 / 0.731.
"""
from __future__ import annotations

import numpy as np
import pytest

from MedFMSegmentLib import io
from MedFMSegmentLib.preprocess import ct_preset_for_box, normalise_volume
from MedFMSegmentLib.session import PromptSession
from MedFMTrainLib.evaluate import dice, padded_box


@pytest.fixture(scope="module")
def chest(shared_data):
    path = shared_data / "chest_ct" / "chest_ct.nii.gz"
    if not path.is_file():
        pytest.skip(f"shared data file not found: {path}")
    array, m = io.read_volume(path)
    aorta = io.read_volume(shared_data / "chest_ct" / "aorta.nii.gz")[0] > 0
    return array, m, aorta


def test_rule_picks_soft_tissue_for_the_aorta_and_full_range_for_the_head(chest, cranium_ct, cranium_head):
    array, _, aorta = chest
    k = 30
    assert ct_preset_for_box(array[k], padded_box(aorta[k], 5)) == "ct-soft-tissue"
    # the contrast-filled aortic arch (coronal: 0.74 of its box above 300 HU) is not bone to the rule
    j = 50
    arch = padded_box(aorta[:, j, :], 5)
    assert float((array[:, j, :][arch[1]:arch[3] + 1, arch[0]:arch[2] + 1] > 300).mean()) > 0.5
    assert ct_preset_for_box(array[:, j, :], arch) == "ct-soft-tissue"
    head, _ = cranium_ct
    kh = head.shape[0] // 2
    assert ct_preset_for_box(head[kh], padded_box(cranium_head[kh], 5)) == "ct-full"


def test_rule_window_beats_full_range_on_the_aorta_and_is_the_session_default(litemedsam, chest):
    """Axial slice 30 (descending aorta): the rule's window must beat the old ct-full default, and a session
    with the default preset gives exactly the rule's window's mask."""
    array, m, aorta = chest
    k = 30
    gt = aorta[k].astype(np.uint8)
    box = padded_box(gt, 5)
    scores, masks = {}, {}
    for preset in ("ct-full", ct_preset_for_box(array[k], box), None):
        s = PromptSession(litemedsam)
        s.set_volume(array, m, preset=preset)
        masks[preset] = s.add_box("axial", k, box).mask
        scores[preset] = dice(masks[preset], gt)
        if preset is None:
            assert s.preset == "ct-per-box" and s.slice_state("axial", k).crop.preset == "ct-soft-tissue"
        s.close()
    assert scores["ct-soft-tissue"] > scores["ct-full"] + 0.02, scores
    assert scores["ct-soft-tissue"] > 0.8, scores
    assert np.array_equal(masks[None], masks["ct-soft-tissue"])


def test_session_encodes_a_slice_once_per_window_its_boxes_choose(litemedsam, cranium_ct, cranium_head):
    """Head CT, middle axial slice: the whole-head box is mostly bone / air (full range), a box inside the
    brain is soft tissue; the slice is encoded once for each, and a box asking again hits the cache."""
    head, m = cranium_ct
    k = head.shape[0] // 2
    whole = padded_box(cranium_head[k], 5)
    ys, xs = np.nonzero(cranium_head[k])
    cy, cx = int(ys.mean()), int(xs.mean())
    brain = (cx - 15, cy - 15, cx + 15, cy + 15)
    assert ct_preset_for_box(head[k], whole) == "ct-full" and ct_preset_for_box(head[k], brain) == "ct-soft-tissue"
    s = PromptSession(litemedsam, config=None)
    s.config.zoom = False  # one window geometry: the two boxes differ only in the intensity window
    s.set_volume(head, m)
    assert s.add_box("axial", k, whole).mask.any()
    assert s.slice_state("axial", k).crop.preset == "ct-full"
    s.reset()
    s.add_box("axial", k, brain)
    assert s.slice_state("axial", k).crop.preset == "ct-soft-tissue"
    assert len(s.cache) == 2 and s.cache.misses == 2
    s.reset()
    s.add_box("axial", k, (whole[0] + 1, whole[1] + 1, whole[2] - 1, whole[3] - 1))  # full range again: cached
    assert len(s.cache) == 2 and s.cache.misses == 2
    for preset in ("ct-full", "ct-soft-tissue"):  # the slice each window shows is the volume mapped that way
        assert np.array_equal(s.normalised_slice("axial", k, preset), normalise_volume(head[k:k + 1], preset)[0][0])
    s.close()


def test_a_ct_session_maps_slices_on_demand_exactly_as_the_volume_mapping(litemedsam, cranium_ct):
    """CT with the window per box keeps no uint8 copy of the volume: every slice of every axis is mapped from
    the raw array when needed, bitwise as ``normalise_volume`` maps the whole volume (real head CT)."""
    from MedFMSegmentLib import geometry

    raw, m = cranium_ct
    s = PromptSession(litemedsam)
    s.set_volume(raw, m)
    assert s.preset == "ct-per-box" and s._volume_u8 is None and s.shape == raw.shape
    for name in ("ct-soft-tissue", "ct-full"):
        whole = normalise_volume(raw, name)[0]
        for axis in ("axial", "coronal", "sagittal"):
            n = geometry.num_slices(raw.shape, axis)
            for index in (0, n // 3, n // 2, n - 1):
                got = s.normalised_slice(axis, index, name)
                assert got.dtype == np.uint8 and np.array_equal(got, geometry.get_slice(whole, axis, index))
                if name == "ct-soft-tissue":
                    assert np.array_equal(s.normalised_slice(axis, index), got)
    s.close()
