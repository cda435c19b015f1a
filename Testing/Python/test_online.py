"""Online adaptation (MedFMTrainLib.online) from corrected slices of Colin27's Thalamus_L (AAL 77).

A few decoder steps on two corrected slices (their embeddings are the cached ones the slices were
decoded with): the adapter must change the adapted segment's decodes and leave another segment's
(Putamen_L, AAL 73, no adapter) bitwise as they were; saving follows the store's rules.
"""
from __future__ import annotations

import numpy as np
import pytest

from MedFMSegmentLib.errors import InputError

THALAMUS_L, PUTAMEN_L = 77, 73


def padded_box(mask2d, pad):
    ys, xs = np.nonzero(mask2d)
    h, w = mask2d.shape
    return (max(int(xs.min()) - pad, 0), max(int(ys.min()) - pad, 0),
            min(int(xs.max()) + pad, w - 1), min(int(ys.max()) + pad, h - 1))


def test_online_adapter_changes_its_segment_only(colin27_session, colin27_aal, tmp_path):
    from MedFMTrainLib import online
    from MedFMTrainLib.store import load_adapter

    s = colin27_session
    thal = (colin27_aal == THALAMUS_L).astype(np.uint8)
    put = (colin27_aal == PUTAMEN_L).astype(np.uint8)
    k = 80
    s.reset()
    s.adapter = None
    assert online.adapt_from_corrections(s, "axial", organ="Thalamus_L") is None  # nothing corrected yet
    other_box = padded_box(put[k], 4)
    other_before, other_score, _ = s.predict("axial", k, other_box)
    own_box = padded_box(thal[k], 4)
    own_before, _, _ = s.predict("axial", k, own_box)
    for i in (k - 2, k + 2):
        s.predict("axial", i, padded_box(thal[i], 4))  # decoded before the user corrected it: cached
        s.set_slice_mask("axial", i, thal[i])
    s.set_slice_mask("axial", k + 12, np.zeros_like(thal[k]))  # an empty correction: no sample, no error
    misses = s.cache.misses
    cfg = online.OnlineConfig(steps=6)
    try:
        adapter = online.adapt_from_corrections(s, "axial", organ="Thalamus_L", config=cfg,
                                                out=tmp_path / "Thalamus_L")
        assert s.cache.misses - misses <= 2  # at most the two corrected windows, usually none
        assert adapter.manifest["online"]["samples"] == 2
        assert adapter.manifest["online"]["corrected_slices"] == [k - 2, k + 2, k + 12]
        assert adapter.tensors and any(float(t.abs().max()) > 0 for n, t in adapter.tensors.items() if "lora_B" in n)
        s.adapter = adapter
        own_after, _, _ = s.predict("axial", k, own_box)
        s.adapter = None
        assert not np.array_equal(own_after, own_before)  # the adapter is used by its segment
        other_after, other_score_after, _ = s.predict("axial", k, other_box)  # adapter injected, not applied
        assert np.array_equal(other_after, other_before) and other_score_after == other_score
        loaded = load_adapter(tmp_path / "Thalamus_L", s.model)
        assert loaded.digest == adapter.digest and loaded.manifest["online"]["samples"] == 2
        again = online.adapt_from_corrections(s, "axial", organ="Thalamus_L", base=adapter, config=cfg)
        assert again.digest != adapter.digest and again.settings == adapter.settings
        with pytest.raises(InputError, match="exists|already"):  # the saved adapter is not replaced silently
            online.adapt_from_corrections(s, "axial", organ="Thalamus_L", config=cfg, out=tmp_path / "Thalamus_L")
        with pytest.raises(InputError, match="organ"):
            online.adapt_from_corrections(s, "axial", organ=" ")
        with pytest.raises(InputError, match="steps"):
            online.adapt_from_corrections(s, "axial", organ="Thalamus_L", config=online.OnlineConfig(steps=0))
    finally:
        s.adapter = None
        for a in [v for v in locals().values() if hasattr(v, "detach") and hasattr(v, "peft_name")]:
            a.detach(s.model)
        s.reset()


