"""Decoder-head training on frozen trunk features: online adaptation in seconds on a CPU.

One training step of the whole mask decoder (``tune.train_decoder``) runs the two-way transformer
over the 64 x 64 = 4,096 image tokens forward and backward for every sample of the batch: about
1.2 s of CPU per sample on a 2-core AVX2 host, so 30 steps of 4 samples take minutes (measured
140 s CPU for 5 corrected slices). Most of that work cannot change during training when only the
LoRA layers *after* the image path are trained: the image tokens leave the transformer's last
block before the final token-to-image attention, and the mask upscaling reads only them. So:

1. ``trunk``: for each (embedding, box) of the pool, once and without autograd, the transformer up
   to its final attention (with the adapter's current weights), the final attention's keys and
   values, and the upscaled mask features;
2. ``head``: per step, only the final attention's query / output projections, its LayerNorm, the
   mask hypernetwork MLP and the IoU head run, forward and backward (milliseconds per sample).

The trained LoRA layers are those of :data:`HEAD_MODULES` the adapter has; every other LoRA layer
keeps the base adapter's weights (it is part of the frozen trunk). ``head_logits(trunk(...))`` is
``adapters.decode_batch`` up to float rounding (tested).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import adapters as A

# the decoder modules downstream of the image tokens (their LoRA layers are trained here)
HEAD_MODULES = r"(transformer\.final_attn_token_to_image\.(q_proj|out_proj)|output_hypernetworks_mlps\.0\.layers\.\d+" \
               r"|iou_prediction_head\.layers\.\d+)"


@dataclass
class Trunk:
    """Frozen decoder features of a batch of (embedding, box) pairs (see module docstring)."""

    queries: torch.Tensor  # (B, T, C) tokens after the last transformer block
    query_pe: torch.Tensor  # (B, T, C) the prompt tokens (the final attention's query positional term)
    k: torch.Tensor  # (B, heads, N, c) final attention keys (projected)
    v: torch.Tensor  # (B, heads, N, c) final attention values (projected)
    upscaled: torch.Tensor  # (B, C', H, W) upscaled mask features (8 MB per row for LiteMedSAM)

    def __len__(self) -> int:
        return self.queries.shape[0]

    def pick(self, rows) -> "Trunk":
        rows = torch.as_tensor(rows, dtype=torch.long)
        return Trunk(self.queries[rows], self.query_pe[rows], self.k[rows], self.v[rows], self.upscaled[rows])

    @staticmethod
    def cat(parts: List["Trunk"]) -> "Trunk":
        names = ("queries", "query_pe", "k", "v", "upscaled")
        return Trunk(*(torch.cat([getattr(p, f) for p in parts]) for f in names))


def head_parameters(model, name: str) -> List[torch.nn.Parameter]:
    """The LoRA weights of adapter ``name`` in :data:`HEAD_MODULES` (empty if it has none there)."""
    out = []
    for n, layer in A._lora_layers(model).items():
        if name in layer.lora_A and re.fullmatch(HEAD_MODULES, n):
            out += [layer.lora_A[name].weight, layer.lora_B[name].weight]
    return out


@torch.no_grad()
def trunk(model, embeddings: torch.Tensor, boxes_xy_model: torch.Tensor) -> Trunk:
    """The frozen part of the decoder for a batch (one box per embedding), with the enabled adapter."""
    pe, md = model.net.prompt_encoder, model.net.mask_decoder
    tr = md.transformer
    sparse, dense = pe(points=None, boxes=boxes_xy_model, masks=None)
    output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
    src = embeddings + dense
    b, c, h, w = src.shape
    keys = src.flatten(2).permute(0, 2, 1)
    key_pe = pe.get_dense_pe().flatten(2).permute(0, 2, 1).expand(b, -1, -1)
    queries = tokens
    for layer in tr.layers:
        queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)
    fa = tr.final_attn_token_to_image
    k = fa._separate_heads(fa.k_proj(keys + key_pe), fa.num_heads)
    v = fa._separate_heads(fa.v_proj(keys), fa.num_heads)
    upscaled = md.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
    return Trunk(queries.clone(), tokens.clone(), k.contiguous(), v.contiguous(), upscaled.contiguous())


def head_logits(model, t: Trunk) -> Tuple[torch.Tensor, torch.Tensor]:
    """(single-mask low-resolution logits (B, 1, H, W), predicted IoU (B,)) from trunk features, with autograd."""
    md = model.net.mask_decoder
    tr = md.transformer
    fa = tr.final_attn_token_to_image
    q = fa._separate_heads(fa.q_proj(t.queries + t.query_pe), fa.num_heads)
    attn = torch.softmax((q / math.sqrt(q.shape[-1])) @ t.k.transpose(-1, -2), dim=-1)
    queries = tr.norm_final_attn(t.queries + fa.out_proj(fa._recombine_heads(attn @ t.v)))
    hyper = md.output_hypernetworks_mlps[0](queries[:, 1, :])
    up = t.upscaled
    b, c, h, w = up.shape
    logits = (hyper.unsqueeze(1) @ up.view(b, c, h * w)).view(b, 1, h, w)
    iou = md.iou_prediction_head(queries[:, 0, :])[:, 0]
    return logits, iou


def _hard_dice(logits: torch.Tensor, target: torch.Tensor) -> float:
    hard, t = (logits > 0).float(), (target > 0.5).float()
    inter = (hard * t).flatten(1).sum(1)
    s = hard.flatten(1).sum(1) + t.flatten(1).sum(1)
    return float(torch.where(s > 0, 2 * inter / s.clamp(min=1), torch.ones_like(s)).mean())


def train_head(model, name: str, embeddings: torch.Tensor, boxes: torch.Tensor, targets: torch.Tensor,
               plain: List[int], steps: int, lr: float, batch_size: int, seed: int, check=None,
               chunk: int = 5) -> Dict:
    """Train adapter ``name``'s head LoRA layers on a pool of (embedding, box, target) rows.

    ``embeddings`` (P, C, h, w), ``boxes`` (P, 4) model pixels, ``targets`` (P, 1, H, W) on the
    decoder's low-resolution grid; ``plain``: the rows whose Dice is reported before / after.
    ``check(where)`` is called between steps (it raises to stop). Returns loss / Dice metrics.
    """
    params = head_parameters(model, name)
    # every lora_B zero (a fresh adapter): the LoRA layers add exactly nothing, the trunk runs without them
    fresh = all(float(p.abs().max()) == 0 for p in A.lora_parameters(model, name)[1::2])
    A._set_enabled(model, None if fresh else name)
    try:
        feats = Trunk.cat([trunk(model, embeddings[i:i + chunk], boxes[i:i + chunk])
                           for i in range(0, len(boxes), chunk)])
        A._set_enabled(model, name)
        for p in A.lora_parameters(model, name):
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        with torch.no_grad():
            dice_before = _hard_dice(head_logits(model, feats.pick(plain))[0], targets[plain])
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        warm = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
        rng = np.random.default_rng(seed + 1)
        losses = []
        for step in range(steps):
            if check is not None:
                check(f"decoder head step {step} of {steps}")
            rows = rng.integers(0, len(feats), size=batch_size)
            logits, iou = head_logits(model, feats.pick(rows))
            loss, _ = A.segmentation_loss(logits, targets[torch.as_tensor(rows)], iou)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.item()))
            if not np.isfinite(losses[-1]):
                from MedFMSegmentLib.errors import InputError

                raise InputError(f"online adaptation diverged at step {step + 1}: the loss is {losses[-1]} "
                                 f"(the learning rate {lr:.3g} is probably too high)")
        with torch.no_grad():
            dice_after = _hard_dice(head_logits(model, feats.pick(plain))[0], targets[plain])
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        A._set_enabled(model, None)
    k = max(1, min(10, len(losses) // 4))
    return {"loss_first": round(float(np.mean(losses[:k])), 4), "loss_last": round(float(np.mean(losses[-k:])), 4),
            "train_dice_base": round(dice_before, 4), "train_dice_adapted": round(dice_after, 4),
            "pool": len(feats), "trained_tensors": len(params)}


def low_res_targets(masks: np.ndarray, hw: Tuple[int, int]) -> torch.Tensor:
    """(P, S, S) uint8 model-grid masks -> (P, 1, h, w) float targets on the decoder's output grid."""
    t = torch.as_tensor(np.asarray(masks), dtype=torch.float32)[:, None]
    return t if tuple(t.shape[-2:]) == tuple(hw) else F.adaptive_avg_pool2d(t, hw)


