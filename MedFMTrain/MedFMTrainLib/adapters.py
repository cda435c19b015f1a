"""LoRA adapters on the SAM mask decoder, swapped in and out of one shared model.

LoRA layers are injected with peft (``inject_adapter_in_model`` + ``LoraConfig``) into the
``mask_decoder`` of the loaded model, once per adapter under its own name; every other weight stays
frozen. Outside :meth:`OrganAdapter.applied`, every LoRA layer is disabled, and a disabled peft
layer computes exactly ``base_layer(x)``: the base model's outputs are bitwise those of the
untouched model. Switching organs only switches the active adapter name (no reload).

Targets (module names inside ``mask_decoder``), ``LoraSettings.targets``:
  ``attn``     the TwoWayTransformer's attention projections (q/k/v/out_proj);
  ``attn_mlp`` plus the transformer MLPs (lin1, lin2);
  ``decoder``  plus the single-mask hypernetwork MLP and the IoU head (default);
  or a regular expression matched against the full module name.

The image encoder is not adapted: an encoder adapter would need a backward pass through the
encoder for every sample (seconds each on a CPU), far beyond the 5-minute budget, and would make
cached embeddings unusable during training.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import re
import threading
import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from MedFMSegmentLib.errors import InputError

log = logging.getLogger(__name__)

from .lora_settings import _ATTN, _MLP, TARGET_PRESETS, LoraSettings  # noqa: E402,F401  (torch-free; public here)


# --------------------------------------------------------------------------- the shared model's LoRA layers

class _Host:
    """Bookkeeping kept on one model's mask decoder: a lock and the injected adapter names."""

    def __init__(self):
        self.lock = threading.RLock()
        self.names: Dict[str, List[str]] = {}  # adapter name -> wrapped module names


def _decoder(model) -> torch.nn.Module:
    return model.net.mask_decoder


def _host(model) -> _Host:
    md = _decoder(model)
    host = md.__dict__.get("_medfm_adapter_host")
    if host is None:
        host = _Host()
        md.__dict__["_medfm_adapter_host"] = host
    return host


def model_lock(model) -> threading.RLock:
    """The lock that serialises adapter switching on one model."""
    return _host(model).lock


def _lora_layers(model) -> Dict[str, torch.nn.Module]:
    return _lora_layers_of(_decoder(model))


def _lora_layers_of(module: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer)}


def _set_enabled(model, name: Optional[str]) -> None:
    """Activate adapter ``name`` on every LoRA layer that has it, disable all others (None: all off)."""
    for layer in _lora_layers(model).values():
        if name is not None and name in layer.lora_A:
            layer.enable_adapters(True)
            layer.set_adapter(name, inference_mode=True)
        else:
            layer.enable_adapters(False)


