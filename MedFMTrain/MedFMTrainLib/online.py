"""Online adaptation: a segment's organ adapter updated from the slices the user corrected.

```python
session.set_slice_mask("axial", 63, corrected_mask)       # the user's corrections (pinned slices)
adapter = adapt_from_corrections(session, "axial", organ="Caudate_L", base=current_adapter)
session.adapter = adapter                                  # this segment's decodes only
vol = propagate(session, axis="axial", previous=vol)       # every slice is recomputed with the adapter
```

The training data are the corrected (pinned, non-empty) slices of ``axis``: each slice's image
embedding is taken from the session's cache through the model window the slice was last decoded
in (``crops``, e.g. ``VolumeResult.crops``) or the window of a box around the corrected mask, and
its target is the corrected mask mapped onto that window. The encoder is frozen, so nothing is
encoded twice. By default (``OnlineConfig.method = "head"``) only the LoRA layers after the decoder's
image path are trained (the final token-to-image attention's query / output projections, the mask
hypernetwork MLP and the IoU head: ``head_train``), on decoder features computed once per (slice,
box) with the base weights: seconds instead of minutes on a CPU (5 corrected slices, 2 threads:
measured 141 s CPU with the whole decoder per step, see README). ``method = "decoder"`` trains
every LoRA layer through the whole decoder per step (``tune.train_decoder``). Both: jittered
boxes, MedSAM's loss, from ``base``'s weights when a base adapter is given, else from zero.

Isolation: the returned :class:`OrganAdapter` is a new object with content-addressed LoRA layers;
the shared model stays bitwise the base outside ``adapter.applied``, so another segment (another
``session.adapter``, or none) gets exactly the result it had. ``out`` saves the adapter with the
store's atomic rules (``store.save_adapter``: safetensors + manifest, replaced only when complete).
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Dict, List, Optional

import numpy as np
import torch

from MedFMSegmentLib import geometry
from MedFMSegmentLib.errors import InputError
from MedFMSegmentLib.preprocess import slice_to_model

from . import adapters as A
from . import head_train
from .samples import PoolConfig, Sample
from .store import FORMAT, FORMAT_VERSION, check_output_dir, save_adapter
from .tune import TuneConfig, _Reporter, check_organ, train_decoder

log = logging.getLogger(__name__)
_ids = itertools.count()


@dataclass
class OnlineConfig:
    """How an adapter is updated from corrections (small: seconds on a CPU)."""

    # "head" measured on Putamen_L (5 corrected slices, 4 held-out slices, box Dice 0.603 without adapter):
    # 30 steps / lr 3e-3 0.754, 60 / 1e-2 0.832 (the whole decoder, 30 / 3e-3: 0.855 in 6x the time)
    steps: int = 60
    lr: float = 1e-2
    batch_size: int = 4
    seed: int = 0
    lora: A.LoraSettings = field(default_factory=lambda: A.LoraSettings(rank=4, alpha=8.0, targets="decoder"))
    box_margin_px: tuple = (0.0, 6.0)  # per-side margin of the simulated boxes around a corrected mask
    crop_margin_px: float = 2.0  # a slice without a cached window: the window of the mask's box + this
    max_slices: int = 16  # the most recently listed corrected slices beyond this are used, older dropped
    # "head": train only the LoRA layers after the image path on frozen trunk features (head_train: seconds);
    # "decoder": every LoRA layer of the decoder through the full decoder per step (tune.train_decoder: minutes)
    method: str = "head"
    jittered_boxes: int = 4  # "head": jittered boxes per corrected slice (plus its plain box) in the frozen pool
    max_pool: int = 32  # "head": at most this many (slice, box) rows (8 MB each): fewer jittered boxes per slice
    # fewer non-empty corrected slices than this: no adaptation (the adapter stays as it is); 2 measured, not
    # better (mean 3D Dice over 10 corrections guided 0.717 vs 0.720, oracle 0.801 vs 0.806)
    min_slices: int = 1
    # the kinds of image adapted ("mr", "ct": the session's intensity preset); another kind keeps its adapter.
    # MR only, from bench_effort (session 11, 11 structures, guided and oracle users; README "online adaptation"):
    # mean 3D Dice over 10 corrections on MR +0.029 / +0.016 (Colin27), 0.000 / +0.005 (tumour); on CT +0.008 /
    # -0.029 (chest), -0.002 / -0.026 (head): chosen per modality from the other dataset of the same modality
    modalities: tuple = ("mr",)

    def check(self) -> None:
        for name in ("steps", "batch_size", "max_slices", "max_pool", "min_slices"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"online adaptation: {name} must be a positive integer, got {v!r}")
        if not isinstance(self.modalities, (tuple, list)) or not set(self.modalities) <= {"mr", "ct"}:
            raise InputError(f"online adaptation: modalities must list 'mr' and/or 'ct', got {self.modalities!r}")
        if self.method not in ("head", "decoder"):
            raise InputError(f"online adaptation: method must be 'head' or 'decoder', got {self.method!r}")
        j = self.jittered_boxes
        if isinstance(j, bool) or not isinstance(j, int) or j < 0:
            raise InputError(f"online adaptation: jittered_boxes must be a non-negative integer, got {j!r}")
        if not isinstance(self.lr, (int, float)) or not np.isfinite(self.lr) or self.lr <= 0:
            raise InputError(f"online adaptation: lr must be a positive number, got {self.lr!r}")

    def tune_config(self) -> TuneConfig:
        return TuneConfig(steps=self.steps, lr=self.lr, batch_size=self.batch_size, seed=self.seed, lora=self.lora,
                          pool=PoolConfig(box_margin_px=tuple(self.box_margin_px)), localizer=False)


def modality(session) -> str:
    """"ct" or "mr": the kind of image by the session's intensity preset (CT presets are ``ct-*``)."""
    return "ct" if str(session.preset).startswith("ct") else "mr"


