"""Held-out evaluation of an adapter through the real prompt session (what the user will get).

For each slice: Dice of the base model and of the adapted model with a box prompt (tight ground
truth box + ``pad`` pixels, ``PromptSession.add_box``) and with one click at the structure's
deepest point (``PromptSession.add_point``), the model-free baseline (an ellipse inscribed in the
tight box), and, when a localizer is given, the IoU of its box with the tight box.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from MedFMSegmentLib import geometry


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else float(2 * int((a & b).sum()) / s)


def box_iou(a, b) -> float:
    """IoU of two inclusive pixel boxes (x0, y0, x1, y1)."""
    ix = min(a[2], b[2]) - max(a[0], b[0]) + 1
    iy = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if ix <= 0 or iy <= 0:
        return 0.0
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return float(ix * iy / (area(a) + area(b) - ix * iy))


def ellipse_in_box(shape, box_xy) -> np.ndarray:
    """The model-free baseline: the ellipse inscribed in an inclusive box."""
    x0, y0, x1, y1 = box_xy
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    ry, rx = (y1 - y0 + 1) / 2, (x1 - x0 + 1) / 2
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)


def padded_box(mask2d: np.ndarray, pad: int):
    x0, y0, x1, y1 = geometry.box_from_mask(mask2d)
    h, w = mask2d.shape
    return max(x0 - pad, 0), max(y0 - pad, 0), min(x1 + pad, w - 1), min(y1 + pad, h - 1)


def deepest_point(mask2d: np.ndarray):
    """(x, y) of the pixel farthest from the mask's border (where a user clicks)."""
    import SimpleITK as sitk

    dist = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(sitk.GetImageFromArray(mask2d.astype(np.uint8)),
                                                               insideIsPositive=True, squaredDistance=False,
                                                               useImageSpacing=True))
    y, x = np.unravel_index(int(np.argmax(np.where(mask2d > 0, dist, -np.inf))), mask2d.shape)
    return float(x), float(y)


def _run(session, adapter, prompt):
    session.adapter = adapter
    session.reset()
    try:
        return prompt().mask
    finally:
        session.adapter = None
        session.reset()


def evaluate_slices(session, mask_kji: np.ndarray, axis: str, indices: Sequence[int], adapter=None,
                    clicks: bool = True, pad: int = 5, base: bool = True) -> List[Dict]:
    """Per-slice scores on ``session``'s volume (see module docstring); ``mask_kji`` is the truth."""
    out = []
    for index in indices:
        gt = np.asarray(geometry.get_slice(mask_kji, axis, index)) > 0
        if not gt.any():
            continue
        tight = geometry.box_from_mask(gt)
        box = padded_box(gt, pad)
        row = {"index": int(index), "ellipse": dice(ellipse_in_box(gt.shape, tight), gt)}
        if base:
            row["box_base"] = dice(_run(session, None, lambda: session.add_box(axis, index, box)), gt)
        if adapter is not None:
            row["box_adapted"] = dice(_run(session, adapter, lambda: session.add_box(axis, index, box)), gt)
        if clicks:
            xy = deepest_point(gt)
            click = lambda: session.add_point(axis=axis, index=index, xy_slice=xy, positive=True)  # noqa: E731
            if base:
                row["click_base"] = dice(_run(session, None, click), gt)
            if adapter is not None:
                row["click_adapted"] = dice(_run(session, adapter, click), gt)
        out.append(row)
    return out


def evaluate_localizer(localizer, array_kji, ijk_to_ras, mask_kji: np.ndarray, indices: Sequence[int],
                       volume_u8: Optional[np.ndarray] = None) -> List[Dict]:
    """Per slice: IoU of the localizer's box with the tight true box (0 when it finds nothing).

    ``volume_u8``: the volume already normalised with the localizer's preset (saves the work, and
    lets a localizer ``cache`` recognise the volume across calls).
    """
    from MedFMSegmentLib.preprocess import normalise_volume

    if volume_u8 is None:
        volume_u8, _, _ = normalise_volume(array_kji, localizer.state.preset)
    out = []
    for index in indices:
        gt = np.asarray(geometry.get_slice(mask_kji, localizer.axis, index)) > 0
        hit = localizer.slice_box(volume_u8, ijk_to_ras, int(index))
        row = {"index": int(index), "present": bool(gt.any()), "found": hit is not None,
               "score": None if hit is None else round(hit[1], 4)}
        if gt.any():
            row["iou"] = 0.0 if hit is None else box_iou(hit[0], geometry.box_from_mask(gt))
        out.append(row)
    return out


def summarize(rows: List[Dict]) -> Dict[str, Optional[float]]:
    """Mean of every numeric column (except ``index``) over ``rows``."""
    keys = [k for k in (rows[0] if rows else {}) if isinstance(rows[0][k], float) and k not in ("score",)]
    return {k: round(float(np.mean([r[k] for r in rows if r.get(k) is not None])), 4) for k in keys}
