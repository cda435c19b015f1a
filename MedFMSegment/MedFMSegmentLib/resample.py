"""Bilinear resampling in numpy, computed as torch's CPU kernels compute it (no torch import).

``grid_sample`` is ``torch.nn.functional.grid_sample(mode="bilinear", align_corners=False)`` on a grid that
is a product of one x per column and one y per row (what the session's crops give); ``resize_bilinear`` is
``F.interpolate(mode="bilinear", align_corners=False)``; ``avg_pool`` is ``F.avg_pool2d(f, ceil_mode=True)``.
``grid_sample`` and ``avg_pool`` take the same float32 steps in the same order as torch's x86 CPU kernels
(grid_sample's fused multiply-adds included, computed exactly in float64 and rounded once), so they are
bitwise torch's on an x86 CPU with FMA; ``resize_bilinear`` (SAM's 1024 px models only) is within a few
ulps (``Testing/Python/test_resample.py``). The session's masks do not depend on torch being imported, and
a session on a cached OpenVINO model never imports it.
"""
from __future__ import annotations

import numpy as np

F32 = np.float32


def _fma(a, b, c) -> np.ndarray:
    """a * b + c rounded once to float32 (the product of two float32 values is exact in float64)."""
    return (np.asarray(a, F32).astype(np.float64) * np.asarray(b, F32) + np.asarray(c, F32)).astype(F32)


def _unnormalise(g: np.ndarray, size: int) -> np.ndarray:
    """Normalised coordinates in [-1, 1] -> source pixel coordinates (align_corners=False)."""
    return _fma(g.astype(F32) + F32(1), F32(size / 2), F32(-0.5))


def grid_sample(image: np.ndarray, gx: np.ndarray, gy: np.ndarray, padding: str = "zeros") -> np.ndarray:
    """Sample ``image`` (H, W) at the normalised points (gx[c], gy[r]): an (len(gy), len(gx)) float32 array.

    ``padding``: ``zeros`` (outside is 0) or ``border`` (coordinates clipped to the image)."""
    img = np.asarray(image, F32)
    h, w = img.shape
    x = _unnormalise(np.asarray(gx, F32), w)
    y = _unnormalise(np.asarray(gy, F32), h)
    if padding == "border":
        x = np.clip(x, F32(0), F32(w - 1))
        y = np.clip(y, F32(0), F32(h - 1))
    elif padding != "zeros":
        raise ValueError(f"padding {padding!r}: zeros or border")
    x_w, y_n = np.floor(x), np.floor(y)
    wx = x - x_w  # distance to the west neighbour
    ex = F32(1) - wx
    ny = y - y_n  # distance to the north neighbour
    sy = F32(1) - ny
    xi, yi = x_w.astype(np.int64), y_n.astype(np.int64)
    # a zero border of 1 pixel: neighbours just outside read 0; farther ones are clipped onto it
    padded = np.zeros((h + 2, w + 2), F32)
    padded[1:-1, 1:-1] = img
    c0, c1 = np.clip(xi + 1, 0, w + 1), np.clip(xi + 2, 0, w + 1)
    r0, r1 = np.clip(yi + 1, 0, h + 1), np.clip(yi + 2, 0, h + 1)
    rows0, rows1 = padded[r0], padded[r1]
    nw, ne = rows0[:, c0], rows0[:, c1]
    sw, se = rows1[:, c0], rows1[:, c1]
    s, n, e, wd = sy[:, None], ny[:, None], ex[None, :], wx[None, :]
    return _fma(se, n * wd, _fma(sw, n * e, _fma(ne, s * wd, nw * (s * e))))


def _linear_indices(in_size: int, out_size: int):
    """Source indices and weights of a 1-D linear resize (align_corners=False), as torch computes them."""
    scale = F32(in_size / out_size)
    src = scale * (np.arange(out_size, dtype=F32) + F32(0.5)) - F32(0.5)
    src = np.maximum(src, F32(0))
    i0 = src.astype(np.int64)
    i1 = i0 + (i0 < in_size - 1)
    l1 = src - i0.astype(F32)
    l0 = F32(1) - l1
    return i0, i1, l0, l1


def resize_bilinear(image: np.ndarray, out_hw) -> np.ndarray:
    """``image`` (H, W) resized to ``out_hw`` (bilinear, align_corners=False), float32."""
    img = np.asarray(image, F32)
    oh, ow = out_hw
    y0, y1, ly0, ly1 = _linear_indices(img.shape[0], oh)
    x0, x1, lx0, lx1 = _linear_indices(img.shape[1], ow)
    top = img[y0][:, x0] * lx0 + img[y0][:, x1] * lx1
    bottom = img[y1][:, x0] * lx0 + img[y1][:, x1] * lx1
    return top * ly0[:, None] + bottom * ly1[:, None]


def avg_pool(image: np.ndarray, f: int) -> np.ndarray:
    """Mean over f x f blocks, the last partial blocks averaged over the pixels they hold (ceil mode)."""
    img = np.asarray(image, F32)
    h, w = img.shape
    oh, ow = -(-h // f), -(-w // f)
    padded = np.zeros((oh * f, ow * f), F32)
    padded[:h, :w] = img
    total = np.zeros((oh, ow), F32)
    for dy in range(f):  # row by row, column by column: torch's order of the sum
        for dx in range(f):
            total += padded[dy::f, dx::f]
    count_y = np.minimum(f, h - np.arange(oh) * f)
    count_x = np.minimum(f, w - np.arange(ow) * f)
    return total / (count_y[:, None] * count_x[None, :]).astype(F32)