def skip_reason(session, axis: str, config: Optional[OnlineConfig] = None) -> Optional[str]:
    """Why the default rule does not adapt here (None: it adapts): the kind of image, too few corrected slices."""
    config = config or OnlineConfig()
    kind = modality(session)
    if kind not in config.modalities:
        return f"online adaptation is off on {kind.upper()} (OnlineConfig.modalities, README 'online adaptation')"
    n = sum(1 for a, i in session.pinned_slices(axis) if session.slice_state(a, i).mask.any())
    if n < max(config.min_slices, 1):
        return f"{n} corrected slice(s) hold the structure; online adaptation starts at {config.min_slices}"
    return None


def adapter_updater(config: Optional[OnlineConfig] = None):
    """The online adaptation ``api.segment(adapt=...)`` runs for a segment with corrected slices:
    ``update(session, axis, organ, base) -> adapter`` (:func:`adapt_from_corrections`, in memory), or ``base``
    unchanged where the rule (:func:`skip_reason`) says no; ``update.reason`` is then why."""
    config = config or OnlineConfig()
    config.check()

    def update(session, axis: str, organ: str, base=None, should_stop=None):
        update.reason = skip_reason(session, axis, config)
        if update.reason is not None:
            log.info("%s: %s", organ, update.reason)
            return base
        return adapt_from_corrections(session, axis, organ, base=base, config=config, should_stop=should_stop)
    update.reason = None
    return update


def corrected_samples(session, axis: str, crops: Optional[Dict[int, object]] = None,
                      config: Optional[OnlineConfig] = None) -> List[Sample]:
    """One training sample per non-empty corrected slice of ``axis`` (embeddings from the session's cache)."""
    config = config or OnlineConfig()
    geometry.check_axis(axis)
    pinned = [i for _, i in session.pinned_slices(axis)][-config.max_slices:]
    sy, sx = geometry.slice_pixel_spacing(session.ijk_to_ras, axis)
    shape_yx = geometry.slice_shape(session.shape, axis)
    out = []
    for number, index in enumerate(sorted(pinned)):
        mask = (session.slice_state(axis, index).mask > 0).astype(np.uint8)
        box = geometry.box_from_mask(mask)
        if box is None:  # an empty correction bounds the object; it is no box-prompt sample
            continue
        m = config.crop_margin_px
        box = (max(box[0] - m, 0), max(box[1] - m, 0), min(box[2] + m, shape_yx[1] - 1), min(box[3] + m, shape_yx[0] - 1))
        crop = (crops or {}).get(index)
        if crop is None or not session.window_fits(axis, crop, box):
            crop = session.crop_for(axis, box)
        emb = session.embedding(axis, index, crop)
        target = (slice_to_model(mask * np.uint8(255), crop) > 0.5).astype(np.uint8)
        if target.sum() < 4:
            continue
        emb = torch.as_tensor(emb[0]).detach().clone().cpu()  # the cache holds numpy (OpenVINO) or tensors
        out.append(Sample("box", number, emb, target, crop, (crop.sx / sx, crop.sy / sy)))
    return out


