"""The prompt-to-mask postprocessing computes only where the answer can be non-trivial (inside the
crop, inside the mask's bounding box); these tests compare it with the whole-grid computation it
replaced, on real model logits (a chest CT box and a Colin27 box) and on random ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from MedFMSegmentLib.masks2d import _components, keep_components_touching
from MedFMSegmentLib.preprocess import Crop, box_crop, full_slice_crop, model_to_slice


def model_to_slice_whole_grid(logits_model, crop, shape_yx):
    """The previous implementation: grid_sample over every slice pixel, then -20 outside the crop."""
    h, w = shape_yx
    lg = logits_model.float()[None, None] if logits_model.dim() == 2 else logits_model.float()
    if lg.shape[-1] != crop.size:
        lg = F.interpolate(lg, size=(crop.size, crop.size), mode="bilinear", align_corners=False)
    xs = ((torch.arange(w, dtype=torch.float64) + 0.5 - crop.x0) * crop.sx) / crop.size * 2 - 1
    ys = ((torch.arange(h, dtype=torch.float64) + 0.5 - crop.y0) * crop.sy) / crop.size * 2 - 1
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)[None].float()
    out = F.grid_sample(lg.cpu(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0]
    inside = (grid[0, ..., 0].abs() <= 1) & (grid[0, ..., 1].abs() <= 1)
    out[~inside] = -20.0
    return out.numpy()


def keep_components_whole_grid(mask, region):
    lab = _components(mask)
    keep = np.unique(lab[region & (lab > 0)])
    return mask if keep.size == 0 else np.isin(lab, keep).astype(np.uint8)


CROPS = [  # (slice shape, crop): a box on a 512 CT slice, near the edge, a full slice, anisotropic pixels, 1024 px
    ((512, 512), box_crop((200, 220, 240, 260), (512, 512), (0.7, 0.7), 256)),
    ((512, 512), box_crop((0, 480, 30, 511), (512, 512), (0.7, 0.7), 256)),
    ((217, 181), full_slice_crop((217, 181), (1.0, 1.0), 256)),
    ((120, 300), box_crop((100, 30, 160, 90), (120, 300), (2.5, 0.8), 256)),
    ((512, 512), box_crop((100, 100, 300, 260), (512, 512), (0.5, 0.5), 1024)),
    ((64, 64), Crop(500.0, 500.0, 1.0, 1.0, 256)),  # entirely off the slice
]


@pytest.mark.parametrize("shape, crop", CROPS)
def test_model_to_slice_equals_the_whole_grid_computation(shape, crop):
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.normal(0, 8, (256, 256)).astype(np.float32))
    new, old = model_to_slice(logits, crop, shape), model_to_slice_whole_grid(logits, crop, shape)
    assert new.dtype == old.dtype == np.float32 and new.shape == old.shape == shape
    if crop.size == 256:  # numpy's resampling takes torch's float32 steps (resample.py): bitwise
        assert np.array_equal(new, old)
    else:  # SAM's 1024 px crop: the 256 -> 1024 upscaling is within a few ulps of torch's
        assert np.abs(new - old).max() <= 1e-5 * np.abs(old).max()
        assert np.array_equal(new > 0, old > 0) or np.abs(old[(new > 0) != (old > 0)]).max() < 1e-4


def test_real_prompt_to_mask_is_unchanged(colin27_session):
    """Real logits of a box on a Colin27 slice (the session's own crop): logits and the kept
    component equal to the whole-grid computation."""
    session = colin27_session
    k = session.shape[0] // 2
    box = (70, 90, 110, 130)
    crop = session.crop_for("axial", box)
    logits_model, _ = session.model.decode(session.embedding("axial", k, crop), crop.box_to_model(box))
    shape = session.shape[1:]
    new, old = model_to_slice(logits_model[0], crop, shape), model_to_slice_whole_grid(logits_model[0], crop, shape)
    assert np.array_equal(new, old) and (new > 0).sum() > 100
    mask = (new > 0).astype(np.uint8)
    inside = np.zeros(shape, bool)
    inside[90:131, 70:111] = True
    assert np.array_equal(keep_components_touching(mask, inside), keep_components_whole_grid(mask, inside))


def test_keep_components_touching_equals_the_whole_grid_computation():
    rng = np.random.default_rng(5)
    for _ in range(20):
        mask = np.zeros((120, 140), np.uint8)
        for _ in range(rng.integers(1, 6)):  # a few rectangles and blobs, some touching
            y, x, hh, ww = rng.integers(0, 110), rng.integers(0, 130), rng.integers(1, 30), rng.integers(1, 30)
            mask[y:y + hh, x:x + ww] = 1
        mask &= (rng.random(mask.shape) > 0.1).astype(np.uint8)
        region = np.zeros(mask.shape, bool)
        y, x = rng.integers(0, 100), rng.integers(0, 120)
        region[y:y + 20, x:x + 20] = True
        assert np.array_equal(keep_components_touching(mask, region), keep_components_whole_grid(mask, region))
    empty = np.zeros((10, 10), np.uint8)
    assert keep_components_touching(empty, np.ones((10, 10), bool)) is empty


def test_keep_components_touching_with_the_mask_inside_the_region_is_the_mask():
    """The shortcut (no mask pixel outside the region: every component touches it) equals the labelling."""
    rng = np.random.default_rng(8)
    for _ in range(10):
        mask = (rng.random((60, 70)) > 0.6).astype(np.uint8)  # many small components
        mask[:5], mask[-5:], mask[:, :5], mask[:, -5:] = 0, 0, 0, 0
        region = np.zeros(mask.shape, np.uint8)  # a uint8 region works as a bool one
        region[4:57, 3:66] = 1
        got = keep_components_touching(mask * np.uint8(255), region)
        assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 1}
        assert np.array_equal(got, keep_components_whole_grid(mask, region > 0))


def test_the_embedding_cache_converts_a_repeated_fp16_embedding_once():
    """fp16 storage: a second get of the same key returns the float32 copy made for the first, equal to
    a fresh conversion; eviction and clear drop it."""
    from MedFMSegmentLib.embedding_cache import EmbeddingCache

    one = torch.randn(1, 8, 4, 4)
    nbytes = one.half().element_size() * one.nelement()
    cache = EmbeddingCache(max_bytes=2 * nbytes, dtype=torch.float16)
    cache.put("a", one)
    first = cache.get("a")
    assert first.dtype == torch.float32 and torch.equal(first, one.half().float())
    assert cache.get("a") is first and cache.hits == 2
    cache.put("b", one + 1)
    assert torch.equal(cache.get("b"), (one + 1).half().float()) and cache.get("a") is not first  # hot moved to "b"
    cache.put("c", one + 2)  # evicts "b" (the least recent)
    assert cache._hot is None or cache._hot[0] != "b"
    assert cache.get("b") is None
    cache.get("c")
    cache.clear()
    assert cache._hot is None and cache.get("c") is None


def test_keep_components_touching_has_simpleitks_4_neighbour_components_on_noise():
    """The numpy run labelling against SimpleITK's ConnectedComponent: noisy masks of every density (diagonal
    contacts do not connect), empty and scattered regions, bool and uint8 masks, 1-pixel-wide shapes."""
    rng = np.random.default_rng(11)
    for it in range(600):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        mask = (rng.random((h, w)) < rng.uniform(0.1, 0.95)).astype(np.uint8)
        region = rng.random((h, w)) < rng.uniform(0.0, 0.05)
        if it % 3 == 0:
            mask = mask.astype(bool)
        got, ref = keep_components_touching(mask, region), keep_components_whole_grid(mask.astype(np.uint8), region)
        assert np.array_equal(got, ref), it
    checker = (np.indices((9, 9)).sum(axis=0) % 2).astype(np.uint8)  # only diagonal contacts: every pixel alone
    region = np.zeros((9, 9), bool)
    region[4, 5] = True
    assert keep_components_touching(checker, region).sum() == 1
