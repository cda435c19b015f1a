"""Augmentation of model-input images and their masks with MONAI transforms (seeded).

Applied on the (S, S) model input (after the crop around the box), so geometry stays in model
pixels: small rotations and scaling (``RandAffined``; cropping comes from the jittered box that
chose the crop), intensity scaling and shifts, Gaussian noise, and random erasing
(``RandCoarseDropoutd``, image only). Flips are left out: organs are lateralised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    rotate_deg: float = 12.0
    scale: float = 0.12  # +/- fraction
    translate_px: float = 10.0  # in model pixels of a 256 input (scaled for other sizes)
    intensity_scale: float = 0.10
    intensity_shift: float = 0.06
    noise_std: float = 0.02
    erase_holes: int = 3
    erase_size_frac: float = 0.06  # hole side as a fraction of the input size

    def to_dict(self):
        return dict(self.__dict__)


class Augmenter:
    """Seeded MONAI pipeline on ``{"image", "label"}``; call with (image01, mask) -> (image01, mask)."""

    def __init__(self, size: int, seed: int, config: AugmentConfig = AugmentConfig(), geometric: bool = True):
        from monai.transforms import (Compose, RandAffined, RandCoarseDropoutd, RandGaussianNoised,
                                      RandScaleIntensityd, RandShiftIntensityd)

        c = config
        hole = max(2, int(round(c.erase_size_frac * size)))
        steps = []
        if geometric:
            t = c.translate_px * size / 256.0
            steps.append(RandAffined(keys=("image", "label"), prob=0.9, rotate_range=math.radians(c.rotate_deg),
                                     scale_range=(c.scale, c.scale), translate_range=(t, t),
                                     mode=("bilinear", "nearest"), padding_mode="zeros"))
        steps += [
            RandScaleIntensityd(keys="image", factors=c.intensity_scale, prob=0.7),
            RandShiftIntensityd(keys="image", offsets=c.intensity_shift, prob=0.7),
            RandGaussianNoised(keys="image", std=c.noise_std, prob=0.5),
            RandCoarseDropoutd(keys="image", holes=1, max_holes=c.erase_holes, spatial_size=hole, fill_value=0.0,
                               prob=0.3),
        ]
        self._compose = Compose(steps)
        self._compose.set_random_state(seed=int(seed) % (2 ** 32))

    def __call__(self, image01: np.ndarray, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        data = {"image": np.asarray(image01, np.float32)[None], "label": np.asarray(mask, np.float32)[None]}
        out = self._compose(data)
        image = np.clip(np.asarray(out["image"], np.float32)[0], 0.0, 1.0)
        label = (np.asarray(out["label"], np.float32)[0] > 0.5).astype(np.uint8)
        return image, label