def _train_head(model, name: str, samples: List[Sample], config: OnlineConfig, rep: _Reporter) -> Dict:
    """``head_train.train_head`` on each sample's plain box + ``config.jittered_boxes`` jittered boxes."""
    rng = np.random.default_rng(config.seed)
    jittered = max(0, min(config.jittered_boxes, config.max_pool // len(samples) - 1))
    boxes, owner, plain = head_train.pool_boxes([s.mask for s in samples], [s.crop for s in samples], rng,
                                                jittered, tuple(config.box_margin_px))
    emb = torch.stack([samples[i].embedding for i in owner]).to(model.device)
    hw = head_train.output_hw(model, samples[0].embedding.to(model.device))
    targets = head_train.low_res_targets(np.stack([samples[i].mask for i in owner]), hw).to(model.device)
    return head_train.train_head(model, name, emb, torch.as_tensor(boxes, device=model.device), targets, plain,
                                 config.steps, config.lr, config.batch_size, config.seed, check=rep.check)


def adapt_from_corrections(session, axis: str, organ: str, base: Optional[A.OrganAdapter] = None,
                           crops: Optional[Dict[int, object]] = None, config: Optional[OnlineConfig] = None,
                           out=None, overwrite: bool = False, should_stop=None) -> Optional[A.OrganAdapter]:
    """A new adapter for ``organ`` trained on the session's corrected slices of ``axis``.

    Returns ``base`` unchanged (None if there is none) when no corrected slice holds the structure.
    ``base``: the segment's current adapter (its LoRA settings and weights are the starting point).
    ``out``: save the result there atomically (an existing adapter folder only with ``overwrite``).
    Nothing in the session changes (``session.adapter`` is the caller's to set).
    """
    config = config or OnlineConfig()
    config.check()
    organ = check_organ(organ)
    if out is not None:
        check_output_dir(out, overwrite)
    model = session.model
    if base is not None:
        base.check_model(model)
    t0, c0 = time.perf_counter(), time.process_time()
    samples = corrected_samples(session, axis, crops, config)
    if len(samples) < max(config.min_slices, 1):
        log.info("online adaptation of %s: %d corrected slice(s) with the structure (at least %d needed); adapter "
                 "unchanged", organ, len(samples), config.min_slices)
        return base
    t_emb = time.perf_counter() - t0
    tc = config.tune_config()
    settings = base.settings if base is not None else config.lora
    tc.lora = settings
    name = f"medfm_online_{os.getpid()}_{next(_ids)}"
    with A.model_lock(model):
        A.inject(model, name, settings, seed=config.seed)
        try:
            if base is not None:
                A.load_state(model, name, base.tensors)
            method = config.method
            if method == "head" and not head_train.head_parameters(model, name):
                log.info("online adaptation: the LoRA targets %r have no head layer; training the whole decoder",
                         settings.targets)
                method = "decoder"
            if method == "head":
                metrics = _train_head(model, name, samples, config, _Reporter(None, should_stop))
            else:
                metrics = train_decoder(model, name, samples, tc, _Reporter(None, should_stop))
            metrics["method"] = method
            tensors = A.state(model, name)
        finally:
            A.remove(model, name)
    seconds = time.perf_counter() - t0
    slices = sorted({int(s) for _, s in session.pinned_slices(axis)})
    manifest = dict(base.manifest) if base is not None else {
        "format": FORMAT, "format_version": FORMAT_VERSION, "organ": organ, "method": "lora",
        "base_model": {"id": model.spec.id, "sha256": model.checkpoint_sha256, "precision": model.precision},
        "lora": settings.to_dict(), "localizer": None}
    manifest["online"] = {"axis": axis, "corrected_slices": slices, "samples": len(samples),
                          "config": {"steps": config.steps, "lr": config.lr, "batch_size": config.batch_size,
                                     "seed": config.seed, "box_margin_px": list(config.box_margin_px),
                                     "method": config.method, "jittered_boxes": config.jittered_boxes},
                          "metrics": metrics, "seconds": {"embeddings": round(t_emb, 2), "total": round(seconds, 2),
                                      "cpu": round(time.process_time() - c0, 2)},  # all threads' CPU time
                          "torch_threads": torch.get_num_threads(),
                          "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    adapter = A.OrganAdapter(organ, model.spec.id, model.checkpoint_sha256, settings, tensors,
                             base.localizer if base is not None else None, manifest)
    t1 = time.perf_counter()
    adapter.fast_decoder(model)  # the exported decoder with these weights, built now (None on a torch model)
    manifest["online"]["seconds"]["decoder_export"] = round(time.perf_counter() - t1, 2)
    log.info("online adaptation of %s from %d corrected slice(s) in %.1f s (+ %.1f s decoder export): train Dice "
             "%.3f -> %.3f", organ, len(samples), seconds, time.perf_counter() - t1, metrics["train_dice_base"],
             metrics["train_dice_adapted"])
    if out is not None:
        adapter.path = save_adapter(adapter, out, overwrite=overwrite)
    return adapter
