"""Encoding ahead (propagation look-ahead, cancellation), the fp16 embedding cache and a session's memory.

The look-ahead tests use a stand-in encoder (the image's mean everywhere, like test_session.py's) with
the real decoder: what they check is which slice and window each embedding comes from.
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

from MedFMSegmentLib.propagate import propagate
from MedFMSegmentLib.session import EmbeddingCache, PromptSession, SessionConfig

SEGMENT_DIR = Path(__file__).resolve().parents[2] / "MedFMSegment"
THALAMUS_L = 77


@pytest.fixture(scope="module")
def real_embedding(litemedsam, colin27, thalamus_roi):
    """One real embedding (the ROI's middle slice): the stand-in scales it by each image's mean."""
    from MedFMSegmentLib import geometry
    from MedFMSegmentLib.preprocess import slice_to_model

    s = PromptSession(litemedsam)
    s.set_volume(*colin27)
    (i0, j0, k0), (i1, j1, k1) = thalamus_roi
    crop = s.crop_for("axial", (i0, j0, i1, j1))
    return litemedsam.encode(slice_to_model(s.normalised_slice("axial", (k0 + k1) // 2), crop))


def stand_in(litemedsam, embedding, gate: threading.Event = None):
    """The real decoder with a cheap encoder: ``embedding`` times a factor from the image's mean, so
    another slice or window gives another embedding. ``.calls``: (in the background?, image mean)."""
    m = dataclasses.replace(litemedsam)
    m.calls = []

    def encode(image01):
        background = threading.current_thread().name.startswith("medfm-encode")
        if background and gate is not None:
            gate.wait(30)
        mean = float(image01.mean())
        m.calls.append((background, round(mean, 6)))
        return embedding * (0.9 + 0.2 * mean)

    m.encode = encode
    return m


@pytest.fixture(scope="module")
def thalamus_roi(colin27_aal):
    ks, js, is_ = np.nonzero(colin27_aal == THALAMUS_L)
    k_mid = int(np.median(ks))
    return ((int(is_.min()) - 2, int(js.min()) - 2, k_mid - 5), (int(is_.max()) + 2, int(js.max()) + 2, k_mid + 5))


def _walk(litemedsam, embedding, colin27, roi, ahead):
    model = stand_in(litemedsam, embedding)
    s = PromptSession(model, config=SessionConfig(encode_ahead=ahead))
    s.set_volume(*colin27)
    (i0, j0, k0), (i1, j1, k1) = roi  # one box on the middle slice, carried through the volume (the walk)
    s.add_box("axial", (k0 + k1) // 2, (i0 + 2, j0 + 2, i1 - 2, j1 - 2))
    r = propagate(s, axis="axial")
    s.close()
    return r, model, s


def test_encoding_ahead_gives_the_same_result_as_encoding_on_demand(litemedsam, real_embedding, colin27,
                                                                    thalamus_roi):
    on_demand, m0, _ = _walk(litemedsam, real_embedding, colin27, thalamus_roi, ahead=0)
    ahead, m2, s2 = _walk(litemedsam, real_embedding, colin27, thalamus_roi, ahead=2)
    assert on_demand.mask.any() and len(on_demand.scores) >= 6
    assert np.array_equal(ahead.mask, on_demand.mask) and ahead.scores == on_demand.scores
    assert not any(bg for bg, _ in m0.calls)
    background = [v for bg, v in m2.calls if bg]
    assert len(background) >= 4  # the walk's slices were encoded ahead, in the worker thread
    assert {v for _, v in m0.calls} <= {v for _, v in m2.calls}  # every embedding used was one of those
    assert len(m2.calls) <= len(m0.calls) + 4  # at most the look-ahead past each end is wasted


def test_look_ahead_is_cancelled_when_the_user_moves_away(litemedsam, real_embedding, colin27, thalamus_roi):
    gate = threading.Event()
    model = stand_in(litemedsam, real_embedding, gate)
    s = PromptSession(model, config=SessionConfig(encode_ahead=3))
    s.set_volume(*colin27)
    (i0, j0, k0), (i1, j1, _) = thalamus_roi
    box = (i0, j0, i1, j1)
    s.add_box("axial", k0, box)  # the user's slice
    s.segment_box("axial", k0 + 1, box)  # a walk upward: k0+2..k0+4 are queued ahead
    with s._futures_lock:
        queued = {k[5]: s._futures[k] for k in s._ahead}
    assert sorted(queued) == [k0 + 2, k0 + 3, k0 + 4]
    s.segment_box("axial", k0 + 40, box)  # the user jumps far away
    assert queued[k0 + 3].cancelled() and queued[k0 + 4].cancelled()  # queued ones were cancelled
    gate.set()
    assert not queued[k0 + 2].cancelled() and queued[k0 + 2].result(30) is not None  # the running one finished
    s.close()


def test_fp16_cache_returns_what_it_stores_and_halves_the_bytes():
    emb = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    cache = EmbeddingCache(max_bytes=3 * emb.nelement() * 2, dtype=torch.float16)
    out = cache.put("a", emb)
    assert out.dtype == torch.float32 and torch.equal(out, cache.get("a"))  # the same values every time
    assert float((out - emb).abs().max()) <= 1e-2 * float(emb.abs().max())
    assert cache.nbytes == emb.nelement() * 2
    for name in "bcd":
        cache.put(name, emb)
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes and "a" not in cache


MEMORY_PROBE = r"""
import json, sys
sys.path[:0] = [{segment!r}]
import numpy as np, psutil, torch
torch.set_num_threads(1)
rss = lambda: psutil.Process().memory_info().rss / 2**20
after_import = rss()  # numpy + torch (this torch build alone is ~0.5 GB resident)
from MedFMSegmentLib.session import PromptSession
s = PromptSession()
rng = np.random.default_rng(0)
vol = rng.integers(-1000, 1500, (300, 512, 512), dtype=np.int16)
vol[:, 200:300, 220:320] = 300
s.set_volume(vol, np.diag([0.8, 0.8, 1.5, 1.0]))
s.add_box("axial", 150, (210, 190, 330, 310))
s.add_box("axial", 151, (210, 190, 330, 310))
before_fill = rss()
crop = s.crop_for("axial", (210, 190, 330, 310))
for axis, n in (("axial", 300), ("coronal", 512)):  # every slice of two axes through the cache
    for k in range(n):  # (the values need not be real here)
        s.cache.put(s._key(axis, k, crop), torch.randn(1, 256, 64, 64))
print(json.dumps({{"after_import_mb": after_import, "before_fill_mb": before_fill, "rss_mb": rss(),
                  "cache_mb": s.cache.nbytes / 2**20, "cache_max_mb": s.cache.max_bytes / 2**20,
                  "runtime": s.runtime_info["runtime"], "cached": len(s.cache)}}))
"""


@pytest.mark.slow  # a subprocess that exports the encoder again and fills a 3 GB-scale cache: ~70 s
def test_a_512x512x300_ct_session_is_bounded_by_its_cache():
    """Filling the cache with 812 embeddings grows the process by the cache's bound, not more (heap
    fragmentation was 1.3 GB on top before ``limit_heap_fragmentation``); the session (model, volume,
    cache) stays under 1.5 GB on top of numpy + torch themselves."""
    script = MEMORY_PROBE.format(segment=str(SEGMENT_DIR))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cache_mb"] <= out["cache_max_mb"] and out["cached"] < 812  # bounded in bytes, LRU evicted
    assert out["rss_mb"] - out["before_fill_mb"] <= 1.25 * out["cache_max_mb"] + 64, out
    assert out["rss_mb"] - out["after_import_mb"] < 1536, out


def test_the_public_look_ahead_api_encodes_the_walks_next_slice_through_the_window(litemedsam, real_embedding, colin27,
                                                                                   thalamus_roi):
    """``window_fits`` / ``look_ahead``: what propagation (and the trainer's online loop) use."""
    model = stand_in(litemedsam, real_embedding)
    s = PromptSession(model, config=SessionConfig(encode_ahead=1))
    s.set_volume(*colin27)
    (i0, j0, k0), (i1, j1, _) = thalamus_roi
    box = (i0 + 2, j0 + 2, i1 - 2, j1 - 2)
    crop = s.crop_for("axial", box, k0)
    assert s.window_fits("axial", crop, box) and not s.window_fits("axial", crop, (0, 0, 180, 216))
    s.look_ahead("axial", k0, crop)  # the first slice of a walk: nothing known about its direction yet
    s.look_ahead("axial", k0 + 1, crop)  # walking upward: k0 + 2 is encoded ahead through the same window
    with s._futures_lock:
        futures = list(s._futures.values())
    for fut in futures:
        fut.result(30)
    assert s._key("axial", k0 + 2, crop) in s.cache and [bg for bg, _ in model.calls] == [True]
    assert s.predict("axial", k0 + 2, box, crop=crop)[2].any() and len(model.calls) == 1  # served from the cache
    with pytest.raises(Exception, match="index"):
        s.look_ahead("axial", 10_000, crop)
    s.close()
