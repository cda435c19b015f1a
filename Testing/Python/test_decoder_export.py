"""The folded mask decoder (decoder_export.FoldedDecoder, what OpenVINO runs) computes SAM's decoder: on real
embeddings of Colin27 and the head CT, its masks equal the unmodified torch decoder's (also in the blocked
order the export returns, put back in image order by unblock_masks), the OpenVINO decoder's single and
multimask answers equal torch's on the slice grid, and the OpenVINO session's prompt-to-mask agrees with the
torch fp32 session on real slices."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from MedFMSegmentLib import geometry, models, runtimes
from MedFMSegmentLib.decoder_export import FoldedDecoder, unblock_masks
from MedFMSegmentLib.preprocess import model_to_slice, slice_to_model
from MedFMSegmentLib.session import PromptSession

THALAMUS_L, PUTAMEN_L, CAUDATE_R = 77, 73, 72


def _boxes_on(labels_kji, label, margin=3):
    """(axial index, +margin box) on the middle slice of an atlas label."""
    ks = np.nonzero((labels_kji == label).any(axis=(1, 2)))[0]
    k = int(ks[len(ks) // 2])
    ys, xs = np.nonzero(labels_kji[k] == label)
    return k, (float(xs.min() - margin), float(ys.min() - margin), float(xs.max() + margin), float(ys.max() + margin))


@pytest.fixture(scope="module")
def real_embeddings(litemedsam, colin27, colin27_aal, cranium_ct):
    """(embedding, crop, box, slice shape) for two Colin27 structures and a box on the head CT."""
    out = []
    for volume, label_box in ((colin27, _boxes_on(colin27_aal, THALAMUS_L)), (colin27, _boxes_on(colin27_aal, PUTAMEN_L)),
                              (cranium_ct, (54, (60.0, 70.0, 140.0, 150.0)))):
        s = PromptSession(litemedsam)
        s.set_volume(*volume)
        k, box = label_box
        crop = s.crop_for("axial", box, k)
        emb = litemedsam.encode(slice_to_model(s.normalised_slice("axial", k, crop.preset), crop))
        out.append((emb, crop, box, geometry.slice_shape(s.shape, "axial")))
    return out


def test_the_folded_decoder_equals_sams_decoder_on_real_embeddings(litemedsam, real_embeddings):
    pe, md = litemedsam.net.prompt_encoder, litemedsam.net.mask_decoder
    with torch.inference_mode():
        dense_pe = pe.get_dense_pe()
        _, no_mask = pe(points=None, boxes=torch.zeros(1, 4), masks=None)
        folded = FoldedDecoder(md, dense_pe, no_mask).eval()
        for emb, crop, box, shape in real_embeddings:
            bm = [float(v) for v in crop.box_to_model(box)]
            x0, y0, x1, y1 = bm
            prompts = [dict(boxes=torch.tensor([bm], dtype=torch.float32)),  # the box, a grown box, box + points
                       dict(boxes=torch.tensor([[x0 - 3, y0 - 3, x1 + 3, y1 + 3]], dtype=torch.float32)),
                       dict(boxes=torch.tensor([bm], dtype=torch.float32),
                            points=(torch.tensor([[[(x0 + x1) / 2, (y0 + y1) / 2], [x0 + 1, y0 + 1]]]),
                                    torch.tensor([[1, 0]])))]
            for kw in prompts:
                sparse, dense = pe(points=kw.get("points"), boxes=kw["boxes"], masks=None)
                ref_masks, ref_iou = md.predict_masks(emb, dense_pe, sparse, dense)
                masks, iou = folded(emb, sparse)
                assert float((masks - ref_masks).abs().max()) <= 1e-3 * float(ref_masks.abs().max())
                assert float((iou - ref_iou).abs().max()) <= 1e-4
                for c in range(masks.shape[1]):  # each of the four masks, on the slice grid
                    a = model_to_slice(ref_masks[0, c], crop, shape) > 0
                    b = model_to_slice(masks[0, c], crop, shape) > 0
                    assert runtimes.dice(a, b) >= 0.999 and a.sum() > 50


def test_the_blocked_masks_unblock_to_the_image_order(litemedsam, real_embeddings):
    pe, md = litemedsam.net.prompt_encoder, litemedsam.net.mask_decoder
    with torch.inference_mode():
        dense_pe = pe.get_dense_pe()
        _, no_mask = pe(points=None, boxes=torch.zeros(1, 4), masks=None)
        plain, blocked = (FoldedDecoder(md, dense_pe, no_mask, blocked=b).eval() for b in (False, True))
        emb, crop, box, _ = real_embeddings[0]
        sparse, _ = pe(points=None, boxes=torch.tensor([[float(v) for v in crop.box_to_model(box)]]), masks=None)
        masks, iou = plain(emb, sparse)
        b_masks, b_iou = blocked(emb, sparse)
    assert b_masks.shape == (1, 4, 4, 4, 64 * 64) and torch.equal(iou, b_iou)
    for pick in ([0], [1, 2, 3]):
        got = unblock_masks(b_masks.numpy(), pick, (64, 64))
        assert got.shape == (len(pick), 256, 256) and got.flags["C_CONTIGUOUS"]
        assert np.array_equal(got, masks[0, pick].numpy())


@pytest.fixture(scope="module")
def ov_litemedsam():
    pytest.importorskip("openvino")
    m = models.load_model("litemedsam", device="cpu", runtime="openvino", precision="fp32")
    if m.runtime_info.get("decoder") != "openvino":
        pytest.fail(f"the OpenVINO decoder was not attached: {m.runtime_info}")
    return m


def test_openvino_decoder_masks_equal_torch_on_real_embeddings(ov_litemedsam, litemedsam, real_embeddings):
    for emb, crop, box, shape in real_embeddings:
        fast, fast_iou = ov_litemedsam.decode(emb, crop.box_to_model(box), fast=True)
        ref, ref_iou = litemedsam.decode(emb, crop.box_to_model(box))
        a, b = model_to_slice(ref[0], crop, shape) > 0, model_to_slice(fast[0], crop, shape) > 0
        assert runtimes.dice(a, b) >= 0.999 and a.sum() > 50
        assert abs(float(fast_iou[0]) - float(ref_iou[0])) <= 1e-3


def test_openvino_single_and_multimask_answers_equal_torch_on_the_slice(ov_litemedsam, litemedsam, real_embeddings):
    """The fast path's masks after resampling to the slice (what a prompt returns), single and multimask, on
    the same cached embeddings: Dice >= 0.999 against the unmodified torch decoder, IoUs within 1e-3."""
    for emb, crop, box, shape in real_embeddings:
        x0, y0, x1, y1 = crop.box_to_model(box)
        for box_model in ((x0, y0, x1, y1), (x0 + 2, y0 + 2, x1 - 2, y1 - 2)):
            for multimask in (False, True):
                fast, fast_iou = ov_litemedsam.decode(emb, box_model, multimask=multimask, fast=True)
                ref, ref_iou = litemedsam.decode(emb, box_model, multimask=multimask)
                # the fast path returns numpy (no torch needed), the torch decoder a tensor
                assert fast.shape == ref.shape == (3 if multimask else 1, 256, 256)
                assert isinstance(fast, np.ndarray) and fast.dtype == np.float32
                for c in range(ref.shape[0]):
                    a, b = model_to_slice(ref[c], crop, shape) > 0, model_to_slice(fast[c], crop, shape) > 0
                    assert runtimes.dice(a, b) >= 0.999
                assert np.abs(fast_iou - ref_iou).max() <= 1e-3


def test_openvino_prompt_to_mask_agrees_with_the_torch_fp32_session(ov_litemedsam, litemedsam, colin27, colin27_aal):
    """Encoder and decoder on OpenVINO against torch fp32, a first and a second box per slice (Dice >= 0.995)."""
    sessions = [PromptSession(m) for m in (litemedsam, ov_litemedsam)]
    for s in sessions:
        s.set_volume(*colin27)
    for label in (CAUDATE_R,):  # (one slice: < 20 s on a loaded 2-core machine)
        k, (x0, y0, x1, y1) = _boxes_on(colin27_aal, label)
        for box in ((x0, y0, x1, y1), (x0 + 1, y0 + 1, x1 - 1, y1 - 1)):
            ref, got = (s.add_box("axial", k, box) for s in sessions)
            assert ref.mask.sum() > 50 and runtimes.dice(ref.mask, got.mask) >= 0.995
            assert abs(ref.score - got.score) <= 0.01
    for s in sessions:
        s.close()


def test_roi_mode_runs_on_the_exported_decoder_and_agrees_with_torchs(ov_litemedsam, colin27, colin27_aal):
    """ROI -> 3D decodes through the exported decoder, as a box does (it ran SAM's torch decoder: 158 decodes
    of 117 ms for a 40-slice hippocampus, 46 -> 30 s end to end), with the torch decoder's masks (Dice >= 0.999)."""
    import dataclasses

    from MedFMSegmentLib.propagate import segment_roi

    (k0, j0, i0), (k1, j1, i1) = geometry.bbox_kji((colin27_aal == THALAMUS_L).astype(np.uint8))
    k0 = (k0 + k1) // 2 - 2  # five slices of the thalamus' ROI
    roi_ijk = ((i0 - 2, j0 - 2, k0), (i1 + 2, j1 + 2, k0 + 4))
    results = {}
    for name, model in (("fast", ov_litemedsam), ("torch", dataclasses.replace(ov_litemedsam, _fast_decoder=None))):
        s = PromptSession(model)
        s.set_volume(*colin27)
        calls = []
        original = model.net.mask_decoder.predict_masks  # what SAM's decoder runs, whichever the entry
        model.net.mask_decoder.predict_masks = lambda *a, **k: calls.append(1) or original(*a, **k)
        try:
            results[name] = (segment_roi(s, roi_ijk, axis="axial").mask, len(calls))
        finally:
            del model.net.mask_decoder.predict_masks
        s.close()
    (fast, fast_torch_calls), (ref, ref_calls) = results["fast"], results["torch"]
    assert fast_torch_calls == 0 and ref_calls > 0
    assert ref.any() and 2 * (fast & ref).sum() / (fast.sum() + ref.sum()) >= 0.999


