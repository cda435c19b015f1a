"""The learned organ localizer: a small conv head on frozen whole-slice embeddings -> boxes.

The head sees the encoder's embedding of the whole slice (``full_slice_crop``, as the session
encodes a slice without a box) plus two coordinate channels (x, y in [-1, 1]: organs are
lateralised and the convolutions alone cannot tell left from right), and predicts an objectness
heatmap on the embedding grid. A slice's box is the bounding box of the heatmap's main region
(probability above the threshold), mapped back to slice pixels through the crop.

:class:`OrganLocalizer` is a ``Detector`` (``MedFMSegmentLib.detectors``): ``detect(array_kji,
ijk_to_ras)`` scans slices of the adapter's axis and returns one :class:`Detection` with per-slice
boxes (boxes between scanned slices are interpolated).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from MedFMSegmentLib import geometry
from MedFMSegmentLib.errors import Cancelled, InputError
from MedFMSegmentLib.preprocess import Crop, full_slice_crop, normalise_volume, slice_to_model

log = logging.getLogger(__name__)


class LocalizerHead(nn.Module):
    """(B, C, h, w) embedding -> (B, 1, h, w) objectness logits. Dilated convs widen the view."""

    def __init__(self, in_channels: int = 256, hidden: int = 16):
        super().__init__()
        self.reduce = nn.Conv2d(in_channels + 2, hidden, 1)
        self.body = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=4, dilation=4), nn.ReLU(),
        )
        self.out = nn.Conv2d(hidden, 1, 1)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        b, _, h, w = emb.shape
        ys = torch.linspace(-1, 1, h, dtype=emb.dtype, device=emb.device)
        xs = torch.linspace(-1, 1, w, dtype=emb.dtype, device=emb.device)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        coords = torch.stack([gx, gy])[None].expand(b, -1, -1, -1)
        x = F.relu(self.reduce(torch.cat([emb, coords], 1)))
        return self.out(self.body(x))


@dataclass
class LocalizerState:
    """What is saved of a localizer: head weights and the settings used to read its heatmap."""

    tensors: Dict[str, torch.Tensor]
    in_channels: int
    hidden: int
    axis: str
    preset: str
    threshold: float = 0.5  # presence: the heatmap's peak must reach it
    metrics: Dict = field(default_factory=dict)
    extent_threshold: float = 0.25  # the box covers the region above this (the heatmap's edges are soft)

    def config(self) -> Dict:
        return {"in_channels": self.in_channels, "hidden": self.hidden, "axis": self.axis, "preset": self.preset,
                "threshold": self.threshold, "extent_threshold": self.extent_threshold}

    def head(self) -> LocalizerHead:
        head = LocalizerHead(self.in_channels, self.hidden)
        missing, unexpected = head.load_state_dict(self.tensors, strict=False)
        if missing or unexpected:
            raise InputError(f"localizer weights do not fit its head: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}")
        return head.eval().requires_grad_(False)


def localizer_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE (positives weighted: organs are small) + soft Dice over the batch."""
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(8.0))
    prob = torch.sigmoid(logits)
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return bce + dice


def heatmap_target(mask_model: np.ndarray, hw: Tuple[int, int]) -> torch.Tensor:
    """Model-input mask (S, S) -> soft target on the embedding grid (area fraction per cell)."""
    m = torch.as_tensor(mask_model, dtype=torch.float32)[None, None]
    return F.adaptive_avg_pool2d(m, hw)[0]


def box_from_heatmap(prob_model: np.ndarray, threshold: float,
                     extent_threshold: Optional[float] = None) -> Optional[Tuple[Tuple[float, ...], float]]:
    """Main region of an (S, S) probability map -> (tight box in model pixels, score), or None.

    The organ is present when the peak probability (the score) reaches ``threshold``; its box covers
    the regions above ``extent_threshold`` (default: ``threshold``) whose mass is at least a third of
    the strongest one (an organ cut in two pieces on a slice gives one box around both).
    """
    import SimpleITK as sitk

    if prob_model.max() < threshold:
        return None
    extent = threshold if extent_threshold is None else min(extent_threshold, threshold)
    above = (prob_model >= extent).astype(np.uint8)
    lab = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(above)))
    n = int(lab.max())
    mass = np.bincount(lab.ravel(), weights=prob_model.ravel(), minlength=n + 1)[1:]
    keep = np.nonzero(mass >= mass.max() / 3.0)[0] + 1
    region = np.isin(lab, keep)
    box = geometry.box_from_mask(region)
    return tuple(float(v) for v in box), float(prob_model[region].max())


def model_box_to_slice(box_model, crop: Crop, shape_yx) -> Tuple[float, float, float, float]:
    """Inverse of ``Crop.box_to_model``, clipped to the slice."""
    x0, y0, x1, y1 = box_model
    h, w = shape_yx
    bx0, bx1 = x0 / crop.sx + crop.x0, x1 / crop.sx + crop.x0
    by0, by1 = y0 / crop.sy + crop.y0, y1 / crop.sy + crop.y0
    return (float(np.clip(bx0, 0, w - 1)), float(np.clip(by0, 0, h - 1)),
            float(np.clip(bx1, 0, w - 1)), float(np.clip(by1, 0, h - 1)))


