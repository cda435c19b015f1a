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
4,096-token transposes (graph "folded-2" transposed the embedding first: ~8 % of its time, its largest
node after the products); the upscaling's masks leave the graph in their blocked pixel order
(:func:`unblock_masks` puts the one a caller wants in image order, in numpy); the final token-to-image
attention runs only for the 5 tokens read after it; the prompt-independent terms (the positional
encoding, the no-mask dense embedding) are constants of the graph, not inputs to copy per call.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .decoder_graph import GRAPH, unblock_masks  # noqa: F401  (public here)


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
    """SAM's Attention(q=tokens, k=image + pe, v=image), the image channel-first (B, C, HW)."""
    h = attn.num_heads
    wk = attn.k_proj.weight.reshape(h, -1, attn.k_proj.weight.shape[-1])  # (h, c, C)
    wv = attn.v_proj.weight.reshape(h, -1, attn.v_proj.weight.shape[-1])
    q = _heads(attn.q_proj(q_tokens), h)  # (B, h, N, c)
    a = (q @ wk) / math.sqrt(q.shape[-1])  # (B, h, N, C): the key projection folded into the queries
    b, _, n, c_full = a.shape
    p = torch.softmax(a.reshape(b, h * n, c_full) @ k_img, dim=-1)  # (B, hN, HW)
    pv = (p @ v_img.transpose(1, 2)).reshape(b, h, n, c_full)  # (B, h, N, C): the attention-weighted image
    out = pv @ wv.transpose(1, 2) + attn.v_proj.bias.reshape(h, 1, -1)  # (B, h, N, c)
    return attn.out_proj(_merge(out))


def _image_to_tokens(attn, q_img, k_tokens, v_tokens):
    """SAM's Attention(q=image + pe, k=tokens, v=tokens): the image-side output, channel-first (B, C, HW)."""
    h = attn.num_heads
    k = _heads(attn.k_proj(k_tokens), h)  # (B, h, N, c)
    v = _heads(attn.v_proj(v_tokens), h)
    c = k.shape[-1]
    wq = attn.q_proj.weight.reshape(h, c, -1)  # (h, c, C)
    scale = 1.0 / math.sqrt(c)
    bt = (k @ wq) * scale  # (B, h, N, C): the query projection folded into the keys
    bias = (k @ attn.q_proj.bias.reshape(h, c, 1)) * scale  # (B, h, N, 1)
    b, _, n, c_full = bt.shape
    scores = (bt.reshape(b, h * n, c_full) @ q_img).reshape(b, h, n, -1) + bias  # (B, h, N, HW)
    p = torch.softmax(scores, dim=2).reshape(b, h * n, -1)  # over the tokens, per head and image token
    wo = attn.out_proj.weight.reshape(attn.out_proj.weight.shape[0], h, c).permute(1, 2, 0)  # (h, c, C)
    u = (v @ wo).reshape(b, h * n, c_full)  # (B, hN, C): the output projection applied to the values first
    return u.transpose(1, 2) @ p + attn.out_proj.bias.reshape(-1, 1)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, dim: int) -> torch.Tensor:
    """LayerNorm over axis ``dim`` (``weight`` / ``bias`` shaped to broadcast along it), as SAM's LayerNorm2d."""
    d = x - x.mean(dim, keepdim=True)
    return d / torch.sqrt((d * d).mean(dim, keepdim=True) + eps) * weight + bias


