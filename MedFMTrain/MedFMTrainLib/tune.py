"""Few-shot tuning of an organ adapter: LoRA on the mask decoder + an organ localizer.

```python
from MedFMTrainLib.data import slices_from_segmentation
from MedFMTrainLib.tune import TuneConfig, tune
ts = slices_from_segmentation(array_kji, ijk_to_ras, mask_kji, "axial", [40, 45, 50, 55, 60])
adapter = tune(model, ts, "Caudate_L", TuneConfig(steps=120), progress=print_progress, out="adapters/Caudate_L")
session.adapter = adapter            # the session's decodes now use the adapter
```

Steps: (1) a fixed pool of frozen-encoder embeddings of jittered / augmented crops (the bounded,
expensive part), (2) LoRA training of the decoder on simulated prompts (jittered boxes as
MedSAM trains, and the square click boxes the session tries around a click), (3) the localizer
head on whole-slice embeddings, (4) optionally an atomic save. ``should_stop()`` is polled between
encodes and steps: when it returns True, :class:`Cancelled` is raised, the model is left with no
trace of the adapter and nothing is written.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from MedFMSegmentLib import geometry
from MedFMSegmentLib.errors import Cancelled, InputError
from MedFMSegmentLib.session import SessionConfig

from . import adapters as A
from .data import TrainingSet
from .evaluate import box_iou
from .localizer import LocalizerHead, LocalizerState, heatmap_target, localizer_loss, predict_box
from .samples import PoolBuilder, PoolConfig, Sample
from .store import FORMAT, FORMAT_VERSION, check_output_dir, save_adapter
from .store_files import check_organ  # noqa: F401  (torch-free; public here)

log = logging.getLogger(__name__)

Progress = Optional[Callable[[float, str], None]]
ShouldStop = Optional[Callable[[], bool]]

_run_ids = itertools.count()


@dataclass
class TuneConfig:
    """Everything that decides the trained weights (with the data and the base model)."""

    steps: int = 40
    lr: float = 3e-3
    batch_size: int = 4
    seed: int = 0
    lora: A.LoraSettings = field(default_factory=A.LoraSettings)
    pool: PoolConfig = field(default_factory=PoolConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    click_prompt_fraction: float = 0.7  # on click samples: square click boxes vs a box around the organ
    point_prompt_fraction: float = 0.5  # point-trained models (SAM): batches that add a positive point
    localizer: bool = True
    localizer_steps: int = 150
    localizer_lr: float = 3e-3
    localizer_hidden: int = 16
    localizer_threshold: float = 0.5  # presence (heatmap peak)
    localizer_extent_threshold: float = 0.25  # box extent (measured on Caudate_L held-out slices)

    def check(self) -> None:
        for name in ("steps", "batch_size", "localizer_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name != "localizer_steps" else 0):
                raise InputError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr", "localizer_lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
                raise InputError(f"{name} (learning rate) must be a positive number, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"seed must be an integer, got {self.seed!r}")
        if self.pool.box_encodes < 1:
            raise InputError(f"box_encodes must be at least 1 (got {self.pool.box_encodes}): the decoder learns "
                             "from box crops")

    def to_dict(self) -> Dict:
        return {"steps": self.steps, "lr": self.lr, "batch_size": self.batch_size, "seed": self.seed,
                "lora": self.lora.to_dict(), "pool": self.pool.to_dict(),
                "session": {"zoom": self.session.zoom, "context": self.session.context,
                            "min_crop_mm": self.session.min_crop_mm,
                            "click_box_sizes_mm": list(self.session.click_box_sizes_mm)},
                "click_prompt_fraction": self.click_prompt_fraction,
                "point_prompt_fraction": self.point_prompt_fraction,
                "localizer": self.localizer, "localizer_steps": self.localizer_steps,
                "localizer_lr": self.localizer_lr, "localizer_hidden": self.localizer_hidden,
                "localizer_threshold": self.localizer_threshold,
                "localizer_extent_threshold": self.localizer_extent_threshold}


class _Reporter:
    """Maps stage-local progress onto [0, 1] and polls ``should_stop``."""

    def __init__(self, progress: Progress, should_stop: ShouldStop):
        self.progress, self.should_stop = progress, should_stop
        self.lo, self.hi = 0.0, 1.0

    def stage(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def __call__(self, fraction: float, message: str) -> None:
        if self.progress is not None:
            self.progress(self.lo + (self.hi - self.lo) * min(max(fraction, 0.0), 1.0), message)

    def check(self, where: str) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled(f"tuning stopped by the user ({where}); no adapter was written")


# --------------------------------------------------------------------------- prompts

def simulate_box(sample: Sample, rng: np.random.Generator, config: TuneConfig) -> np.ndarray:
    """A prompt box (model pixels) for a sample: a jittered box around its mask, or a click box."""
    s = sample.crop.size
    if sample.kind == "click" and rng.random() < config.click_prompt_fraction:
        size_mm = float(rng.choice(config.session.click_box_sizes_mm))
        cx, cy = sample.click_xy_model
        hx, hy = size_mm / 2 * sample.model_px_per_mm[0], size_mm / 2 * sample.model_px_per_mm[1]
        box = np.array([cx - hx, cy - hy, cx + hx, cy + hy])
    else:
        x0, y0, x1, y1 = geometry.box_from_mask(sample.mask)
        lo, hi = config.pool.box_margin_px
        m = rng.uniform(lo, hi, size=4) * np.array([sample.crop.sx, sample.crop.sy, sample.crop.sx, sample.crop.sy])
        box = np.array([x0 - m[0], y0 - m[1], x1 + m[2], y1 + m[3]])
    return np.clip(box, 0, s - 1).astype(np.float32)


def _batch(samples: List[Sample], picks, rng, config: TuneConfig, model, low_res_hw, with_points: bool):
    emb = torch.stack([samples[i].embedding for i in picks])
    boxes = torch.as_tensor(np.stack([simulate_box(samples[i], rng, config) for i in picks]))
    masks = torch.as_tensor(np.stack([samples[i].mask for i in picks]), dtype=torch.float32)[:, None]
    target = masks if tuple(masks.shape[-2:]) == tuple(low_res_hw) else F.adaptive_avg_pool2d(masks, low_res_hw)
    points = labels = None
    if with_points:
        pts = []
        for i in picks:
            ys, xs = np.nonzero(samples[i].mask)
            n = int(rng.integers(0, len(xs)))
            pts.append([[float(xs[n]), float(ys[n])]])
        points = torch.as_tensor(np.asarray(pts, np.float32))
        labels = torch.ones(len(picks), 1, dtype=torch.int64)
    return emb.to(model.device), boxes.to(model.device), target.to(model.device), points, labels


def _low_res_hw(model, sample: Sample) -> Tuple[int, int]:
    with torch.no_grad():
        logits, _ = A.decode_batch(model, sample.embedding[None].to(model.device),
                                   torch.tensor([[0.0, 0.0, 8.0, 8.0]], device=model.device))
    return tuple(logits.shape[-2:])


# --------------------------------------------------------------------------- decoder training

def _dice(logits: torch.Tensor, target: torch.Tensor) -> List[float]:
    hard = (logits > 0).float()
    t = (target > 0.5).float()
    inter = (hard * t).flatten(1).sum(1)
    s = hard.flatten(1).sum(1) + t.flatten(1).sum(1)
    return [float(v) for v in torch.where(s > 0, 2 * inter / s.clamp(min=1), torch.ones_like(s))]


def _plain_dice(model, name: Optional[str], samples: List[Sample], config: TuneConfig, hw) -> float:
    """Mean Dice on the un-augmented box samples with their plain (tight + ~5 px) box."""
    plain = [s for s in samples if s.kind == "box" and not s.augmented]
    if not plain:
        return float("nan")
    out = []
    A._set_enabled(model, name)
    try:
        with torch.no_grad():
            for s in plain:
                x0, y0, x1, y1 = geometry.box_from_mask(s.mask)
                m5 = 5 * np.array([s.crop.sx, s.crop.sy])
                box = np.clip([x0 - m5[0], y0 - m5[1], x1 + m5[0], y1 + m5[1]], 0, s.crop.size - 1)
                logits, _ = A.decode_batch(model, s.embedding[None].to(model.device),
                                           torch.as_tensor(np.asarray([box], np.float32), device=model.device))
                t = torch.as_tensor(s.mask, dtype=torch.float32)[None, None]
                t = t if tuple(t.shape[-2:]) == tuple(hw) else F.adaptive_avg_pool2d(t, hw)
                out += _dice(logits.cpu(), t)
    finally:
        A._set_enabled(model, None)
    return float(np.mean(out))


def _check_loss(loss: float, where: str, lr: float) -> None:
    """Stop at once when training diverges (NaN / Inf loss): a clear error, never a NaN adapter."""
    if not np.isfinite(loss):
        raise InputError(f"training diverged at {where}: the loss is {loss}; no adapter was written "
                         f"(the learning rate {lr:.3g} is probably too high: try --lr 0.001)")


def train_decoder(model, name: str, samples: List[Sample], config: TuneConfig, rep: _Reporter) -> Dict:
    """Train the injected adapter ``name`` on the segmentation samples; returns loss / Dice metrics."""
    rng = np.random.default_rng(config.seed + 1)
    hw = _low_res_hw(model, samples[0])
    params = A.lora_parameters(model, name)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-4)
    warm = max(1, config.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, config.steps) / config.steps)))
    use_points = "points" in model.spec.trained_with
    dice_before = _plain_dice(model, None, samples, config, hw)
    losses = []
    A._set_enabled(model, name)
    for p in params:  # set_adapter(inference_mode=True) froze them
        p.requires_grad_(True)
    try:
        for step in range(config.steps):
            rep.check(f"decoder step {step} of {config.steps}")
            picks = rng.integers(0, len(samples), size=config.batch_size)
            with_points = use_points and rng.random() < config.point_prompt_fraction
            emb, boxes, target, pts, lbl = _batch(samples, picks, rng, config, model, hw, with_points)
            logits, iou = A.decode_batch(model, emb, boxes, pts, lbl)
            loss, _ = A.segmentation_loss(logits, target, iou)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            _check_loss(losses[-1], f"decoder step {step + 1}", config.lr)
            rep((step + 1) / config.steps, f"decoder step {step + 1}/{config.steps}, loss {np.mean(losses[-10:]):.3f}")
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        A._set_enabled(model, None)
    dice_after = _plain_dice(model, name, samples, config, hw)
    k = max(1, min(10, len(losses) // 4))
    return {"loss_first": round(float(np.mean(losses[:k])), 4), "loss_last": round(float(np.mean(losses[-k:])), 4),
            "train_dice_base": round(dice_before, 4), "train_dice_adapted": round(dice_after, 4)}


# --------------------------------------------------------------------------- localizer training

def train_localizer(samples: List[Sample], training: TrainingSet, config: TuneConfig,
                    rep: _Reporter) -> LocalizerState:
    """Train the localizer head on whole-slice samples (positives and negatives)."""
    full = [s for s in samples if s.kind == "full"]
    in_ch, h, w = full[0].embedding.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 2)
        head = LocalizerHead(in_ch, config.localizer_hidden)
    rng = np.random.default_rng(config.seed + 3)
    emb_all = torch.stack([s.embedding for s in full])
    tgt_all = torch.stack([heatmap_target(s.mask, (h, w)) for s in full])
    opt = torch.optim.AdamW(head.parameters(), lr=config.localizer_lr, weight_decay=1e-4)
    losses = []
    for step in range(config.localizer_steps):
        rep.check(f"localizer step {step} of {config.localizer_steps}")
        picks = torch.as_tensor(rng.integers(0, len(full), size=min(config.batch_size, len(full))))
        loss = localizer_loss(head(emb_all[picks]), tgt_all[picks])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        _check_loss(losses[-1], f"localizer step {len(losses)}", config.localizer_lr)
        if step % 10 == 9 or step == config.localizer_steps - 1:
            rep((step + 1) / config.localizer_steps, f"localizer step {step + 1}/{config.localizer_steps}")
    head.eval()
    ious = []
    for s in full:
        if s.augmented or not training.slices[s.slice_number].positive:
            continue
        ts = training.slices[s.slice_number]
        hit = predict_box(head, s.embedding, s.crop, ts.image_u8.shape, config.localizer_threshold,
                          config.localizer_extent_threshold)
        ious.append(0.0 if hit is None else box_iou(hit[0], ts.box_xy))
    k = max(1, min(10, len(losses) // 4))
    metrics = {"loss_first": round(float(np.mean(losses[:k])), 4) if losses else None,
               "loss_last": round(float(np.mean(losses[-k:])), 4) if losses else None,
               "train_box_iou": round(float(np.mean(ious)), 4) if ious else None}
    tensors = {k2: v.detach().clone().contiguous() for k2, v in head.state_dict().items()}
    return LocalizerState(tensors, in_ch, config.localizer_hidden, training.axis, training.preset,
                          config.localizer_threshold, metrics, config.localizer_extent_threshold)


# --------------------------------------------------------------------------- the entry point

def build_pool(model, training: TrainingSet, config: TuneConfig, rep: Optional[_Reporter] = None
               ) -> Tuple[List[Sample], int]:
    """The encoded sample pool of ``training`` (see :mod:`samples`); returns (samples, encodes)."""
    rep = rep or _Reporter(None, None)
    kinds = ["box"] + (["click"] if config.pool.click_encodes > 0 else []) + (["full"] if config.localizer else [])
    builder = PoolBuilder(model, config.session, config.pool, config.seed, should_stop=rep.should_stop)
    n_box, n_click, n_full = builder.counts(len(training.positives), len(training.negatives))
    total = n_box + (n_click if "click" in kinds else 0) + (n_full if "full" in kinds else 0)
    builder.tick = lambda message: rep(builder.encodes / total, message)
    rep(0.0, f"encoding {total} training crops")
    return builder.build(training.slices, kinds), builder.encodes


def tune(model, training: TrainingSet, organ: str, config: Optional[TuneConfig] = None,
         progress: Progress = None, should_stop: ShouldStop = None, out=None, overwrite: bool = False,
         samples: Optional[List[Sample]] = None):
    """Train an organ adapter (LoRA decoder + localizer) on ``training``; returns an :class:`OrganAdapter`.

    ``model`` is a loaded ``PromptableModel`` (shared with sessions: it is left bitwise unchanged).
    ``progress(fraction, message)`` reports; ``should_stop()`` cancels (:class:`Cancelled`, nothing
    written, no adapter left in the model). With ``out``, the adapter is saved there atomically
    (an existing adapter is replaced only with ``overwrite=True`` and only once training succeeded).
    ``samples`` reuses a pool from :func:`build_pool` of the same data (hyper-parameter sweeps).
    """
    config = config or TuneConfig()
    config.check()
    organ = check_organ(organ)
    if not training.positives:
        raise InputError("the training set holds no slice with the structure")
    if out is not None:
        check_output_dir(out, overwrite)
    rep = _Reporter(progress, should_stop)
    t0 = time.perf_counter()
    rep.stage(0.0, 0.55)
    pool, encodes = (samples, 0) if samples is not None else build_pool(model, training, config, rep)
    t_pool = time.perf_counter() - t0
    seg = [s for s in pool if s.kind in ("box", "click") and int(s.mask.sum()) >= 4]
    name = f"medfm_train_{os.getpid()}_{next(_run_ids)}"
    with A.model_lock(model):  # other threads' adapters wait; train in a subprocess to keep a UI free
        A.inject(model, name, config.lora, seed=config.seed)
        try:
            rep.stage(0.55, 0.9 if config.localizer else 0.98)
            seg_metrics = train_decoder(model, name, seg, config, rep)
            tensors = A.state(model, name)
        finally:
            A.remove(model, name)
    t_dec = time.perf_counter() - t0 - t_pool
    localizer = None
    if config.localizer and not any(s.kind == "full" for s in pool):
        log.warning("no whole-slice samples in the pool: the adapter gets no localizer")
    elif config.localizer:
        rep.stage(0.9, 0.98)
        localizer = train_localizer(pool, training, config, rep)
    rep.check("before saving")
    seconds = time.perf_counter() - t0
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "organ": organ,
        "base_model": {"id": model.spec.id, "sha256": model.checkpoint_sha256, "precision": model.precision},
        "method": "lora", "lora": config.lora.to_dict(), "config": config.to_dict(),
        "localizer": localizer.config() if localizer else None,
        "training_data": training.summary(),
        "metrics": {"decoder": seg_metrics, "localizer": localizer.metrics if localizer else None,
                    "encodes": encodes, "samples": len(pool),
                    "seconds": {"encode": round(t_pool, 1), "decoder": round(t_dec, 1), "total": round(seconds, 1)},
                    "torch_threads": torch.get_num_threads()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    adapter = A.OrganAdapter(organ, model.spec.id, model.checkpoint_sha256, config.lora, tensors, localizer, manifest)
    log.info("tuned %s in %.0f s: train Dice %.3f -> %.3f", organ, seconds, seg_metrics["train_dice_base"],
             seg_metrics["train_dice_adapted"])
    if out is not None:
        rep.stage(0.98, 1.0)
        adapter.path = save_adapter(adapter, out, overwrite=overwrite)
    rep.stage(0.0, 1.0)
    rep(1.0, f"adapter {organ} trained in {seconds:.0f} s")
    return adapter
