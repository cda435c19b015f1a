"""The numpy resampling (resample.py) against the torch operations it replaced, on random images and on
real slices: grid sampling and average pooling bitwise, the 1024 px upscaling within a few ulps; and
``slice_to_model`` equal to the torch implementation it replaced on real MR and CT slices."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from MedFMSegmentLib import resample
from MedFMSegmentLib.preprocess import box_crop, full_slice_crop, slice_to_model


def _torch_grid_sample(image, gx, gy, padding):
    grid = torch.stack(torch.meshgrid(torch.from_numpy(gy), torch.from_numpy(gx), indexing="ij")[::-1], -1)[None]
    return F.grid_sample(torch.from_numpy(image)[None, None], grid, mode="bilinear", padding_mode=padding,
                         align_corners=False)[0, 0].numpy()


def _torch_slice_to_model(slice_u8, crop):
    """The torch implementation slice_to_model had before it moved to numpy."""
    img = torch.from_numpy(np.ascontiguousarray(slice_u8, dtype=np.float32) / 255.0)[None, None]
    h, w = slice_u8.shape
    u = (torch.arange(crop.size, dtype=torch.float64) + 0.5) / crop.sx + crop.x0
    v = (torch.arange(crop.size, dtype=torch.float64) + 0.5) / crop.sy + crop.y0
    grid = torch.stack(torch.meshgrid((v / h) * 2 - 1, (u / w) * 2 - 1, indexing="ij")[::-1], dim=-1)[None].float()
    shrink = min(crop.sx, crop.sy)
    if shrink < 0.5:
        f = int(1 / shrink)
        img = F.avg_pool2d(img, f, ceil_mode=True)
        scale = torch.tensor([w / (f * img.shape[-1]), h / (f * img.shape[-2])])
        grid = (grid + 1) * scale.float() - 1
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0].numpy()


def _has_fma() -> bool:
    try:
        return " fma " in f" {open('/proc/cpuinfo').read().replace(chr(10), ' ')} "
    except OSError:
        return False


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_grid_sample_is_torchs(padding):
    rng = np.random.default_rng(0)
    for _ in range(12):
        h, w = (int(v) for v in rng.integers(8, 600, 2))
        image = rng.uniform(-10, 10, (h, w)).astype(np.float32)
        gx = rng.uniform(-1.3, 1.3, int(rng.integers(3, 300))).astype(np.float32)
        gy = rng.uniform(-1.3, 1.3, int(rng.integers(3, 300))).astype(np.float32)
        got, ref = resample.grid_sample(image, gx, gy, padding), _torch_grid_sample(image, gx, gy, padding)
        assert got.dtype == np.float32 and got.shape == ref.shape == (len(gy), len(gx))
        if _has_fma():  # torch's x86 kernel fuses the multiply-adds, as resample does
            assert np.array_equal(got, ref)
        assert np.abs(got - ref).max() <= 1e-5
    with pytest.raises(ValueError, match="padding"):
        resample.grid_sample(image, gx, gy, "reflection")


def test_avg_pool_is_torchs():
    rng = np.random.default_rng(1)
    for f in (2, 3, 4, 7):
        for h, w in ((512, 512), (217, 181), (33, 250)):
            image = rng.uniform(0, 1, (h, w)).astype(np.float32)
            ref = F.avg_pool2d(torch.from_numpy(image)[None, None], f, ceil_mode=True)[0, 0].numpy()
            assert np.array_equal(resample.avg_pool(image, f), ref)


def test_the_1024_upscaling_is_within_ulps_of_torchs():
    logits = np.random.default_rng(2).normal(0, 8, (256, 256)).astype(np.float32)
    for size in (1024, 700):
        ref = F.interpolate(torch.from_numpy(logits)[None, None], size=(size, size), mode="bilinear",
                            align_corners=False)[0, 0].numpy()
        got = resample.resize_bilinear(logits, (size, size))
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_slice_to_model_is_the_torch_implementation_on_real_slices(shared_data, colin27, cranium_ct):
    """Zoomed boxes, whole slices (shrunk: average pooling first) and anisotropic pixels, on three scans."""
    from conftest import _read

    from MedFMSegmentLib import geometry
    from MedFMSegmentLib.preprocess import normalise_volume

    n = pooled = 0
    for array, ijk_to_ras in (colin27, cranium_ct, _read(shared_data, "chest_ct/chest_ct.nii.gz")):
        vol = normalise_volume(array)[0]
        for axis in ("axial", "coronal"):
            k = geometry.num_slices(vol.shape, axis) // 2
            sl = geometry.get_slice(vol, axis, k)
            spacing = geometry.slice_pixel_spacing(ijk_to_ras, axis)
            h, w = sl.shape
            big = np.repeat(np.repeat(sl, 3, axis=0), 3, axis=1)  # a 3x finer grid: shrunk by pooling first
            for image, crop in ((sl, full_slice_crop(sl.shape, spacing, 256)),
                                (sl, box_crop((w // 3, h // 3, w // 2, h // 2), sl.shape, spacing, 256)),
                                (sl, box_crop((5, 5, 20, 15), sl.shape, spacing, 256)),
                                (big, full_slice_crop(big.shape, tuple(v / 3 for v in spacing), 256))):
                pooled += min(crop.sx, crop.sy) < 0.5
                got, ref = slice_to_model(image, crop), _torch_slice_to_model(image, crop)
                assert got.shape == ref.shape == (256, 256) and got.max() > 0
                if _has_fma():
                    assert np.array_equal(got, ref)
                assert np.abs(got - ref).max() <= 1e-6
                n += 1
    assert n == 24 and pooled == 4
