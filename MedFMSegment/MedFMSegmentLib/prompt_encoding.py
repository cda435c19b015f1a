"""SAM's prompt encoder for points and boxes in numpy, without building the model (no torch import).

``SparsePromptEncoder`` computes what segment-anything's ``PromptEncoder.forward(points, boxes, masks=None)``
returns as its sparse embeddings: the same operations in the same order on the same weights, in float32
numpy (within 1e-5 of segment-anything's, masks the same: ``Testing/Python/test_memory.py``; numpy's sin
and cos differ from torch's by an ulp on some values). It needs only 6 small tensors (1.5 K numbers),
stored beside the exported decoder (``WEIGHTS_FILE``) or read from the checkpoint, so a model whose encoder
and decoder both run from cached OpenVINO exports imports neither torch nor segment-anything, timm or
torchvision (``models.load_model``). Operations mirror segment_anything/modeling/prompt_encoder.py (Apache-2.0).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from .tensors import as_float32

PREFIX = "prompt_encoder."
KEYS = ("pe_layer.positional_encoding_gaussian_matrix", "not_a_point_embed.weight",
        *(f"point_embeddings.{i}.weight" for i in range(4)))
WEIGHTS_FILE = "prompt_encoder.npz"


def _numpy(x) -> np.ndarray:
    """A float32 numpy copy of an array or a (CPU or GPU) torch tensor."""
    return np.array(as_float32(x), copy=True)


class SparsePromptEncoder:
    """Sparse prompt embeddings (B, N, C) of points and / or boxes given in model-input pixels."""

    def __init__(self, weights: Dict[str, object], input_size: int):
        self.gaussian = np.ascontiguousarray(_numpy(weights["pe_layer.positional_encoding_gaussian_matrix"]))
        self.not_a_point = _numpy(weights["not_a_point_embed.weight"])
        self.point_embeddings = [_numpy(weights[f"point_embeddings.{i}.weight"]) for i in range(4)]
        self.input_image_size = (int(input_size), int(input_size))
        self.embed_dim = int(self.not_a_point.shape[-1])

    @classmethod
    def from_state_dict(cls, state: Dict[str, object], input_size: int) -> "SparsePromptEncoder":
        """From a whole model's state dict (keys ``prompt_encoder.*``); KeyError if one is missing."""
        return cls({k: state[PREFIX + k] for k in KEYS}, input_size)

    def save(self, path: Path) -> None:
        """The 6 weights as an ``.npz`` (plain arrays, read back without pickle by :meth:`load`)."""
        arrays = {"pe_layer.positional_encoding_gaussian_matrix": self.gaussian,
                  "not_a_point_embed.weight": self.not_a_point,
                  **{f"point_embeddings.{i}.weight": w for i, w in enumerate(self.point_embeddings)}}
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)

    @classmethod
    def load(cls, path: Path, input_size: int) -> "SparsePromptEncoder":
        """Read what :meth:`save` wrote (KeyError / ValueError / OSError if it is not that)."""
        with np.load(str(path), allow_pickle=False) as data:
            return cls({k: data[k] for k in KEYS}, input_size)

    def _forward_with_coords(self, coords_input: np.ndarray) -> np.ndarray:
        coords = np.array(coords_input, dtype=np.float32, copy=True)
        coords[:, :, 0] = coords[:, :, 0] / np.float32(self.input_image_size[1])
        coords[:, :, 1] = coords[:, :, 1] / np.float32(self.input_image_size[0])
        coords = np.float32(2) * coords - np.float32(1)
        coords = coords @ self.gaussian
        coords = np.float32(2 * np.pi) * coords
        return np.concatenate([np.sin(coords), np.cos(coords)], axis=-1)

    def _embed_points(self, points: np.ndarray, labels: np.ndarray, pad: bool) -> np.ndarray:
        points = np.asarray(points, np.float32) + np.float32(0.5)  # shift to the centre of the pixel
        labels = np.asarray(labels)
        if pad:
            points = np.concatenate([points, np.zeros((points.shape[0], 1, 2), np.float32)], axis=1)
            labels = np.concatenate([labels, -np.ones((labels.shape[0], 1), labels.dtype)], axis=1)
        point_embedding = self._forward_with_coords(points)
        point_embedding[labels == -1] = 0.0
        point_embedding[labels == -1] += self.not_a_point
        point_embedding[labels == 0] += self.point_embeddings[0]
        point_embedding[labels == 1] += self.point_embeddings[1]
        return point_embedding

    def _embed_boxes(self, boxes: np.ndarray) -> np.ndarray:
        boxes = np.asarray(boxes, np.float32) + np.float32(0.5)  # shift to the centre of the pixel
        coords = boxes.reshape(-1, 2, 2)
        corner_embedding = self._forward_with_coords(coords)
        corner_embedding[:, 0, :] += self.point_embeddings[2][0]
        corner_embedding[:, 1, :] += self.point_embeddings[3][0]
        return corner_embedding

    def __call__(self, points: Optional[Tuple[np.ndarray, np.ndarray]] = None,
                 boxes: Optional[np.ndarray] = None) -> np.ndarray:
        """Points ((B, N, 2) xy_model, (B, N) labels) and / or boxes (B, 4) -> (B, N', C) float32."""
        bs = len(points[0]) if points is not None else len(boxes) if boxes is not None else 1
        parts = [np.empty((bs, 0, self.embed_dim), np.float32)]
        if points is not None:
            coords, labels = points
            parts.append(self._embed_points(coords, labels, pad=(boxes is None)))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        return np.concatenate(parts, axis=1)
