"""2D mask helpers of the click strategy: connected components, the local cut of a negative click."""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np


def _components(mask: np.ndarray):
    """Connected components (4-neighbour) of a 2D mask as a label image (SimpleITK, one thread: a
    slice's mask box takes well under a millisecond, and on a loaded machine ITK's second thread made
    the call wait 3-10x its CPU time, measured)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    labeller = sitk.ConnectedComponentImageFilter()
    labeller.SetFullyConnected(False)
    labeller.SetNumberOfThreads(1)
    return sitk.GetArrayFromImage(labeller.Execute(img))


def keep_components_touching(mask: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The connected components of a 2D mask that touch ``region`` (all of it if none does)."""
    if not mask.any():
        return mask
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))  # every component lies in the mask's box
    if not (mask[box].astype(bool) & ~region[box].astype(bool)).any():  # inside the region: all components touch it
        return (mask != 0).astype(np.uint8)
    lab = _components(mask[box])
    keep = np.unique(lab[region[box] & (lab > 0)])
    if keep.size == 0:
        return mask
    out = np.zeros(mask.shape, np.uint8)
    out[box] = np.isin(lab, keep)
    return out


def _cut_at(mask: np.ndarray, xy_negative: Tuple[int, int], keep_xy: Sequence[Tuple[float, float]]) -> np.ndarray:
    """Remove the part of ``mask`` around a negative click, never reaching past the points to keep.

    Removed: mask pixels nearer to the click than to every kept point, within twice the click's depth
    in the mask (its distance to the mask's border, at least 3 px), so an edge click trims the edge and
    a click deep in a wrong region removes that region. With no point to keep, the mask's deepest point
    away from the click is kept. What stays is the part connected to a kept point.
    """
    import SimpleITK as sitk

    xn, yn = xy_negative
    dist = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        sitk.GetImageFromArray(mask.astype(np.uint8)), insideIsPositive=True, useImageSpacing=False))
    radius = max(2.0 * float(dist[yn, xn]), 3.0)
    if not keep_xy:
        yy, xx = np.indices(mask.shape)
        near = (xx - xn) ** 2 + (yy - yn) ** 2 <= radius ** 2
        depth = np.where((mask > 0) & ~near, dist, -np.inf)
        if not np.isfinite(depth).any():  # the click covers the whole (small) mask: remove it all
            return np.zeros_like(mask)
        ky, kx = np.unravel_index(np.argmax(depth), mask.shape)
        keep_xy = [(float(kx), float(ky))]
    ys, xs = np.nonzero(mask)
    d_neg = (xs - xn) ** 2 + (ys - yn) ** 2
    d_keep = np.min([(xs - kx) ** 2 + (ys - ky) ** 2 for kx, ky in keep_xy], axis=0)
    gone = (d_neg < d_keep) & (d_neg <= radius ** 2)
    out = mask.copy()
    out[ys[gone], xs[gone]] = 0
    anchors = np.zeros(mask.shape, bool)
    for kx, ky in keep_xy:
        anchors[int(round(ky)), int(round(kx))] = True
    return keep_components_touching(out, anchors)


def _point_region(shape, x, y):
    r = np.zeros(shape, bool)
    r[y, x] = True
    return r


def remove_pixel(mask: np.ndarray, x: float, y: float) -> np.ndarray:
    """``mask`` without the pixel at ``(x, y)`` (slice xy), copied only when that pixel is set."""
    xi, yi = int(round(x)), int(round(y))
    if 0 <= yi < mask.shape[0] and 0 <= xi < mask.shape[1] and mask[yi, xi]:
        mask = mask.copy()
        mask[yi, xi] = 0
    return mask