def test_decode_all_is_the_single_and_the_multimask_answers_of_one_run(ov_litemedsam, litemedsam, real_embeddings):
    """``decode_all`` (the ROI mode's one decoder run per box) equals decode(multimask=False) followed by
    decode(multimask=True), bitwise, on the exported decoder and on SAM's torch decoder."""
    for model, fast in ((ov_litemedsam, True), (litemedsam, False)):
        for emb, crop, box, _ in real_embeddings:
            bm = crop.box_to_model(box)
            logits, iou = model.decode_all(emb, bm, fast=fast)
            one, iou_one = model.decode(emb, bm, multimask=False, fast=fast)
            three, iou_three = model.decode(emb, bm, multimask=True, fast=fast)
            assert logits.shape == (4, 256, 256) and iou.shape == (4,)
            logits, one, three = (torch.as_tensor(x) for x in (logits, one, three))
            assert torch.equal(logits, torch.cat([one, three])) and np.array_equal(iou, np.concatenate([iou_one, iou_three]))


def _random_adapter(model, scale=0.05):
    """An organ adapter with non-zero LoRA weights (B is zero after injection: the adapter would change nothing)."""
    from MedFMTrainLib import adapters as A

    settings = A.LoraSettings(rank=4, alpha=8.0, targets="decoder")
    A.inject(model, "medfm_test_fast", settings, seed=0)
    try:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in A.lora_parameters(model, "medfm_test_fast"):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
        tensors = A.state(model, "medfm_test_fast")
    finally:
        A.remove(model, "medfm_test_fast")
    return A.OrganAdapter("Thalamus_L", model.spec.id, model.checkpoint_sha256, settings, tensors)