def output_hw(model, embedding: torch.Tensor) -> Tuple[int, int]:
    """The decoder's low-resolution output grid for an embedding (one no-grad decode)."""
    with torch.no_grad():
        logits, _ = A.decode_batch(model, embedding[None], torch.tensor([[0.0, 0.0, 8.0, 8.0]]))
    return tuple(logits.shape[-2:])


def pool_boxes(masks: List[np.ndarray], crops, rng: np.random.Generator, jittered: int,
               margin_px: Tuple[float, float], plain_margin_px: float = 5.0) -> Tuple[np.ndarray, List[int], List[int]]:
    """Per sample one plain box (mask box + ``plain_margin_px``) and ``jittered`` boxes with per-side margins
    drawn from ``margin_px`` (model pixels scaled by the crop's zoom, as ``tune.simulate_box``).
    Returns (boxes (P, 4), sample index of each row, the plain rows)."""
    out, owner, plain = [], [], []
    for i, (mask, crop) in enumerate(zip(masks, crops)):
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())
        scale = np.array([crop.sx, crop.sy, crop.sx, crop.sy])
        size = crop.size
        margins = [np.full(4, plain_margin_px)] + [rng.uniform(*margin_px, size=4) for _ in range(jittered)]
        for n, m in enumerate(margins):
            m = m * scale
            if n == 0:
                plain.append(len(out))
            out.append(np.clip([x0 - m[0], y0 - m[1], x1 + m[2], y1 + m[3]], 0, size - 1))
            owner.append(i)
    return np.asarray(out, np.float32), owner, plain
