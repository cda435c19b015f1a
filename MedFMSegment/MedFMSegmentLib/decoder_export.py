"""SAM's mask decoder, rearranged for a fast CPU export: the same function, far fewer operations.

``FoldedDecoder(mask_decoder, image_pe, no_mask_dense)`` computes what
``mask_decoder.predict_masks(embedding, image_pe, sparse, no_mask_dense)`` computes, for prompts without
a mask input, from two inputs only (the embedding and the sparse prompt tokens). Measured in
Testing/benchmarks/bench_latency.py (prompt-to-mask) and checked against torch in test_runtimes.py.

Why it is faster. The decoder's cost is the 4,096 image tokens (a 64 x 64 embedding): every cross
attention projects all of them (256 -> 128 channels) to keys, values or queries, and projects its
output back (128 -> 256), while the prompt side has only N = 5 + prompt tokens (7 for a box). Each
projection of the image tokens is folded into the N tokens instead (associativity of matrix
products, exact in real arithmetic):

- tokens -> image: ``softmax(Q_h (X W_k,h + b_k,h)^T)`` = ``softmax((Q_h W_k,h) X^T)`` (the bias term is
  constant along the softmax's axis), and ``P_h (X W_v,h^T + b_v,h)`` = ``(P_h X) W_v,h^T + b_v,h``
  (softmax rows sum to one): 8 heads x N x 256 x 4,096 products instead of 2 x 4,096 x 256 x 128;
- image -> tokens: ``(X W_q,h^T + b_q,h) K_h^T`` = ``X (W_q,h^T K_h^T) + b_q,h K_h^T``, and the output
  projection is applied to the N values before the attention (``sum_h P_h (V_h W_o,h^T)``).

The image tokens stay channel-first (``(256, 4096)``, the embedding's own layout) throughout, so no
4,096-token transposes; the prompt-independent terms (the positional encoding, the no-mask dense
embedding) are constants of the graph, not inputs to copy per call.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C / heads)."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, c) -> (B, N, heads * c)."""
    b, h, n, c = x.shape
    return x.transpose(1, 2).reshape(b, n, h * c)


def _attention(attn, q, k, v):
    """SAM's Attention on token-sized inputs (unchanged)."""
    return attn(q=q, k=k, v=v)


def _tokens_to_image(attn, q_tokens, k_img, v_img):
    """SAM's Attention(q=tokens, k=image + pe, v=image), the image token-major (B, HW, C)."""
    h = attn.num_heads
    wk = attn.k_proj.weight.reshape(h, -1, attn.k_proj.weight.shape[-1])  # (h, c, C)
    wv = attn.v_proj.weight.reshape(h, -1, attn.v_proj.weight.shape[-1])
    q = _heads(attn.q_proj(q_tokens), h)  # (B, h, N, c)
    a = (q @ wk) / math.sqrt(q.shape[-1])  # (B, h, N, C): the key projection folded into the queries
    b, _, n, c_full = a.shape
    scores = a.reshape(b, h * n, c_full) @ k_img.transpose(1, 2)  # (B, hN, HW)
    p = torch.softmax(scores, dim=-1)
    pv = (p @ v_img).reshape(b, h, n, c_full)  # (B, h, N, C): the attention-weighted image
    out = pv @ wv.transpose(1, 2) + attn.v_proj.bias.reshape(h, 1, -1)  # (B, h, N, c)
    return attn.out_proj(_merge(out))


def _image_to_tokens(attn, q_img, k_tokens, v_tokens):
    """SAM's Attention(q=image + pe, k=tokens, v=tokens): the image-side output, token-major (B, HW, C)."""
    h = attn.num_heads
    k = _heads(attn.k_proj(k_tokens), h)  # (B, h, N, c)
    v = _heads(attn.v_proj(v_tokens), h)
    c = k.shape[-1]
    wq = attn.q_proj.weight.reshape(h, c, -1)  # (h, c, C)
    scale = 1.0 / math.sqrt(c)
    bt = (k @ wq) * scale  # (B, h, N, C): the query projection folded into the keys
    bias = (k @ attn.q_proj.bias.reshape(h, c, 1)) * scale  # (B, h, N, 1)
    b, _, n, c_full = bt.shape
    scores = q_img @ bt.reshape(b, h * n, c_full).transpose(1, 2)  # (B, HW, hN)
    scores = scores.reshape(b, -1, h, n) + bias.reshape(b, 1, h, n)
    p = torch.softmax(scores, dim=-1).reshape(b, -1, h * n)  # over the tokens, per head
    wo = attn.out_proj.weight.reshape(attn.out_proj.weight.shape[0], h, c).permute(1, 2, 0)  # (h, c, C)
    u = (v @ wo).reshape(b, h * n, c_full)  # (B, hN, C): the output projection applied to the values first
    return p @ u + attn.out_proj.bias


