"""A PNG overlay of a result for a quick look: axial, coronal and sagittal slices through the centre of
the segments, the image in grey with each segment's outline and a light fill in its colour.
Written with numpy + zlib (no imaging dependency); square pixels in millimetres.
"""
from __future__ import annotations

import struct
import zlib
from typing import Dict

import numpy as np

from . import geometry
from .preprocess import normalise_volume

COLORS = np.array([(230, 60, 60), (60, 200, 90), (70, 120, 240), (240, 200, 40), (200, 80, 220),
                   (40, 210, 210), (250, 140, 40), (150, 150, 255)], np.float32)


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 array as PNG."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _resample_square(img: np.ndarray, spacing_yx, scale_mm: float) -> np.ndarray:
    h, w = img.shape[:2]
    sy, sx = spacing_yx
    oh, ow = max(int(round(h * sy / scale_mm)), 1), max(int(round(w * sx / scale_mm)), 1)
    ys = np.minimum((np.arange(oh) * scale_mm / sy).astype(int), h - 1)
    xs = np.minimum((np.arange(ow) * scale_mm / sx).astype(int), w - 1)
    return img[ys][:, xs]


def _panel(grey_u8, masks, axis, index, ijk_to_ras, scale_mm):
    sl = geometry.get_slice(grey_u8, axis, index).astype(np.float32)
    rgb = np.repeat(sl[..., None], 3, axis=2)
    for n, mask in enumerate(masks):
        m = geometry.get_slice(mask, axis, index) > 0
        if not m.any():
            continue
        color = COLORS[n % len(COLORS)]
        rgb[m] = 0.7 * rgb[m] + 0.3 * color
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        rgb[edge] = color
    rgb = _resample_square(rgb, geometry.slice_pixel_spacing(ijk_to_ras, axis), scale_mm)
    return rgb[::-1] if axis != "axial" else rgb  # superior up on coronal / sagittal


def overlay_image(array_kji, ijk_to_ras, masks: Dict[str, np.ndarray], scale_mm: float = 0.5) -> np.ndarray:
    """The overlay as an (H, W, 3) uint8 array."""
    grey, _, _ = normalise_volume(array_kji, None)
    ms = list(masks.values())
    union = np.zeros(grey.shape, bool)
    for m in ms:
        union |= m > 0
    centre = np.array(grey.shape) // 2 if not union.any() else np.round(np.argwhere(union).mean(axis=0)).astype(int)
    k, j, i = (int(v) for v in centre)
    panels = [_panel(grey, ms, "axial", k, ijk_to_ras, scale_mm), _panel(grey, ms, "coronal", j, ijk_to_ras, scale_mm),
              _panel(grey, ms, "sagittal", i, ijk_to_ras, scale_mm)]
    h = max(p.shape[0] for p in panels)
    gap = np.zeros((h, 4, 3), np.float32)
    row = []
    for p in panels:
        padded = np.zeros((h, p.shape[1], 3), np.float32)
        padded[:p.shape[0]] = p
        row += [padded, gap]
    return np.clip(np.concatenate(row[:-1], axis=1), 0, 255).astype(np.uint8)


def write_overlay(path, array_kji, ijk_to_ras, masks: Dict[str, np.ndarray], overwrite: bool = False,
                  group=None) -> None:
    """Write the overlay PNG atomically (verified: see ``io.write_bytes_atomic``)."""
    from .io import write_bytes_atomic

    write_bytes_atomic(path, png_bytes(overlay_image(array_kji, ijk_to_ras, masks)), overwrite=overwrite,
                       group=group)