def predict_box(head: LocalizerHead, embedding: torch.Tensor, crop: Crop, shape_yx, threshold: float,
                extent_threshold: Optional[float] = None):
    """(box_xy on the slice, score) from one whole-slice embedding (C, h, w) or (1, C, h, w); None if absent."""
    emb = embedding if embedding.dim() == 4 else embedding[None]
    with torch.no_grad():
        logits = head(emb.float())
        prob = torch.sigmoid(F.interpolate(logits, size=(crop.size, crop.size), mode="bilinear",
                                           align_corners=False))[0, 0].numpy()
    found = box_from_heatmap(prob, threshold, extent_threshold)
    if found is None:
        return None
    box_model, score = found
    return model_box_to_slice(box_model, crop, shape_yx), score


class OrganLocalizer:
    """Detector for one organ from an adapter's localizer (see module docstring).

    ``stride`` scans every n-th slice (each scanned slice is one encoder run, the cost); boxes of the
    slices in between are interpolated from their scanned neighbours when both found the organ.
    """

    def __init__(self, state: LocalizerState, model, organ: str, stride: int = 4,
                 threshold: Optional[float] = None, cache=None):
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise InputError(f"localizer stride must be a positive integer, got {stride!r}")
        self.state = state
        self.model = model
        self.organ = organ
        self.labels = (organ,)
        self.stride = stride
        self.threshold = state.threshold if threshold is None else float(threshold)
        self.head = state.head()
        self.cache = cache  # optional dict-like {key: embedding} shared between calls

    @property
    def axis(self) -> str:
        return self.state.axis

    def slice_box(self, volume_u8: np.ndarray, ijk_to_ras, index: int):
        """(box_xy, score) of the organ on one slice of a normalised volume, or None."""
        axis = self.axis
        shape = geometry.slice_shape(volume_u8.shape, axis)
        crop = full_slice_crop(shape, geometry.slice_pixel_spacing(ijk_to_ras, axis), self.model.input_size)
        key = (id(volume_u8), axis, index, crop.key)
        emb = self.cache.get(key) if self.cache is not None else None
        if emb is None:
            emb = torch.as_tensor(self.model.encode(slice_to_model(geometry.get_slice(volume_u8, axis, index), crop)))
            if self.cache is not None:
                self.cache[key] = emb
        return predict_box(self.head, emb, crop, shape, self.threshold, self.state.extent_threshold)

    def detect(self, array_kji: np.ndarray, ijk_to_ras, indices: Optional[Sequence[int]] = None,
               progress: Optional[Callable[[float, str], None]] = None,
               should_stop: Optional[Callable[[], bool]] = None) -> List:
        """Scan slices (``indices``, default every ``stride``-th slice) -> [Detection] (empty if not found)."""
        from MedFMSegmentLib.detectors import Detection

        matrix = geometry.check_matrix(ijk_to_ras)
        volume_u8, _, _ = normalise_volume(array_kji, self.state.preset)
        n = geometry.num_slices(volume_u8.shape, self.axis)
        scan = list(range(self.stride // 2, n, self.stride)) if indices is None else \
            [geometry.check_index(volume_u8.shape, self.axis, int(i)) for i in indices]
        found: Dict[int, Tuple[Tuple[float, ...], float]] = {}
        for count, index in enumerate(scan):
            if should_stop is not None and should_stop():
                raise Cancelled(f"localizer stopped after {count} of {len(scan)} slices")
            hit = self.slice_box(volume_u8, matrix, index)
            if hit is not None:
                found[index] = hit
            if progress is not None:
                progress((count + 1) / len(scan), f"{self.organ}: scanned {self.axis} slice {index}")
        if not found:
            log.info("localizer %s: no slice above threshold %.2f (%d scanned)", self.organ, self.threshold, len(scan))
            return []
        boxes = interpolate_boxes(found, self.stride if indices is None else 1)
        score = max(s for _, s in found.values())
        slice_boxes = tuple((self.axis, i, b) for i, b in sorted(boxes.items()))
        return [Detection(self.organ, score, slice_boxes=slice_boxes)]


def interpolate_boxes(found: Dict[int, Tuple[Tuple[float, ...], float]], stride: int) -> Dict[int, Tuple[float, ...]]:
    """Per-slice boxes: the found ones, plus linear interpolation between found slices ``stride`` apart."""
    out = {i: b for i, (b, _) in found.items()}
    idx = sorted(found)
    for a, b in zip(idx, idx[1:]):
        if b - a > stride or b - a <= 1:
            continue
        ba, bb = np.asarray(found[a][0]), np.asarray(found[b][0])
        for i in range(a + 1, b):
            t = (i - a) / (b - a)
            out[i] = tuple(float(v) for v in (1 - t) * ba + t * bb)
    return out
