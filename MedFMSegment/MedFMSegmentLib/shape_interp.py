"""Between two fixed slices: a shape interpolated from both by signed distance (propagation's prior there)."""
from __future__ import annotations

import numpy as np


def _sdf(mask: np.ndarray) -> np.ndarray:
    """Signed distance to the mask's border in pixels, positive inside (a huge negative if empty).

    The border lies half a pixel outside the mask's outermost pixels: ITK's map is 0 on those pixels
    (distance to the nearest contour pixel), so it is shifted by +0.5 and ``> 0`` is the mask itself again
    (without the shift an interpolated shape lost its outer ring of pixels: a mask interpolated with
    itself came back eroded by one pixel, 18 % of the chest CT aorta's area)."""
    import SimpleITK as sitk

    if not mask.any():
        return np.full(mask.shape, -1e6, np.float32)
    d = sitk.SignedMaurerDistanceMap(sitk.GetImageFromArray((mask > 0).astype(np.uint8)), insideIsPositive=True,
                                     squaredDistance=False, useImageSpacing=False)
    return sitk.GetArrayFromImage(d).astype(np.float32) + np.float32(0.5)


def _shift(a: np.ndarray, dy: int, dx: int, fill: float) -> np.ndarray:
    out = np.full_like(a, fill)
    h, w = a.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = a[ys, xs]
    return out


def interpolate_shape(mask_a: np.ndarray, mask_b: np.ndarray, t: float) -> np.ndarray:
    """The signed distance of the shape a fraction ``t`` of the way from ``mask_a`` to ``mask_b``.

    Both shapes are moved to the interpolated centroid first (a tube that drifts sideways stays a
    tube), then their signed distances are blended linearly; ``> 0`` is the interpolated mask.
    """
    ca, cb = np.argwhere(mask_a > 0).mean(axis=0), np.argwhere(mask_b > 0).mean(axis=0)
    move = cb - ca
    da, db = np.round(t * move).astype(int), np.round(-(1 - t) * move).astype(int)
    sa, sb = _sdf(mask_a), _sdf(mask_b)
    fill = float(min(sa.min(), sb.min()))
    return (1 - t) * _shift(sa, da[0], da[1], fill) + t * _shift(sb, db[0], db[1], fill)
