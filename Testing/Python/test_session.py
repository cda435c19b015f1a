"""Tests of MedFMSegmentLib.session on real data (Colin27 MRI + AAL atlas, the head CT).

The image encoder is the expensive step (about a second per slice on 2 free CPU cores, far more on a
loaded machine), so the Colin27 session is shared (conftest) and the tests reuse its cached
embeddings; cache, prefetch and undo mechanics that need no real embedding run on a stand-in encoder.

Measured with LiteMedSAM on the middle axial slice of Thalamus_L (k=80), box = atlas box + 4 px:
Dice 0.81 vs 0.69 for the ellipse inscribed in the same box (k=74: 0.80 vs 0.69, k=87: 0.90 vs 0.65);
one positive click near the centre: Dice 0.73 (k=74: 0.76, k=87: 0.61).
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from MedFMSegmentLib import geometry
from MedFMSegmentLib.errors import InputError
from MedFMSegmentLib.preprocess import box_crop, full_slice_crop, slice_to_model
from MedFMSegmentLib.session import EmbeddingCache, PromptSession

THALAMUS_L = 77
PAD = 4  # pixels added around the atlas box on each side


def dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def padded_box(mask2d, pad):
    ys, xs = np.nonzero(mask2d)
    h, w = mask2d.shape
    return (max(int(xs.min()) - pad, 0), max(int(ys.min()) - pad, 0),
            min(int(xs.max()) + pad, w - 1), min(int(ys.max()) + pad, h - 1))


def ellipse_in_box(shape, box):
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    ry, rx = (y1 - y0 + 1) / 2, (x1 - x0 + 1) / 2
    return (((yy - (y0 + y1) / 2) / ry) ** 2 + ((xx - (x0 + x1) / 2) / rx) ** 2 <= 1).astype(np.uint8)


def in_box_fraction(mask, box):
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return float(mask[y0:y1 + 1, x0:x1 + 1].sum() / max(mask.sum(), 1))


def snapshot(session: PromptSession):
    """Everything a failed call must leave unchanged."""
    states = {}
    for key in session.prompted_slices():
        st = session.slice_state(*key)
        states[key] = (st.box_xy, list(st.points), st.mask.copy(), st.score)
    return states, len(session._history)


def assert_unchanged(session, before):
    states, history = snapshot(session)
    assert history == before[1]
    assert states.keys() == before[0].keys()
    for key, (box, points, mask, score) in before[0].items():
        b2, p2, m2, s2 = states[key]
        assert (b2, p2, s2) == (box, points, score) and np.array_equal(m2, mask), key


# ----------------------------------------------------------------------------- Colin27 fixtures

@pytest.fixture(scope="module")
def thalamus(colin27_aal):
    """(Thalamus_L mask [k, j, i], its middle axial slice index, the atlas box + PAD on that slice)."""
    mask = (colin27_aal == THALAMUS_L).astype(np.uint8)
    ks = np.nonzero(mask.sum(axis=(1, 2)))[0]
    k = int((ks.min() + ks.max()) // 2)
    return mask, k, padded_box(mask[k], PAD)


@pytest.fixture
def mri(colin27_session):
    """The shared Colin27 session (conftest) with no prompts; its cached embeddings are kept and its
    model counts encodings in ``.calls``."""
    colin27_session.reset()
    return colin27_session


@pytest.fixture
def prompted(mri, thalamus):
    """The Colin27 session with the Thalamus_L box on its middle axial slice."""
    _, k, box = thalamus
    mri.add_box("axial", k, box)
    return mri


# ----------------------------------------------------------------------------- accuracy on real data

def test_box_on_thalamus_beats_the_ellipse_baseline(mri, thalamus):
    mask3d, k, box = thalamus
    gt = mask3d[k]
    r = mri.add_box("axial", k, box)
    assert (r.axis, r.index, r.box_xy) == ("axial", k, tuple(float(v) for v in box))
    assert r.mask.dtype == np.uint8 and r.mask.shape == gt.shape and set(np.unique(r.mask)) <= {0, 1}
    d, baseline = dice(r.mask, gt), dice(ellipse_in_box(gt.shape, box), gt)
    assert d > 0.75, f"Dice {d:.3f}"
    assert d > baseline + 0.05, f"Dice {d:.3f} vs ellipse-in-box {baseline:.3f}"
    assert in_box_fraction(r.mask, box) > 0.97
    assert 0.5 < r.score <= 1.0
    vol = mri.mask_volume()
    assert vol.sum() == r.mask.sum() and np.array_equal(vol[k], r.mask)


def test_second_prompt_on_the_same_slice_runs_only_the_decoder(mri, thalamus):
    _, k, box = thalamus
    mri.add_box("axial", k, box)
    calls, hits = mri.model.calls, mri.cache.hits
    x0, y0, x1, y1 = box
    r = mri.add_box("axial", k, (x0 + 1, y0 + 1, x1 - 1, y1 - 1))  # a slightly smaller box
    ys, xs = np.nonzero(r.mask)
    mri.add_point(axis="axial", index=k, xy_slice=(float(xs[0]), float(ys[0])), positive=False)
    assert mri.model.calls == calls, "a prompt on an already encoded slice ran the image encoder"
    assert mri.cache.hits >= hits + 2


def test_one_positive_click_at_the_centre(mri, thalamus):
    mask3d, k, _ = thalamus
    gt = mask3d[k]
    ys, xs = np.nonzero(gt)
    nearest = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
    x, y = int(xs[nearest]), int(ys[nearest])
    r = mri.add_point(ijk=(x, y, k), positive=True, axis="axial")
    assert r.mask[y, x] == 1
    assert dice(r.mask, gt) > 0.6, f"Dice {dice(r.mask, gt):.3f}"
    assert r.box_xy is not None and in_box_fraction(r.mask, r.box_xy) > 0.97  # the click became a box
    st = mri.slice_state("axial", k)
    assert st.points == [((float(x), float(y)), True)] and not st.user_box


def test_negative_click_removes_area(prompted, thalamus):
    _, k, _ = thalamus
    before = prompted.slice_state("axial", k).mask.copy()
    ys, xs = np.nonzero(before)
    right = np.argmax(xs)  # the rightmost mask pixel: near the box's right edge
    x, y = int(xs[right]) - 1, int(ys[right])
    assert before[y, x] == 1
    r = prompted.add_point(axis="axial", index=k, xy_slice=(x, y), positive=False)
    assert r.mask[y, x] == 0
    assert r.mask.sum() < before.sum()
    new_pixels = (r.mask > 0) & (before == 0)
    assert new_pixels.sum() <= 0.05 * before.sum()  # it shrank, it did not move


def test_negative_click_is_a_local_cut(prompted, thalamus):
    """A negative click on the mask's edge removes only the part near it; the far side stays."""
    _, k, _ = thalamus
    before = prompted.slice_state("axial", k).mask.copy()
    ys, xs = np.nonzero(before)
    x, y = int(xs.max()) - 1, int(ys[np.argmax(xs)])
    r = prompted.add_point(axis="axial", index=k, xy_slice=(x, y), positive=False)
    assert not ((r.mask > 0) & (before == 0)).any()  # a cut: nothing added
    assert before.sum() - r.mask.sum() >= 10  # a region went, not just the clicked pixel
    left = xs < np.median(xs)
    assert r.mask[ys[left], xs[left]].all()  # the half away from the click is untouched
    assert r.box_xy == prompted.slice_state("axial", k).box_xy  # the box is kept; the mask is edited