def test_head_features_reproduce_the_whole_decoder(colin27_session, colin27_aal):
    """The frozen trunk + the trained head compute what the whole decoder computes (real cached embeddings)."""
    import torch

    from MedFMTrainLib import adapters as A
    from MedFMTrainLib import head_train

    s = colin27_session
    thal = (colin27_aal == THALAMUS_L).astype(np.uint8)
    k = 80
    box = padded_box(thal[k], 4)
    crop = s.crop_for("axial", box)
    emb = s.embedding("axial", k, crop).clone()
    boxes = torch.tensor(np.array([crop.box_to_model(box), crop.box_to_model(padded_box(thal[k], 1))]), dtype=torch.float32)
    embs = torch.cat([emb, emb])
    with torch.no_grad():
        want, want_iou = A.decode_batch(s.model, embs, boxes)
        got, got_iou = head_train.head_logits(s.model, head_train.trunk(s.model, embs, boxes))
    # fp16-stored keys / values / upscaled features: logits agree to fp16 rounding, the masks almost bitwise
    assert float((got - want).abs().max()) < 1e-3 * float(want.abs().max())
    assert float((got_iou - want_iou).abs().max()) < 1e-4
    agree = ((got > 0) == (want > 0)).float().mean()
    assert float(agree) > 0.999


def test_head_adaptation_trains_only_the_head_and_fits_the_corrections(colin27_session, colin27_aal):
    from MedFMTrainLib import head_train, online

    s = colin27_session
    thal = (colin27_aal == THALAMUS_L).astype(np.uint8)
    k = 80
    s.reset()
    s.adapter = None
    for i in (k - 2, k + 2):
        s.predict("axial", i, padded_box(thal[i], 4))
        s.set_slice_mask("axial", i, thal[i])
    try:
        adapter = online.adapt_from_corrections(s, "axial", organ="Thalamus_L", config=online.OnlineConfig(steps=8))
        m = adapter.manifest["online"]
        assert m["metrics"]["method"] == "head" and m["metrics"]["pool"] == 2 * 5
        assert m["metrics"]["train_dice_adapted"] >= m["metrics"]["train_dice_base"]
        import re

        trained = {n for n, t in adapter.tensors.items() if "lora_B" in n and float(t.abs().max()) > 0}
        assert trained and all(re.fullmatch(head_train.HEAD_MODULES, n.rsplit(".lora_B", 1)[0]) for n in trained)
    finally:
        s.reset()


def test_the_default_rule_names_why_it_does_not_adapt(litemedsam, colin27, colin27_aal, cranium_ct):
    """``adapter_updater``'s rule, before any training: the kind of image (by the intensity preset: the head CT
    is CT, Colin27 MR), and how many corrected slices hold the structure (an empty correction does not count)."""
    from MedFMTrainLib import online
    from MedFMSegmentLib.session import PromptSession

    mr, ct = PromptSession(litemedsam), PromptSession(litemedsam)
    mr.set_volume(*colin27)
    ct.set_volume(*cranium_ct)
    assert online.modality(mr) == "mr" and online.modality(ct) == "ct"
    thal = (colin27_aal == THALAMUS_L).astype(np.uint8)
    mr.set_slice_mask("axial", 80, thal[80])
    mr.set_slice_mask("axial", 95, np.zeros_like(thal[95]))
    assert online.skip_reason(mr, "axial") is None
    two = online.OnlineConfig(min_slices=2)
    assert "1 corrected slice(s)" in online.skip_reason(mr, "axial", two)
    ct_off = online.OnlineConfig(modalities=("mr",))
    ct.set_slice_mask("axial", 54, np.ones((256, 256), np.uint8))
    assert "off on CT" in online.skip_reason(ct, "axial", ct_off) and online.skip_reason(mr, "axial", ct_off) is None
    update = online.adapter_updater(two)
    base = object()
    assert update(mr, "axial", "Thalamus_L", base) is base and "starts at 2" in update.reason
    with pytest.raises(InputError, match="modalities"):
        online.OnlineConfig(modalities=("pet",)).check()
