"""SAM's prompt encoder for points and boxes, without building the model (no segment-anything import).

``SparsePromptEncoder`` computes what segment-anything's ``PromptEncoder.forward(points, boxes, masks=None)``
returns as its sparse embeddings, with the same torch operations in the same order on the same weights
(bitwise equal: ``Testing/Python/test_memory.py``). It needs only 6 small tensors (1.5 K numbers),
read from the checkpoint without building the network, so a model whose encoder and decoder both run
from cached OpenVINO exports never imports segment-anything, timm or torchvision, nor holds the torch
weights (``models.load_model``). Operations mirror segment_anything/modeling/prompt_encoder.py (Apache-2.0).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

PREFIX = "prompt_encoder."
KEYS = ("pe_layer.positional_encoding_gaussian_matrix", "not_a_point_embed.weight",
        *(f"point_embeddings.{i}.weight" for i in range(4)))


class SparsePromptEncoder:
    """Sparse prompt embeddings (B, N, C) of points and / or boxes given in model-input pixels."""

    def __init__(self, weights: Dict[str, torch.Tensor], input_size: int):
        self.gaussian = weights["pe_layer.positional_encoding_gaussian_matrix"].float().contiguous()
        self.not_a_point = weights["not_a_point_embed.weight"].float().contiguous()
        self.point_embeddings = [weights[f"point_embeddings.{i}.weight"].float().contiguous() for i in range(4)]
        self.input_image_size = (int(input_size), int(input_size))
        self.embed_dim = int(self.not_a_point.shape[-1])

    @classmethod
    def from_state_dict(cls, state: Dict[str, torch.Tensor], input_size: int) -> "SparsePromptEncoder":
        """From a whole model's state dict (keys ``prompt_encoder.*``); KeyError if one is missing."""
        return cls({k: state[PREFIX + k].detach().clone() for k in KEYS}, input_size)

    def _forward_with_coords(self, coords_input: torch.Tensor) -> torch.Tensor:
        coords = coords_input.clone()
        coords[:, :, 0] = coords[:, :, 0] / self.input_image_size[1]
        coords[:, :, 1] = coords[:, :, 1] / self.input_image_size[0]
        coords = coords.to(torch.float)
        coords = 2 * coords - 1
        coords = coords @ self.gaussian
        coords = 2 * np.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # shift to the centre of the pixel
        if pad:
            padding_point = torch.zeros((points.shape[0], 1, 2), device=points.device)
            padding_label = -torch.ones((labels.shape[0], 1), device=labels.device)
            points = torch.cat([points, padding_point], dim=1)
            labels = torch.cat([labels, padding_label], dim=1)
        point_embedding = self._forward_with_coords(points)
        point_embedding[labels == -1] = 0.0
        point_embedding[labels == -1] += self.not_a_point
        point_embedding[labels == 0] += self.point_embeddings[0]
        point_embedding[labels == 1] += self.point_embeddings[1]
        return point_embedding

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        boxes = boxes + 0.5  # shift to the centre of the pixel
        coords = boxes.reshape(-1, 2, 2)
        corner_embedding = self._forward_with_coords(coords)
        corner_embedding[:, 0, :] += self.point_embeddings[2]
        corner_embedding[:, 1, :] += self.point_embeddings[3]
        return corner_embedding

    @torch.inference_mode()
    def __call__(self, points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                 boxes: Optional[torch.Tensor] = None) -> torch.Tensor:
        bs = points[0].shape[0] if points is not None else boxes.shape[0] if boxes is not None else 1
        sparse = torch.empty((bs, 0, self.embed_dim))
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=(boxes is None))], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        return sparse