def test_positive_click_outside_the_mask_adds_the_object_under_it(mri, thalamus):
    """Start from a box too small for the thalamus; a click on a missed part far outside it grows the box."""
    mask3d, k, _ = thalamus
    gt = mask3d[k]
    ys, xs = np.nonzero(gt)
    xm, ym = int(np.median(xs)), int(np.median(ys))
    small = (xm - 3, ym - 3, xm + 3, ym + 3)
    before = mri.add_box("axial", k, small).mask.copy()
    fn = (gt > 0) & (before == 0)
    fy, fx = np.nonzero(fn)
    far = np.argmax((fx - xm) ** 2 + (fy - ym) ** 2)  # a missed pixel far from the box
    far_xy = (int(fx[far]), int(fy[far]))
    inside_box = small[0] <= far_xy[0] <= small[2] and small[1] <= far_xy[1] <= small[3]
    assert not inside_box
    r = mri.add_point(axis="axial", index=k, xy_slice=far_xy, positive=True)
    assert r.mask[far_xy[1], far_xy[0]] == 1
    x0, y0, x1, y1 = r.box_xy
    assert x0 <= far_xy[0] <= x1 and y0 <= far_xy[1] <= y1
    assert dice(r.mask, gt) > dice(before, gt) + 0.05


def test_undo_and_reset(prompted, thalamus):
    _, k, box = thalamus
    first = prompted.slice_state("axial", k)
    first_mask = first.mask.copy()
    ys, xs = np.nonzero(first_mask)
    prompted.add_point(axis="axial", index=k, xy_slice=(float(xs.max() - 1), float(ys[np.argmax(xs)])),
                       positive=False)
    assert not np.array_equal(prompted.slice_state("axial", k).mask, first_mask)
    r = prompted.undo()
    assert r.index == k and np.array_equal(r.mask, first_mask) and r.box_xy == tuple(float(v) for v in box)
    assert np.array_equal(prompted.slice_state("axial", k).mask, first_mask)
    assert prompted.slice_state("axial", k).points == []
    assert prompted.undo() is None  # the box itself
    assert prompted.prompted_slices() == [] and prompted.mask_volume().sum() == 0
    with pytest.raises(InputError, match="nothing to undo"):
        prompted.undo()

    cached = len(prompted.cache)
    prompted.add_box("axial", k, box)
    prompted.reset()
    assert prompted.prompted_slices() == [] and prompted.mask_volume().sum() == 0
    assert len(prompted.cache) == cached  # reset keeps the embeddings
    with pytest.raises(InputError, match="nothing to undo"):
        prompted.undo()


