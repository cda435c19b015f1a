"""Per-volume intensity normalisation, and the one place slices become model inputs.

A preset maps the whole volume to uint8 0..255 once (never per-slice min-max of raw values), so
neighbouring slices of one structure look alike to the model. ``slice_to_model`` crops a region of
a slice, resamples it to square pixels and resizes it to the model's input size in one step.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from . import resample
from .errors import InputError
from .tensors import as_float32

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    window: Optional[Tuple[float, float]] = None  # fixed (low, high) in raw units, e.g. HU
    percentiles: Optional[Tuple[float, float]] = None  # or per-volume percentiles


PRESETS: Dict[str, Preset] = {p.name: p for p in (
    Preset("ct-soft-tissue", "CT soft tissue window W400 L40", window=(-160.0, 240.0)),
    Preset("ct-bone", "CT bone window W1800 L400", window=(-500.0, 1300.0)),
    Preset("ct-lung", "CT lung window W1500 L-600", window=(-1350.0, 150.0)),
    Preset("ct-brain", "CT brain window W80 L40", window=(0.0, 80.0)),
    Preset("ct-full", "CT full range -1024..3071 HU", window=(-1024.0, 3071.0)),
    Preset("mr", "MR / other: 0.5-99.5 percentiles of the volume", percentiles=(0.5, 99.5)),
)}

# Chosen from Testing/benchmarks/bench_presets.py on the shared data (see README, "Accuracy"). A volume-wide
# default (one mapping for the whole volume: the trainer, the localizer, an explicit session preset).
DEFAULT_PRESET = {"ct": "ct-full", "mr": "mr"}
# The prompt session's CT default: the window is chosen for each prompt's box by ``ct_preset_for_box``
# (leave-one-dataset-out, bench_2d.py --grid); the volume is mapped with CT_PER_BOX_PRIMARY, the other
# window is applied to the raw slice when a box asks for it.
CT_PER_BOX = "ct-per-box"
CT_PER_BOX_PRIMARY = "ct-soft-tissue"


def validate_volume(array_kji) -> np.ndarray:
    """Check that ``array_kji`` is a finite, non-constant, 3D scalar volume; return it as an ndarray."""
    a = np.asarray(array_kji)
    if a.ndim == 4 and a.shape[-1] in (2, 3, 4):
        raise InputError(f"volume has {a.shape[-1]} components per voxel (shape {a.shape}): an RGB or vector "
                         "volume; MedFM needs a scalar volume (convert it to grey first)")
    if a.ndim != 3:
        raise InputError(f"volume must be a 3D array indexed [k, j, i], got {a.ndim}D with shape {a.shape}")
    if min(a.shape) < 1:
        raise InputError(f"volume is empty (shape {a.shape})")
    if a.dtype.kind not in "biuf":
        raise InputError(f"volume has unsupported voxel type {a.dtype}; expected integers or floats")
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a)
        if bad.any():
            raise InputError(f"volume contains {int(bad.sum())} NaN or inf voxels (first at [k, j, i] = "
                             f"{tuple(int(v) for v in np.argwhere(bad)[0])}); fill or mask them first")
    if a.min() == a.max():
        raise InputError(f"volume is constant (every voxel is {a.flat[0]}): nothing to segment")
    return a


def guess_modality(array_kji: np.ndarray) -> str:
    """'ct' when values look like Hounsfield units (air near -1000), else 'mr'."""
    lo = float(np.percentile(array_kji[::4, ::4, ::4], 0.5))
    return "ct" if lo < -500 and array_kji.dtype.kind in "if" else "mr"


def resolve_preset(preset, array_kji: np.ndarray) -> Preset:
    """A preset name (``None`` / ``"auto"``: the modality's default) or a ``Preset`` -> the ``Preset``."""
    if isinstance(preset, Preset):
        return preset
    if preset in (None, "auto"):
        name = DEFAULT_PRESET[guess_modality(array_kji)]
    elif preset in PRESETS:
        name = preset
    else:
        raise InputError(f"unknown intensity preset {preset!r}: use auto or one of {', '.join(PRESETS)}")
    return PRESETS[name]


def intensity_range(array_kji: np.ndarray, preset: Preset) -> Tuple[float, float]:
    if preset.window is not None:
        return preset.window
    sample = array_kji[::2, ::2, ::2] if array_kji.size > 8_000_000 else array_kji
    lo, hi = np.percentile(sample, preset.percentiles)
    if hi <= lo:
        lo, hi = float(array_kji.min()), float(array_kji.max())
    return float(lo), float(hi)


def ct_preset_for_box(slice_hu: np.ndarray, box_xy, mostly: float = 0.3, bone_hu: Optional[float] = None) -> str:
    """The CT rule chosen leave-one-dataset-out (bench_2d.py --grid): the soft-tissue window, unless more
    than ``mostly`` of the box is air (< -500 HU); then the full range. ``bone_hu``: also count voxels above
    it (the earlier rule: 300 HU, more than 0.5; it takes contrast-enhanced blood for bone).

    The prompt session's CT default (``CT_PER_BOX``): each box's window, embeddings cached per window.
    """
    x0, y0, x1, y1 = (int(round(v)) for v in box_xy)
    inside = np.asarray(slice_hu)[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1]
    if inside.size == 0:
        raise InputError(f"box {box_xy!r} holds no pixel of the slice (shape {np.shape(slice_hu)})")
    far = inside < -500
    if bone_hu is not None:
        far = far | (inside > bone_hu)
    share = float(far.mean())
    return "ct-full" if share > mostly else "ct-soft-tissue"


def fitted_window(slice_raw: np.ndarray, box_xy, grow: float = 0.25,
                  percentiles: Tuple[float, float] = (1.0, 99.0)) -> Tuple[float, float]:
    """A window fitted to the intensities in and around a box: percentiles of the raw values inside the
    box grown by ``grow`` of its side on each side (a candidate adaptive rule, see bench_2d.py --grid)."""
    h, w = slice_raw.shape
    x0, y0, x1, y1 = box_xy
    gx, gy = grow * (x1 - x0 + 1), grow * (y1 - y0 + 1)
    r = slice_raw[max(int(y0 - gy), 0):min(int(np.ceil(y1 + gy)), h - 1) + 1,
                  max(int(x0 - gx), 0):min(int(np.ceil(x1 + gx)), w - 1) + 1]
    lo, hi = np.percentile(r, percentiles)
    if hi <= lo:
        lo, hi = float(slice_raw.min()), float(slice_raw.max())
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def map_slice(slice_raw: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    """One raw slice to uint8 0..255 through ``window`` (exactly as ``normalise_volume`` maps a volume)."""
    lo, hi = window
    return np.clip((np.asarray(slice_raw).astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255).round().astype(np.uint8)


def normalise_volume(array_kji, preset=None) -> Tuple[np.ndarray, Preset, Tuple[float, float]]:
    """Map a volume to uint8 0..255 with one intensity range for the whole volume."""
    a = validate_volume(array_kji)
    p = resolve_preset(preset, a)
    lo, hi = intensity_range(a, p)
    out = np.empty(a.shape, np.uint8)
    scale = 255.0 / (hi - lo)
    for k in range(a.shape[0]):  # slice by slice: bounded temporary memory on large volumes
        out[k] = np.clip((a[k].astype(np.float32) - lo) * scale, 0, 255).round()
    log.info("intensity preset %s: [%g, %g] -> 0..255", p.name, lo, hi)
    return out, p, (lo, hi)


@dataclass(frozen=True)
class Crop:
    """A square-in-millimetres window of a slice, mapped onto the model input.

    ``x0, y0`` is the slice pixel at the model input's top-left; ``sx, sy`` are model pixels per slice
    pixel along x and y (different when the slice pixels are not square).
    """

    x0: float
    y0: float
    sx: float
    sy: float
    size: int  # model input size S
    preset: Optional[str] = None  # the intensity preset of the slice seen through it (None: the volume's)

    def to_model(self, xy_slice) -> np.ndarray:
        p = np.asarray(xy_slice, np.float64).reshape(-1, 2)
        return np.stack([(p[:, 0] - self.x0) * self.sx, (p[:, 1] - self.y0) * self.sy], axis=1)

    def box_to_model(self, box_xy) -> np.ndarray:
        x0, y0, x1, y1 = box_xy
        return self.to_model([(x0, y0), (x1, y1)]).reshape(4)

    @property
    def key(self) -> Tuple[float, ...]:
        return (round(self.x0, 3), round(self.y0, 3), round(self.sx, 5), round(self.sy, 5), self.size, self.preset)


def full_slice_crop(shape_yx, pixel_spacing_yx, size: int) -> Crop:
    """The whole slice, longest side (in mm) resized to ``size``, padded at the bottom / right."""
    h, w = shape_yx
    sy_mm, sx_mm = pixel_spacing_yx
    extent_mm = max(h * sy_mm, w * sx_mm)
    return Crop(0.0, 0.0, size * sx_mm / extent_mm, size * sy_mm / extent_mm, size)


def box_crop(box_xy, shape_yx, pixel_spacing_yx, size: int, context: float = 1.0,
             min_extent_mm: float = 24.0) -> Crop:
    """A crop centred on a box: the box's larger side (mm) times (1 + 2 * ``context``), square in mm.

    ``context`` is the margin on each side as a fraction of the box's larger side; the crop never
    exceeds the slice's own extent, so a big box falls back to the whole slice.
    """
    x0, y0, x1, y1 = box_xy
    sy_mm, sx_mm = pixel_spacing_yx
    h, w = shape_yx
    side_mm = max((x1 - x0 + 1) * sx_mm, (y1 - y0 + 1) * sy_mm)
    extent_mm = max(side_mm * (1.0 + 2.0 * context), min_extent_mm)
    full_mm = max(h * sy_mm, w * sx_mm)
    if extent_mm >= full_mm:
        return full_slice_crop(shape_yx, pixel_spacing_yx, size)
    cx, cy = (x0 + x1 + 1) / 2.0, (y0 + y1 + 1) / 2.0  # centre in pixel-edge coordinates
    half_x, half_y = extent_mm / (2 * sx_mm), extent_mm / (2 * sy_mm)
    return Crop(cx - half_x, cy - half_y, size * sx_mm / extent_mm, size * sy_mm / extent_mm, size)


def _affine_grid(crop: Crop, shape_yx, out_hw) -> Tuple[np.ndarray, np.ndarray]:
    """Normalised slice coordinates (gx per output column, gy per output row) of the crop's pixels."""
    h, w = shape_yx
    oh, ow = out_hw
    u = (np.arange(ow, dtype=np.float64) + 0.5) / crop.sx + crop.x0  # slice x (edge coords)
    v = (np.arange(oh, dtype=np.float64) + 0.5) / crop.sy + crop.y0
    return ((u / w) * 2 - 1).astype(np.float32), ((v / h) * 2 - 1).astype(np.float32)


def slice_to_model(slice_u8: np.ndarray, crop: Crop) -> np.ndarray:
    """Resample a uint8 slice through ``crop`` into an (S, S) float32 image in [0, 1] (zeros outside)."""
    img = np.ascontiguousarray(slice_u8, dtype=np.float32) / np.float32(255.0)
    gx, gy = _affine_grid(crop, slice_u8.shape, (crop.size, crop.size))
    # antialias when shrinking: average-pool first so thin structures are not aliased away
    shrink = min(crop.sx, crop.sy)
    if shrink < 0.5:
        f = int(1 / shrink)
        img = resample.avg_pool(img, f)
        # same positions in the pooled image: g' = (g + 1) * w / (f * w') - 1
        one = np.float32(1)
        gx = (gx + one) * np.float32(slice_u8.shape[1] / (f * img.shape[-1])) - one
        gy = (gy + one) * np.float32(slice_u8.shape[0] / (f * img.shape[-2])) - one
    return resample.grid_sample(img, gx, gy, padding="zeros")


def _logits_2d(logits) -> np.ndarray:
    """(S, S) float32 numpy logits from an array or a (CPU or GPU) torch tensor of shape (S, S) or (1, .., S, S)."""
    lg = as_float32(logits)
    return lg.reshape(lg.shape[-2:]) if lg.ndim > 2 else lg


def model_to_slice(logits_model, crop: Crop, shape_yx) -> np.ndarray:
    """Map (S, S) model-input logits (array or tensor) back onto the slice grid; pixels outside the crop get -20.

    Only the slice pixels inside the crop are resampled (a box's crop is a small part of a CT
    slice); each is computed exactly as on the whole grid, so the result is the same.
    """
    h, w = shape_yx
    out = np.full((h, w), -20.0, np.float32)
    # slice pixel centres -> model input normalised coords (float64, then float32 as grid_sample takes)
    xs = (((np.arange(w, dtype=np.float64) + 0.5 - crop.x0) * crop.sx) / crop.size * 2 - 1).astype(np.float32)
    ys = (((np.arange(h, dtype=np.float64) + 0.5 - crop.y0) * crop.sy) / crop.size * 2 - 1).astype(np.float32)
    cols, rows = np.nonzero(np.abs(xs) <= 1)[0], np.nonzero(np.abs(ys) <= 1)[0]
    if not len(cols) or not len(rows):
        return out
    c0, c1, r0, r1 = int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1  # contiguous: monotonic
    lg = _logits_2d(logits_model)
    if lg.shape[-1] != crop.size:
        lg = resample.resize_bilinear(lg, (crop.size, crop.size))
    out[r0:r1, c0:c1] = resample.grid_sample(lg, xs[c0:c1], ys[r0:r1], padding="border")
    return out
