"""The CT window rule chosen leave-one-dataset-out (bench_2d.py --grid), on real CT slices.

Measured (bench_2d --grid, box = tight box + 5 px, zoom context 2): chest CT aorta 0.748 soft tissue vs
0.674 full range; head CT whole head 0.795 full range vs 0.565 soft tissue.
"""
from __future__ import annotations

import numpy as np
import pytest

from MedFMSegmentLib import io
from MedFMSegmentLib.preprocess import ct_preset_for_box
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
    head, _ = cranium_ct
    kh = head.shape[0] // 2
    assert ct_preset_for_box(head[kh], padded_box(cranium_head[kh], 5)) == "ct-full"


def test_rule_window_beats_full_range_on_the_aorta(litemedsam, chest):
    """Axial slice 30 (descending aorta): the rule's window must beat the old ct-full default."""
    array, m, aorta = chest
    k = 30
    gt = aorta[k].astype(np.uint8)
    box = padded_box(gt, 5)
    scores = {}
    for preset in ("ct-full", ct_preset_for_box(array[k], box)):
        s = PromptSession(litemedsam)
        s.set_volume(array, m, preset=preset)
        scores[preset] = dice(s.add_box("axial", k, box).mask, gt)
        s.close()
    assert scores["ct-soft-tissue"] > scores["ct-full"] + 0.02, scores
    assert scores["ct-soft-tissue"] > 0.8, scores