# ----------------------------------------------------------------------------- anisotropic CT

def test_anisotropic_slices_are_resampled_to_square_pixels(cranium_ct):
    array_kji, ijk_to_ras = cranium_ct
    sy, sx = geometry.slice_pixel_spacing(ijk_to_ras, "coronal")
    assert sy == pytest.approx(1.5, abs=1e-3) and sx == pytest.approx(0.957, abs=1e-3)
    shape = geometry.slice_shape(array_kji.shape, "coronal")
    for crop in (full_slice_crop(shape, (sy, sx), 256), box_crop((100, 40, 140, 70), shape, (sy, sx), 256)):
        assert crop.sy / crop.sx == pytest.approx(sy / sx, rel=1e-6)  # model pixels are square in mm
    axial = geometry.slice_pixel_spacing(ijk_to_ras, "axial")
    crop = full_slice_crop(geometry.slice_shape(array_kji.shape, "axial"), axial, 256)
    assert crop.sx == pytest.approx(crop.sy)

    # a 30 mm x 30 mm bright square drawn on a coronal slice is square in the model input
    slice_u8 = np.zeros(shape, np.uint8)
    rows, cols = int(round(30 / sy)), int(round(30 / sx))
    slice_u8[30:30 + rows, 90:90 + cols] = 255
    crop = full_slice_crop(shape, (sy, sx), 256)
    image = slice_to_model(slice_u8, crop)
    ys, xs = np.nonzero(image > 0.5)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert height == pytest.approx(width, rel=0.08), (height, width)


