"""2D mask helpers of the click strategy: connected components, the local cut of a negative click."""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np


def _components(mask: np.ndarray):
    """Connected components (4-neighbour) of a 2D mask as a label image (SimpleITK on one thread; the tests'
    reference for ``keep_components_touching``)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    labeller = sitk.ConnectedComponentImageFilter()
    labeller.SetFullyConnected(False)
    labeller.SetNumberOfThreads(1)
    return sitk.GetArrayFromImage(labeller.Execute(img))


def keep_components_touching(mask: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The connected components (4-neighbour) of a 2D mask that touch ``region`` (all of it if none does).

    Pure numpy on the mask's runs (the same components as SimpleITK's ``ConnectedComponent``, checked in
    Testing/Python/test_postprocess_fast.py): every box prompt passes here, and importing SimpleITK for it
    cost 110 MB resident.
    """
    if not mask.any():
        return mask
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))  # every component lies in the mask's box
    if not (mask[box].astype(bool) & ~region[box].astype(bool)).any():  # inside the region: all components touch it
        return (mask != 0).astype(np.uint8)
    m = mask[box] != 0
    h, w = m.shape
    edges = np.diff(np.pad(m, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    run_row, run_start = np.nonzero(edges == 1)  # row-major: runs sorted by (row, start)
    run_end = np.nonzero(edges == -1)[1]  # exclusive
    inside = np.pad(np.cumsum(np.asarray(region[box], bool), axis=1), ((0, 0), (1, 0)))
    hit = inside[run_row, run_end] > inside[run_row, run_start]
    if not hit.any():
        return mask
    # runs of consecutive rows that share a column touch: for each run, those of the row above overlapping it
    # form the index range [lo, hi) of the sorted runs
    key = run_row.astype(np.int64) * (w + 1)
    lo = np.searchsorted(key + run_end, key - (w + 1) + run_start, side="right")
    hi = np.searchsorted(key + run_start, key - (w + 1) + run_end, side="left")
    n = np.maximum(hi - lo, 0)
    b = np.repeat(np.arange(len(run_row)), n)
    a = np.repeat(lo, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
    labels = np.arange(len(run_row))  # each run's label: the smallest run index of its component, once stable
    while True:
        low = np.minimum(labels[a], labels[b])
        new = labels.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        new = new[new]
        if np.array_equal(new, labels):
            break
        labels = new
    keep = np.isin(labels, labels[hit])
    paint = np.zeros((h, w + 1), np.int8)
    np.add.at(paint, (run_row[keep], run_start[keep]), 1)
    np.add.at(paint, (run_row[keep], run_end[keep]), -1)
    out = np.zeros(mask.shape, np.uint8)
    out[box] = np.cumsum(paint, axis=1)[:, :w] > 0
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


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """``mask`` grown by ``r`` pixels (4-neighbour steps)."""
    out = mask.copy()
    for _ in range(r):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out