def inject(model, name: str, settings: LoraSettings, seed: int = 0) -> List[str]:
    """Add LoRA adapter ``name`` to the model's mask decoder (disabled); returns the wrapped module names.

    A is initialised from ``seed`` (Kaiming-uniform, as peft does), B with zeros, without touching
    torch's global random state.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise InputError(f"adapter name {name!r} must be letters, digits and underscores")
    host = _host(model)
    with host.lock:
        if name in host.names:
            raise InputError(f"adapter {name!r} is already injected in this model")
        config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=settings.pattern,
                            lora_dropout=0.0, bias="none")
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "multiple adapters in the model": intended
            try:
                inject_adapter_in_model(config, _decoder(model), adapter_name=name)
            except ValueError as exc:
                raise InputError(f"LoRA targets {settings.targets!r} match no module of the mask decoder: "
                                 f"{exc}") from None
        wrapped = sorted(n for n, m in _lora_layers(model).items() if name in m.lora_A)
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for n in wrapped:
                layer = _lora_layers(model)[n]
                torch.nn.init.kaiming_uniform_(layer.lora_A[name].weight, a=5 ** 0.5, generator=gen)
                torch.nn.init.zeros_(layer.lora_B[name].weight)
                layer.lora_A[name].weight.requires_grad_(False)
                layer.lora_B[name].weight.requires_grad_(False)
        host.names[name] = wrapped
        _set_enabled(model, None)
        log.debug("injected LoRA adapter %s into %d decoder modules", name, len(wrapped))
        return wrapped


def remove(model, name: str) -> None:
    """Delete adapter ``name`` from the model (its LoRA weights are freed; the base is untouched)."""
    host = _host(model)
    with host.lock:
        if name not in host.names:
            return
        for layer in _lora_layers(model).values():
            if name in layer.lora_A:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    layer.delete_adapter(name)
        getattr(_decoder(model), "peft_config", {}).pop(name, None)
        del host.names[name]
        _set_enabled(model, None)


def lora_parameters(model, name: str) -> List[torch.nn.Parameter]:
    out = []
    for layer in _lora_layers(model).values():
        if name in layer.lora_A:
            out += [layer.lora_A[name].weight, layer.lora_B[name].weight]
    return out


def state(model, name: str) -> Dict[str, torch.Tensor]:
    """The adapter's weights: ``{"<module>.lora_A.weight": tensor, "<module>.lora_B.weight": ...}`` (copies)."""
    out = {}
    for n in _host(model).names.get(name, []):
        layer = _lora_layers(model)[n]
        out[f"{n}.lora_A.weight"] = layer.lora_A[name].weight.detach().cpu().clone().contiguous()
        out[f"{n}.lora_B.weight"] = layer.lora_B[name].weight.detach().cpu().clone().contiguous()
    return out


def load_state(model, name: str, tensors: Dict[str, torch.Tensor]) -> None:
    """Copy saved LoRA weights into injected adapter ``name``; every tensor must fit exactly."""
    layers = _lora_layers(model)
    wanted = {f"{n}.lora_{ab}.weight" for n in _host(model).names[name] for ab in "AB"}
    if set(tensors) != wanted:
        missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
        raise InputError(f"adapter weights do not fit the model's decoder: {len(missing)} missing "
                         f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})")
    with torch.no_grad():
        for key, value in tensors.items():
            module, ab = key[: -len(".lora_A.weight")], key[-len("A.weight")]
            target = getattr(layers[module], f"lora_{ab}")[name].weight
            if tuple(value.shape) != tuple(target.shape):
                raise InputError(f"adapter tensor {key} has shape {tuple(value.shape)}, the model needs "
                                 f"{tuple(target.shape)}")
            target.copy_(value.to(target.dtype))


# --------------------------------------------------------------------------- decoder forward for training