def test_coronal_box_on_the_ct_head(litemedsam, cranium_ct, cranium_head):
    """The CT's coronal slices have 1.5 mm rows and 0.96 mm columns: the mask must stay in the head.

    (LiteMedSAM segments the intracranial space from a whole-head box: measured 0.998 of the mask in
    the head, covering 0.82 of it on the middle coronal slice.)
    """
    s = PromptSession(litemedsam)
    s.set_volume(*cranium_ct, preset="ct-full")  # the geometry under test; the default window is per box
    assert s.preset == "ct-full"
    js = np.nonzero(cranium_head.sum(axis=(0, 2)))[0]
    j = int((js.min() + js.max()) // 2)
    gt = geometry.get_slice(cranium_head, "coronal", j)
    box = padded_box(gt, 3)
    r = s.add_box("coronal", j, box)
    assert r.mask.shape == gt.shape == (108, 256)
    precision = (r.mask & gt).sum() / max(r.mask.sum(), 1)
    coverage = (r.mask & gt).sum() / gt.sum()
    assert precision > 0.97, f"{precision:.3f} of the mask is inside the head"
    assert coverage > 0.6, f"the mask covers {coverage:.3f} of the head"
    # it reaches close to the top of the head in k (rows are 1.5 mm: a squeezed model input would not)
    top_gt, top_mask = np.nonzero(gt.any(axis=1))[0].max(), np.nonzero(r.mask.any(axis=1))[0].max()
    assert top_gt - top_mask <= 10
    s.close()


# ----------------------------------------------------------------------------- bad input

def test_set_volume_errors_keep_the_previous_volume(prompted, thalamus, colin27):
    _, k, box = thalamus
    before = snapshot(prompted)
    shape, token, slice_before = prompted.shape, prompted._token, prompted.normalised_slice("axial", k).copy()
    array_kji, ijk_to_ras = colin27
    small = np.arange(120, dtype=np.float32).reshape(4, 5, 6)
    nan = small.copy()
    nan[1, 2, 3] = np.nan
    inf = small.copy()
    inf[0, 0, 0] = np.inf
    bad = [
        ((array_kji[80], ijk_to_ras), InputError, r"3D array .* got 2D"),
        ((small[None], ijk_to_ras), InputError, r"3D array .* got 4D"),
        ((np.repeat(small[..., None], 3, axis=3), ijk_to_ras), InputError, r"3 components per voxel .* RGB"),
        ((nan, ijk_to_ras), InputError, r"1 NaN or inf voxels .*\[k, j, i\] = \(1, 2, 3\)"),
        ((inf, ijk_to_ras), InputError, r"NaN or inf"),
        ((np.full((4, 5, 6), 7, np.int16), ijk_to_ras), InputError, r"constant .* 7"),
        ((small, np.eye(3)), ValueError, r"4x4 matrix, got shape \(3, 3\)"),
        ((small, np.zeros((4, 4))), ValueError, r"singular|last row"),
    ]
    for args, error, message in bad:
        with pytest.raises(error, match=message):
            prompted.set_volume(*args)
    with pytest.raises(InputError, match=r"unknown intensity preset 'ct-foo'"):
        prompted.set_volume(small, ijk_to_ras, preset="ct-foo")
    assert prompted.shape == shape and prompted._token == token
    assert np.array_equal(prompted.normalised_slice("axial", k), slice_before)
    assert_unchanged(prompted, before)
    calls = prompted.model.calls
    prompted.add_box("axial", k, box)  # the old volume's embeddings are still valid and used
    assert prompted.model.calls == calls


@pytest.mark.parametrize("box, message", [
    ((), r"box must be \(x0, y0, x1, y1\)"),
    ((10, 20, 30), r"box must be \(x0, y0, x1, y1\)"),
    (("a", 1, 2, 3), r"box must be"),
    ((10, 20, float("nan"), 40), r"NaN or inf"),
    ((30, 20, 10, 40), r"inverted"),
    ((10, 40, 30, 20), r"inverted"),
    ((500, 500, 600, 600), r"outside the axial slice \d+ \(x 0\.\.180, y 0\.\.216\)"),
    ((-50, -50, -10, -10), r"outside the axial slice \d+"),
])
def test_bad_box_changes_nothing(prompted, thalamus, box, message):
    _, k, _ = thalamus
    before = snapshot(prompted)
    with pytest.raises(InputError, match=message):
        prompted.add_box("axial", k, box)
    assert_unchanged(prompted, before)


def test_bad_points_slices_and_axes_change_nothing(prompted, thalamus):
    _, k, box = thalamus
    before = snapshot(prompted)
    n_axial = prompted.shape[0]
    cases = [
        (lambda: prompted.add_point(axis="axial", index=k, xy_slice=(-5.0, 10.0)), InputError, r"outside the axial"),
        (lambda: prompted.add_point(axis="axial", index=k, xy_slice=(10.0, 1e6)), InputError, r"outside the axial"),
        (lambda: prompted.add_point(ijk=(1, 2)), InputError, r"3 finite numbers"),
        (lambda: prompted.add_point(ijk=(1, np.nan, 3)), InputError, r"3 finite numbers"),
        (lambda: prompted.add_point(axis="axial"), InputError, r"needs ijk="),
        (lambda: prompted.add_point(ijk=(10, 10, n_axial + 5)), IndexError, rf"axial slice index {n_axial + 5} is out"),
        (lambda: prompted.add_box("axial", n_axial, box), IndexError, rf"out of range.*0\.\.{n_axial - 1}"),
        (lambda: prompted.add_box("axial", -1, box), IndexError, r"out of range"),
        (lambda: prompted.add_box("axial", 80.5, box), TypeError, r"must be an integer"),
        (lambda: prompted.add_box("oblique", k, box), ValueError, r"unknown axis 'oblique'"),
        (lambda: prompted.add_point(ijk=(10, 10, 10), axis="transverse"), ValueError, r"unknown axis"),
        (lambda: prompted.prefetch("axial", [k, n_axial]), IndexError, r"out of range"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message) as info:
            call()
        assert isinstance(info.value, InputError), f"{type(info.value).__name__}: every input error is an InputError"
        assert_unchanged(prompted, before)
    assert prompted._futures == {}  # a bad index anywhere in a prefetch list queues nothing


def test_no_volume_is_a_clear_error(litemedsam):
    s = PromptSession(litemedsam)
    with pytest.raises(InputError, match="no volume"):
        s.add_box("axial", 0, (0, 0, 5, 5))
    with pytest.raises(InputError, match="no volume"):
        s.mask_volume()


# ----------------------------------------------------------------------------- cache and prefetch

def test_embedding_cache_is_an_lru_bounded_in_bytes():
    one = torch.zeros(1, 256, 8, 8)
    nbytes = one.element_size() * one.nelement()
    cache = EmbeddingCache(max_bytes=int(2.5 * nbytes))
    cache.put("a", one)
    cache.put("b", one.clone())
    assert len(cache) == 2 and cache.nbytes == 2 * nbytes
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", one.clone())
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert len(cache) == 2 and cache.nbytes == 2 * nbytes <= cache.max_bytes
    cache.put("c", one.clone())  # same key again: no double counting
    assert cache.nbytes == 2 * nbytes
    big = torch.zeros(1, 256, 16, 16)  # larger than the bound on its own: kept alone
    cache.put("big", big)
    assert len(cache) == 1 and cache.get("big") is big
    hits, misses = cache.hits, cache.misses
    cache.get("nope")
    assert (cache.hits, cache.misses) == (hits, misses + 1)
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def fake_model(litemedsam, gate: threading.Event = None):
    """LiteMedSAM's spec and decoder with a stand-in encoder: embedding = the image's mean, everywhere."""
    m = dataclasses.replace(litemedsam)
    m.calls = []

    def encode(image01):
        m.calls.append(float(image01.mean()))
        if gate is not None:
            gate.wait(30)
        return torch.full((1, 256, 64, 64), float(image01.mean()))

    m.encode = encode
    return m


def test_prefetch_fills_the_cache(litemedsam, colin27, thalamus):
    _, k, box = thalamus
    model = fake_model(litemedsam)
    s = PromptSession(model, cache=EmbeddingCache())
    s.set_volume(*colin27)
    futures = s.prefetch("axial", [k - 1, k, k + 1], box)
    assert len(futures) == 3
    embeddings = [f.result(timeout=60) for f in futures]
    assert len(s.cache) == 3 and len(model.calls) == 3
    crop = s.crop_for("axial", box)
    for index, emb in zip((k - 1, k, k + 1), embeddings):
        expected = slice_to_model(s.normalised_slice("axial", index), crop).mean()
        assert float(emb.flatten()[0]) == pytest.approx(float(expected), rel=1e-5)  # the right slice
        assert s.embedding("axial", index, crop) is emb
    assert s.prefetch("axial", [k], box) == []  # already cached: nothing submitted
    s.add_box("axial", k, box)
    assert len(model.calls) == 3  # the prompt used the prefetched embedding
    s.close()


def test_a_shared_cache_never_serves_another_set_volume(litemedsam, colin27, thalamus):
    _, k, box = thalamus
    model = fake_model(litemedsam)
    cache = EmbeddingCache()
    a, b = PromptSession(model, cache=cache), PromptSession(model, cache=cache)
    a.set_volume(*colin27)
    b.set_volume(*colin27)
    a.add_box("axial", k, box)
    assert len(model.calls) == 1
    b.add_box("axial", k, box)
    assert len(model.calls) == 2  # another set_volume: another volume token, never a stale embedding
    a.add_box("axial", k, box)
    assert len(model.calls) == 2


CANCEL_PROBE = r"""
import dataclasses, json, os, sys, threading, time
sys.path[:0] = [{segment!r}]
import numpy as np, torch
from MedFMSegmentLib import models
from MedFMSegmentLib.session import PromptSession
spec = models.get_spec("litemedsam")
model = models.PromptableModel(spec, None, torch.device("cpu"), "test", "none", "0" * 64)
started, gate, calls = threading.Event(), threading.Event(), []
def encode(image01):
    calls.append(1)
    started.set()
    gate.wait(20)
    return torch.zeros(1, 256, 64, 64)
model.encode = encode
s = PromptSession(model)
s.set_volume(np.random.default_rng(0).random((12, 40, 40)).astype(np.float32), np.eye(4))
futures = s.prefetch("axial", [1, 2, 3, 4, 5], (5, 5, 30, 30))
started.wait(20)
worker = threading.Thread(target=s.cancel_prefetch, daemon=True)
worker.start()
worker.join(5)
deadlock = worker.is_alive()
gate.set()
if not deadlock:
    futures[0].result(20)
    s.close()
print(json.dumps({{"deadlock": deadlock, "calls": len(calls), "cancelled": [f.cancelled() for f in futures],
                  "cached": len(s.cache)}}))
sys.stdout.flush()
os._exit(0)
"""


def test_prefetch_can_be_cancelled():
    """Queued encodes are cancelled; the one running finishes and is cached (run in a subprocess: a
    deadlock must not hang the test run)."""
    script = CANCEL_PROBE.format(segment=str(Path(__file__).resolve().parents[2] / "MedFMSegment"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["deadlock"], "cancel_prefetch did not return (deadlock)"
    assert out["calls"] == 1 and out["cancelled"] == [False, True, True, True, True] and out["cached"] == 1
