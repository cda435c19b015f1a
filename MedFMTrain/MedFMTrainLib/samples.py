"""The pool of training samples: frozen-encoder embeddings of (augmented) crops, with their masks.

Every sample is made with the session's own preprocessing: the crop is
:func:`MedFMSegmentLib.preprocess.box_crop` of a (jittered) box with the session's context and
minimum size (what ``PromptSession.crop_for`` does), the image goes through ``slice_to_model``,
and the embedding is ``model.encode`` of it. The encoder is frozen, so each crop is encoded once;
augmented crops are a fixed pool whose size bounds the number of encodes (the expensive step).

Kinds of sample:
  ``box``   a crop around a jittered tight box (what a user's box prompt gives);
  ``click`` a crop around the largest click box centred on a point inside the structure (what the
            session's click-to-box search encodes first);
  ``full``  the whole slice (the localizer's input).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from MedFMSegmentLib.errors import Cancelled
from MedFMSegmentLib.preprocess import Crop, box_crop, full_slice_crop, slice_to_model
from MedFMSegmentLib.session import SessionConfig

from .augment import AugmentConfig, Augmenter
from .data import TrainingSlice

log = logging.getLogger(__name__)

KINDS = ("box", "click", "full")


@dataclass
class Sample:
    """One encoded model input and its target mask on the model-input grid."""

    kind: str
    slice_number: int  # position in the TrainingSet's slices
    embedding: torch.Tensor  # (C, h, w), autograd-ready (not an inference tensor)
    mask: np.ndarray  # uint8 (S, S) on the model input
    crop: Crop
    model_px_per_mm: Tuple[float, float]  # (x, y) model pixels per millimetre
    click_xy_model: Optional[Tuple[float, float]] = None  # the click a ``click`` sample was made around
    augmented: bool = False


@dataclass(frozen=True)
class PoolConfig:
    """How many encodes the pool may spend (the 5-minute budget is mostly encodes on a CPU)."""

    box_encodes: int = 14  # total box crops (first one per slice un-augmented)
    click_encodes: int = 3  # total click crops
    full_encodes: int = 7  # total whole-slice crops (localizer), incl. negatives
    box_margin_px: Tuple[float, float] = (-1.0, 8.0)  # per-side margin of the crop's box around the tight box
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self):
        d = dict(self.__dict__)
        d["augment"] = self.augment.to_dict()
        d["box_margin_px"] = list(self.box_margin_px)
        return d


def jitter_box(box_xy, rng: np.random.Generator, margin_px: Tuple[float, float], shape_yx):
    """A user-like box: each side of the tight box moved outward by a random margin (slice pixels)."""
    x0, y0, x1, y1 = box_xy
    m = rng.uniform(margin_px[0], margin_px[1], size=4)
    h, w = shape_yx
    bx0, by0 = max(x0 - m[0], 0.0), max(y0 - m[1], 0.0)
    bx1, by1 = min(x1 + m[2], w - 1.0), min(y1 + m[3], h - 1.0)
    if bx1 < bx0:
        bx0, bx1 = x0, x1
    if by1 < by0:
        by0, by1 = y0, y1
    return float(bx0), float(by0), float(bx1), float(by1)


def session_crop(box_xy, ts: TrainingSlice, size: int, config: SessionConfig) -> Crop:
    """The crop ``PromptSession.crop_for`` makes for ``box_xy`` on this slice."""
    if box_xy is None or not config.zoom:
        return full_slice_crop(ts.image_u8.shape, ts.pixel_spacing_yx, size)
    return box_crop(box_xy, ts.image_u8.shape, ts.pixel_spacing_yx, size, config.context, config.min_crop_mm)


def click_crop_box(xy, ts: TrainingSlice, config: SessionConfig):
    """The largest click box around ``xy`` (its crop is the one the session encodes for a first click)."""
    sy, sx = ts.pixel_spacing_yx
    half = max(config.click_box_sizes_mm) / 2
    return xy[0] - half / sx, xy[1] - half / sy, xy[0] + half / sx, xy[1] + half / sy


def interior_point(mask: np.ndarray, rng: np.random.Generator, depth_quantile: float = 0.5):
    """A random pixel (x, y) of the mask, drawn from its deeper half (a user clicks inside, not on the edge)."""
    import SimpleITK as sitk

    dist = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(sitk.GetImageFromArray(mask.astype(np.uint8)),
                                                               insideIsPositive=True, squaredDistance=False,
                                                               useImageSpacing=False))
    inside = dist[mask > 0]
    ys, xs = np.nonzero(mask > 0)
    deep = inside >= np.quantile(inside, depth_quantile)
    n = int(rng.integers(0, int(deep.sum())))
    return float(xs[deep][n]), float(ys[deep][n])


def _model_px_per_mm(crop: Crop, ts: TrainingSlice) -> Tuple[float, float]:
    sy, sx = ts.pixel_spacing_yx
    return crop.sx / sx, crop.sy / sy


class PoolBuilder:
    """Builds the sample pool with a bounded number of ``model.encode`` calls."""

    def __init__(self, model, session_config: SessionConfig, config: PoolConfig, seed: int,
                 tick: Callable[[str], None] = lambda message: None,
                 should_stop: Optional[Callable[[], bool]] = None):
        self.model = model
        self.session_config = session_config
        self.config = config
        self.rng = np.random.default_rng(seed)
        self.augmenter = Augmenter(model.input_size, seed, config.augment)
        self.tick = tick
        self.should_stop = should_stop
        self.encodes = 0

    def _encode(self, image01: np.ndarray) -> torch.Tensor:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled(f"tuning stopped while encoding training crops ({self.encodes} done)")
        emb = self.model.encode(image01)
        self.encodes += 1
        self.tick(f"encoded {self.encodes} training crop(s)")
        # a normal CPU tensor (inference tensors cannot enter autograd); an exported encoder gives numpy
        return torch.as_tensor(emb[0]).detach().clone().cpu()

    def _sample(self, kind, number, ts: TrainingSlice, crop: Crop, augment: bool, click=None) -> Sample:
        image = slice_to_model(ts.image_u8, crop)
        mask = (slice_to_model(ts.mask * np.uint8(255), crop) > 0.5).astype(np.uint8)
        if augment:
            image, mask = self.augmenter(image, mask)
        click_model = tuple(float(v) for v in crop.to_model([click])[0]) if click is not None else None
        return Sample(kind, number, self._encode(image), mask, crop, _model_px_per_mm(crop, ts), click_model,
                      augment)

    def counts(self, n_pos: int, n_neg: int) -> Tuple[int, int, int]:
        """Encodes per kind: at least one plain sample per slice when the kind is enabled."""
        c = self.config
        return (max(c.box_encodes, n_pos) if c.box_encodes > 0 else 0, max(c.click_encodes, 0),
                max(c.full_encodes, n_pos + n_neg) if c.full_encodes > 0 else 0)

    def build(self, slices: List[TrainingSlice], kinds=("box", "click", "full")) -> List[Sample]:
        """Round-robin over the positive slices: the first sample of a slice is un-augmented."""
        pos = [(n, s) for n, s in enumerate(slices) if s.positive]
        neg = [(n, s) for n, s in enumerate(slices) if not s.positive]
        n_box, n_click, n_full = self.counts(len(pos), len(neg))
        out: List[Sample] = []
        if "box" in kinds:
            for r in range(n_box):
                n, ts = pos[r % len(pos)]
                plain = r < len(pos)  # the plain sample: tight box + about 5 px, as a user draws it
                margin = (4.0, 6.0) if plain else self.config.box_margin_px
                box = jitter_box(ts.box_xy, self.rng, margin, ts.image_u8.shape)
                crop = session_crop(box, ts, self.model.input_size, self.session_config)
                out.append(self._sample("box", n, ts, crop, augment=not plain))
        if "click" in kinds:
            for r in range(n_click):
                n, ts = pos[r % len(pos)]
                xy = interior_point(ts.mask, self.rng)
                crop = session_crop(click_crop_box(xy, ts, self.session_config), ts, self.model.input_size,
                                    self.session_config)
                out.append(self._sample("click", n, ts, crop, augment=False, click=xy))
        if "full" in kinds:
            full = pos + neg
            for r in range(n_full):
                n, ts = full[r % len(full)]
                crop = full_slice_crop(ts.image_u8.shape, ts.pixel_spacing_yx, self.model.input_size)
                out.append(self._sample("full", n, ts, crop, augment=r >= len(full)))
        log.info("sample pool: %d samples from %d encodes", len(out), self.encodes)
        return out