def _upscaled_masks(upscaling: nn.Sequential, keys: torch.Tensor, hyper_in: torch.Tensor, hh: int, ww: int):
    """SAM's ``output_upscaling`` (ConvTranspose 2x2/2, LayerNorm2d, GELU, ConvTranspose 2x2/2, GELU) then the
    product with the mask tokens' hypernetwork outputs, channels-last: a 2x2 stride-2 transposed convolution is
    one matrix product per input pixel (its output pixel's 2x2 children side by side), so the image tokens
    (B, HW, C) go through two matrix products, the layer norm over the last axis and the GELUs without any
    spatial rearrangement; only the (B, M, 4H, 4W) masks are put in image order at the end."""
    up1, norm, act1, up2, act2 = upscaling
    b = keys.shape[0]
    c1, c2 = up1.weight.shape[1], up2.weight.shape[1]
    w1 = up1.weight.permute(0, 2, 3, 1).reshape(up1.weight.shape[0], 4 * c1)  # (C, dy dx c1)
    w2 = up2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
    x = (keys @ w1).reshape(b, -1, 4, c1) + up1.bias  # (B, HW, 4, c1): pixel (2y + dy, 2x + dx)
    x = act1(torch.nn.functional.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
    x = act2((x.reshape(b, -1, c1) @ w2).reshape(b, -1, 4, c2) + up2.bias)  # (B, 4HW, 4, c2)
    m = hyper_in.shape[1]
    masks = (x @ hyper_in.transpose(1, 2).unsqueeze(1))  # (B, 4HW, 4, M)
    masks = masks.reshape(b, hh, ww, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)  # y dy dy2, x dx dx2
    return masks.reshape(b, m, 4 * hh, 4 * ww)


class FoldedDecoder(nn.Module):
    """(embedding (1, C, H, W), sparse prompt tokens (1, N, C)) -> (all masks (1, M, 4H, 4W), IoUs (1, M)),
    equal to SAM's ``MaskDecoder.predict_masks`` with the given ``image_pe`` and no mask input."""

    GRAPH = "folded-2"  # in the export cache's identity: bump when the graph changes

    def __init__(self, mask_decoder: nn.Module, image_pe: torch.Tensor, no_mask_dense: torch.Tensor):
        super().__init__()
        self.md = mask_decoder
        c = image_pe.shape[1]
        self.register_buffer("pe", image_pe.reshape(1, c, -1).transpose(1, 2).contiguous(), persistent=False)
        self.register_buffer("dense", no_mask_dense.reshape(1, c, -1).transpose(1, 2).contiguous(), persistent=False)

    def forward(self, embedding: torch.Tensor, sparse: torch.Tensor):
        md = self.md
        tr = md.transformer
        b, c, hh, ww = embedding.shape
        output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0).unsqueeze(0)
        tokens = torch.cat((output_tokens.expand(sparse.shape[0], -1, -1), sparse), dim=1)
        keys = embedding.reshape(b, c, hh * ww).transpose(1, 2) + self.dense  # (B, HW, C)
        pe = self.pe
        queries, query_pe = tokens, tokens
        for layer in tr.layers:
            if layer.skip_first_layer_pe:
                queries = _attention(layer.self_attn, queries, queries, queries)
            else:
                q = queries + query_pe
                queries = queries + _attention(layer.self_attn, q, q, queries)
            queries = layer.norm1(queries)
            k_img = keys + pe
            queries = layer.norm2(queries + _tokens_to_image(layer.cross_attn_token_to_image, queries + query_pe,
                                                             k_img, keys))
            queries = layer.norm3(queries + layer.mlp(queries))
            keys = layer.norm4(keys + _image_to_tokens(layer.cross_attn_image_to_token, k_img, queries + query_pe,
                                                       queries))
        queries = tr.norm_final_attn(queries + _tokens_to_image(tr.final_attn_token_to_image, queries + query_pe,
                                                                keys + pe, keys))
        iou_token_out = queries[:, 0, :]
        mask_tokens_out = queries[:, 1:(1 + md.num_mask_tokens), :]
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(md.output_hypernetworks_mlps)],
                               dim=1)  # (B, M, c)
        masks = _upscaled_masks(md.output_upscaling, keys, hyper_in, hh, ww)
        return masks, md.iou_prediction_head(iou_token_out)