def _upscaled_masks(upscaling: nn.Sequential, keys: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
    """SAM's ``output_upscaling`` (ConvTranspose 2x2/2, LayerNorm2d, GELU, ConvTranspose 2x2/2, GELU) then the
    product with the mask tokens' hypernetwork outputs, channel-first: a 2x2 stride-2 transposed convolution is
    one matrix product per input pixel (its output pixel's 2x2 children stacked as channel blocks), so the image
    tokens (B, C, HW) go through two matrix products, the layer norm and the GELUs with no rearrangement. The
    masks stay in that blocked order, (B, 2x2, 2x2, M, HW) (see :func:`unblock_masks`): the one or three masks a
    caller wants are put in image order in numpy, not all four in the graph."""
    up1, norm, act1, up2, act2 = upscaling
    b, c, hw = keys.shape
    c1, c2 = up1.weight.shape[1], up2.weight.shape[1]
    w1 = up1.weight.permute(2, 3, 1, 0).reshape(4 * c1, c)  # rows (dy, dx, c1)
    w2 = up2.weight.permute(2, 3, 1, 0).reshape(4 * c2, c1)  # rows (dy2, dx2, c2)
    x = (w1 @ keys).reshape(b, 4, c1, hw) + up1.bias.reshape(c1, 1)  # pixel (2y + dy, 2x + dx)
    x = act1(_layer_norm(x, norm.weight.reshape(c1, 1), norm.bias.reshape(c1, 1), norm.eps, 2))
    x = act2((w2 @ x).reshape(b, 4, 4, c2, hw) + up2.bias.reshape(c2, 1))  # (B, dy dx, dy2 dx2, c2, HW)
    return hyper_in.reshape(b, 1, 1, hyper_in.shape[1], c2) @ x  # (B, 4, 4, M, HW)


class FoldedDecoder(nn.Module):
    """(embedding (1, C, H, W), sparse prompt tokens (1, N, C)) -> (all masks (1, M, 4H, 4W), IoUs (1, M)),
    equal to SAM's ``MaskDecoder.predict_masks`` with the given ``image_pe`` and no mask input.

    ``blocked=True`` (what is exported): the masks in the upscaling's blocked order (1, 4, 4, M, H*W), put in
    image order by :func:`unblock_masks`."""

    GRAPH = GRAPH  # in the export cache's identity (decoder_graph.GRAPH): bump when the graph changes

    def __init__(self, mask_decoder: nn.Module, image_pe: torch.Tensor, no_mask_dense: torch.Tensor,
                 blocked: bool = False):
        super().__init__()
        self.md = mask_decoder
        self.blocked = bool(blocked)
        c = image_pe.shape[1]
        self.register_buffer("pe", image_pe.reshape(1, c, -1).contiguous(), persistent=False)
        self.register_buffer("dense", no_mask_dense.reshape(1, c, -1).contiguous(), persistent=False)

    def forward(self, embedding: torch.Tensor, sparse: torch.Tensor):
        md = self.md
        tr = md.transformer
        b, c, hh, ww = embedding.shape
        output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0).unsqueeze(0)
        tokens = torch.cat((output_tokens.expand(sparse.shape[0], -1, -1), sparse), dim=1)
        keys = embedding.reshape(b, c, hh * ww) + self.dense  # (B, C, HW): channel-first, the embedding's layout
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
            n4 = layer.norm4
            keys = _layer_norm(keys + _image_to_tokens(layer.cross_attn_image_to_token, k_img, queries + query_pe,
                                                       queries), n4.weight.reshape(-1, 1), n4.bias.reshape(-1, 1),
                               n4.eps, 1)
        # the final attention only for the tokens read after it (IoU + mask tokens; each query row is independent)
        n_out = 1 + md.num_mask_tokens
        out = queries[:, :n_out]
        out = tr.norm_final_attn(out + _tokens_to_image(tr.final_attn_token_to_image, out + query_pe[:, :n_out],
                                                        keys + pe, keys))
        iou_token_out = out[:, 0, :]
        mask_tokens_out = out[:, 1:n_out, :]
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(md.output_hypernetworks_mlps)],
                               dim=1)  # (B, M, c)
        masks = _upscaled_masks(md.output_upscaling, keys, hyper_in)
        if not self.blocked:
            m = masks.shape[3]
            masks = masks.reshape(b, 2, 2, 2, 2, m, hh, ww).permute(0, 5, 6, 1, 3, 7, 2, 4)  # b m y dy dy2 x dx dx2
            masks = masks.reshape(b, m, 4 * hh, 4 * ww)
        return masks, md.iou_prediction_head(iou_token_out)