def test_an_adapter_decodes_on_its_own_exported_decoder(ov_litemedsam, litemedsam, real_embeddings):
    """An organ adapter's LoRA merged into a copy of the decoder and exported (``OrganAdapter.fast_decoder``, what
    re-propagation with an online adapter runs): on real embeddings its answers equal the torch decoder's with the
    adapter applied; the base model's own export is still used afterwards and gives bitwise what it gave before
    (another segment's result); on a torch model there is no export and the torch decoder runs with the adapter."""
    m = ov_litemedsam
    prompts = [(emb, crop.box_to_model(box)) for emb, crop, box, _ in real_embeddings]
    before = [m.decode(emb, box, fast=True) for emb, box in prompts]
    adapter = _random_adapter(m)
    try:
        fast = adapter.fast_decoder(m)
        assert fast is not None and adapter.fast_decoder(m) is fast, "built once per model"
        for (emb, box), (base, _) in zip(prompts, before):
            got, iou = m.decode(emb, box, fast=True, adapter=adapter)
            assert isinstance(got, np.ndarray), "the exported decoder ran (torch returns a tensor)"
            with adapter.applied(m):
                ref, ref_iou = m.decode(emb, box)
            ref = ref.numpy()
            assert float(np.abs(ref - base).max()) > 0.5, "the adapter changes the answer"
            np.testing.assert_allclose(got, ref, atol=2e-3)  # measured ~2e-5
            np.testing.assert_allclose(iou, ref_iou, atol=1e-3)
        for (emb, box), (base, base_iou) in zip(prompts, before):
            again, again_iou = m.decode(emb, box, fast=True)
            assert isinstance(again, np.ndarray), "the base export is still used beside the adapter's layers"
            np.testing.assert_array_equal(again, base)
            np.testing.assert_array_equal(again_iou, base_iou)
        assert adapter.fast_decoder(litemedsam) is None  # the torch runtime: nothing exported
        emb, box = prompts[0]
        got, _ = litemedsam.decode(emb, box, fast=True, adapter=adapter)
        with adapter.applied(litemedsam):
            ref, _ = litemedsam.decode(emb, box)
        assert torch.equal(got, ref)
    finally:
        adapter.detach(m)
        adapter.detach(litemedsam)