def decode_batch(model, embeddings: torch.Tensor, boxes_xy_model: torch.Tensor,
                 points_xy_model: Optional[torch.Tensor] = None, point_labels: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prompt encoder + mask decoder on a batch of (embedding, prompt) pairs, with autograd.

    ``MaskDecoder.predict_masks`` repeats one image's embedding for several prompts; training needs
    one prompt per embedding, so this runs the same modules in the same order without the repeat.
    Returns (single-mask low-resolution logits (B, 1, h, w), predicted IoU (B,)).
    """
    pe, md = model.net.prompt_encoder, model.net.mask_decoder
    points = (points_xy_model, point_labels) if points_xy_model is not None else None
    sparse, dense = pe(points=points, boxes=boxes_xy_model, masks=None)
    output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
    src = embeddings + dense
    pos_src = pe.get_dense_pe().expand(embeddings.shape[0], -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = md.transformer(src, pos_src, tokens)
    src = src.transpose(1, 2).reshape(b, c, h, w)
    upscaled = md.output_upscaling(src)
    hyper = md.output_hypernetworks_mlps[0](hs[:, 1, :])  # mask token 0: the single-mask output
    b, c, h, w = upscaled.shape
    logits = (hyper.unsqueeze(1) @ upscaled.view(b, c, h * w)).view(b, 1, h, w)
    iou = md.iou_prediction_head(hs[:, 0, :])[:, 0]
    return logits, iou


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor,
                      iou_pred: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """MedSAM's loss: BCE + soft Dice on the mask, plus MSE of the predicted IoU. Returns (loss, IoU)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    inter = (prob * target).flatten(1).sum(1)
    dice = 1 - (2 * inter + 1) / (prob.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
    with torch.no_grad():
        hard = (logits > 0).float()
        i = (hard * target).flatten(1).sum(1)
        u = ((hard + target) > 0).float().flatten(1).sum(1)
        true_iou = i / u.clamp(min=1)
    return bce + dice.mean() + F.mse_loss(iou_pred, true_iou), true_iou


# --------------------------------------------------------------------------- the adapter object

def tensors_digest(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over sorted names, shapes and bytes: the identity of a set of weights."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class OrganAdapter:
    """A trained organ adapter: decoder LoRA weights, optional localizer, and its manifest.

    Set it as ``session.adapter``: the session decodes inside :meth:`applied`. ``encoder_id`` is None
    (the encoder is not adapted, so cached embeddings are shared with the base model).
    """

    encoder_id = None

    def __init__(self, organ: str, base_model_id: str, base_sha256: str, settings: LoraSettings,
                 tensors: Dict[str, torch.Tensor], localizer=None, manifest: Optional[Dict] = None, path=None):
        self.organ = organ
        self.base_model_id = base_model_id
        self.base_sha256 = base_sha256
        self.settings = settings
        self.tensors = tensors
        self.localizer = localizer  # a localizer.LocalizerState or None
        self.manifest = manifest or {}
        self.path = path
        self.digest = tensors_digest(tensors)
        self._fast: Dict[int, object] = {}  # id(model) -> its fast decoder with this adapter, or None

    @property
    def peft_name(self) -> str:
        """Name of this adapter inside the shared model (content-addressed: same weights, same name)."""
        return f"medfm_{self.digest[:16]}"

    def __repr__(self) -> str:
        return f"OrganAdapter({self.organ!r}, base={self.base_model_id}, rank={self.settings.rank}, {self.digest[:8]})"

    def check_model(self, model) -> None:
        """Raise InputError unless ``model`` is the base model this adapter was trained on."""
        if model.checkpoint_sha256 != self.base_sha256:
            where = f" ({self.path})" if self.path else ""
            raise InputError(f"adapter {self.organ!r}{where} was trained on base model {self.base_model_id!r} with "
                             f"sha256 {self.base_sha256}, but the loaded model {model.spec.id!r} has sha256 "
                             f"{model.checkpoint_sha256}; retrain the adapter for this model")

    def attach(self, model) -> None:
        """Inject this adapter's weights into the shared model once (disabled until :meth:`applied`)."""
        self.check_model(model)
        host = _host(model)
        with host.lock:
            if self.peft_name in host.names:
                return
            inject(model, self.peft_name, self.settings)
            try:
                load_state(model, self.peft_name, self.tensors)
            except Exception:
                remove(model, self.peft_name)
                raise

    def detach(self, model) -> None:
        """Free this adapter's layers in the model (the base stays bitwise as it was)."""
        remove(model, self.peft_name)

    @contextlib.contextmanager
    def applied(self, model) -> Iterator[None]:
        """Within the block, the model's decoder runs with this adapter; afterwards, the pure base model.

        Holds the model's adapter lock for the duration: another thread applying a different adapter
        waits. (Plain base-model decodes in other threads do not take the lock.)
        """
        self.check_model(model)
        host = _host(model)
        with host.lock:
            self.attach(model)
            _set_enabled(model, self.peft_name)
            try:
                yield
            finally:
                _set_enabled(model, None)

    def fast_decoder(self, model):
        """This adapter's exported decoder on ``model`` (its LoRA merged into a copy of the decoder, compiled once
        per model and checked against the torch decoder with the adapter), or None: the torch decoder then runs
        inside :meth:`applied` (a model on torch, or a failed check)."""
        key = id(model)
        if key not in self._fast:
            self.check_model(model)
            with model_lock(model):
                self._fast[key] = _checked_fast_decoder(model, self)
        return self._fast[key]

    def detector(self, model, **kwargs):
        """The organ localizer as a ``Detector`` (``detect(array_kji, ijk_to_ras)``)."""
        from .localizer import OrganLocalizer

        if self.localizer is None:
            raise InputError(f"adapter {self.organ!r} has no localizer (it was trained without one)")
        self.check_model(model)
        return OrganLocalizer(self.localizer, model, self.organ, **kwargs)


def merged_decoder(model, adapter: "OrganAdapter") -> torch.nn.Module:
    """A copy of the model's base mask decoder with ``adapter``'s LoRA products added to the weights they adapt
    (``W + alpha / rank * B A``, peft's scaling): no LoRA layer left, the shared model untouched."""
    md = _decoder(model)
    host = md.__dict__.get("_medfm_adapter_host")
    copy_md = copy.deepcopy(md, memo={id(host): host} if host is not None else None)
    copy_md.__dict__.pop("_medfm_adapter_host", None)
    copy_md.__dict__.pop("peft_config", None)
    for name in list(_lora_layers_of(copy_md)):
        parent, _, leaf = name.rpartition(".")
        owner = copy_md.get_submodule(parent) if parent else copy_md
        setattr(owner, leaf, copy_md.get_submodule(name).base_layer)
    scale = adapter.settings.alpha / adapter.settings.rank
    with torch.no_grad():
        for key, a in adapter.tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[: -len(".lora_A.weight")]
            b = adapter.tensors[f"{module}.lora_B.weight"]
            weight = copy_md.get_submodule(module).weight
            weight += (scale * b.to(torch.float32) @ a.to(torch.float32)).to(weight.dtype)
    return copy_md.eval()


def _checked_fast_decoder(model, adapter: "OrganAdapter"):
    """``compile_decoder_like`` on the merged decoder, kept only if its masks agree with the torch decoder's with
    the adapter on a fixed random embedding (the base export's bounds: logits within 1e-2, masks' Dice 0.99)."""
    from MedFMSegmentLib.model_registry import EMBED_DIM, embedding_grid
    from MedFMSegmentLib.openvino_model import compile_decoder_like
    from MedFMSegmentLib.runtimes import MIN_AGREEMENT, mask_agreement, probe_boxes

    if model._fast_decoder is None:
        return None
    try:
        fast = compile_decoder_like(model, merged_decoder(model, adapter))
    except Exception as exc:  # an export failure costs speed, never the result
        log.warning("adapter %s: exported decoder failed (%s: %s); decoding on torch", adapter.organ,
                    type(exc).__name__, exc)
        return None
    if fast is None:
        return None
    grid = embedding_grid(model.input_size)
    emb = torch.randn((1, EMBED_DIM, grid, grid), generator=torch.Generator().manual_seed(3))
    ref, out = [], []
    for box in probe_boxes(model.input_size):
        with adapter.applied(model), torch.inference_mode():
            ref.append(model.decode(emb, box_xy_model=box)[0].float().numpy())
        out.append(model.decode(emb.numpy(), box_xy_model=box, fast=True, adapter=_Fixed(fast))[0])
    diff = max(float(abs(a - b).max()) for a, b in zip(ref, out))
    agreement = mask_agreement(ref, out)
    if diff > 1e-2 or agreement < MIN_AGREEMENT["fp32"]:
        log.warning("adapter %s: exported decoder disagrees with torch (max diff %.3g, Dice %.4f); decoding on torch",
                    adapter.organ, diff, agreement)
        return None
    log.info("adapter %s: exported decoder built (max logit diff %.2g vs torch)", adapter.organ, diff)
    return fast


class _Fixed:
    """An adapter stand-in that hands ``SamModel.decode`` a given fast decoder (the check above)."""

    def __init__(self, fast):
        self._decoder = fast

    def fast_decoder(self, model):
        return self._decoder


def injected_adapters(model) -> List[str]:
    """Names of the adapters currently injected in the model."""
    return sorted(_host(model).names)
