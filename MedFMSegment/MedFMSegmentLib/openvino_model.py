"""A loaded model's encoder and mask decoder put on OpenVINO: exported from the model's own torch network at
first use into the per-user cache (runtimes.cached_export), checked against torch on a probe image right
after export, and used only when the check passes; torch otherwise, with one log line.

The decoder's cache entry also holds the prompt encoder's 6 weights (``prompt_encoding.WEIGHTS_FILE``), so a
model whose encoder and decoder are both cached needs neither the torch network nor torch itself.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import decoder_graph, runtimes
from .errors import ModelError
from .model_registry import EMBED_DIM, embedding_grid
from .prompt_encoding import WEIGHTS_FILE, SparsePromptEncoder
from .tensors import as_float32

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


def _encoder_input(encoder: "nn.Module") -> "nn.Module":
    """The image encoder as exported: (1, 3, S, S) normalised input -> embedding."""
    from torch import nn

    class _EncoderInput(nn.Module):
        def __init__(self, encoder: nn.Module):
            super().__init__()
            self.encoder = encoder

        def forward(self, x):
            return self.encoder(x)

    return _EncoderInput(encoder)


def encoder_stem_and_rest(encoder: "nn.Module", grid: int):
    """(stem, rest) torch modules whose composition is ``encoder`` (bitwise; ``grid``: the embedding's side), for
    a TinyViT encoder (LiteMedSAM): the stem (patch embedding + the first, convolutional stage at the highest
    resolution) is where bf16 costs the most agreement and the least time; None for other encoders.

    Measured on 15 real MR / CT crops (Intel Xeon with AMX, 2 threads; masks against torch fp32): all bf16
    0.187 s, Dice mean 0.972 (min 0.914); stem fp32 + rest bf16 0.229 s, mean 0.987 (min 0.955); all fp32 0.403 s.
    """
    from torch import nn

    layers = getattr(encoder, "layers", None)
    if not all(hasattr(encoder, a) for a in ("patch_embed", "layers", "neck")) or len(layers) < 2:
        return None

    class Stem(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed, self.first = encoder.patch_embed, layers[0]

        def forward(self, x):
            return self.first(self.patch_embed(x))

    class Rest(nn.Module):  # TinyViT.forward_features after its first stage
        def __init__(self):
            super().__init__()
            self.layers, self.neck = nn.ModuleList(list(layers)[1:]), encoder.neck

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            b, _, c = x.size()
            return self.neck(x.view(b, grid, grid, c).permute(0, 3, 1, 2))

    return Stem().eval(), Rest().eval()


def _probe_masks(model, embedding, decoder=None) -> list:
    """Masks (logits > 0) of the probe boxes decoded from ``embedding`` (torch decoder unless given)."""
    out = []
    for box in runtimes.probe_boxes(model.input_size):
        if decoder is None:
            logits, _ = model.decode(embedding, box_xy_model=box, fast=False)
        else:
            logits, _ = decoder(embedding, box)
        out.append(as_float32(logits))
    return out


def use_openvino(model, precision: str, threads: int, cache_dir, info: dict) -> None:
    """Put the encoder (and the decoder) on OpenVINO, exported and checked; torch where that fails."""

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

    def __init__(self, model):
        self.model = model
        self.input = model.model_input(runtimes.probe_image(model.input_size))  # (1, 3, S, S) float32
        self._reference = self._logits = None

    @property
    def input_tensor(self) -> "torch.Tensor":
        import torch

        return torch.from_numpy(self.input)

    @property
    def reference(self) -> "torch.Tensor":
        if self._reference is None:
            self._reference = self.model.torch_encode(self.input)
        return self._reference

    @property
    def logits(self) -> list:
        if self._logits is None:
            self._logits = _probe_masks(self.model, self.reference)
        return self._logits


def _openvino_encoder(model, prec, threads, root, identity, probe: _Probe):
    compiled = {}
    shape = tuple(probe.input.shape)  # (1, 3, S, S): the only input the session gives it

    def timed(ov_model):
        t = time.perf_counter()
        out = ov_model(probe.input)[0]
        return out, time.perf_counter() - t

    def compile_split(folder: Path, precision: str):
        stem = runtimes.OpenVINOModel(folder / "stem.xml", "fp32", threads, shape)
        stem_shape = [int(d) for d in stem.output_shape()]  # the rest compiled for its one input shape too
        rest = runtimes.OpenVINOModel(folder / "model.xml", precision, threads, stem_shape)
        return runtimes.ChainedModel([stem, rest])

    def export(folder: Path) -> dict:
        import torch

        t0 = time.perf_counter()
        parts = encoder_stem_and_rest(model.net.image_encoder, embedding_grid(model.input_size)) if split else None
        if parts is None:
            xml = runtimes.export_openvino(_encoder_input(model.net.image_encoder), (probe.input_tensor,), folder)
            ov_model = runtimes.OpenVINOModel(xml, prec, threads, shape)
        else:  # the stem (fp32) and the rest (bf16), two graphs
            stem, rest = parts
            with torch.inference_mode():
                stem_out = stem(probe.input_tensor)
            runtimes.export_openvino(stem, (probe.input_tensor,), folder, name="stem")
            runtimes.export_openvino(rest, (stem_out,), folder)
            ov_model = compile_split(folder, prec)
        convert_s = time.perf_counter() - t0
        timed(ov_model)  # first call: allocations
        out, seconds = timed(ov_model)
        emb = torch.from_numpy(out)
        check = {"max_abs_diff": float((emb - probe.reference).abs().max()),
                 "agreement_dice": runtimes.mask_agreement(probe.logits, _probe_masks(model, emb)),
                 "seconds": round(seconds, 4), "threads": threads}
        if prec == "bf16":
            fp32 = (runtimes.OpenVINOModel(xml, "fp32", threads, shape) if parts is None
                    else compile_split(folder, "fp32"))
            timed(fp32)
            check["fp32_seconds"] = round(timed(fp32)[1], 4)
        compiled["model"] = ov_model
        return {"check": check, "convert_seconds": round(convert_s, 2)}

    # bf16 keeps the stem in fp32 where the encoder can be split (encoder_stem_and_rest): a graph of its own
    split = prec == "bf16" and _splittable(model)
    graph = {"graph": "stem-fp32"} if split else {}
    entry, manifest, seconds = runtimes.cached_export(root, "encoder", {**identity, "precision": prec, **graph}, export)
    if not runtimes.check_passed(manifest.get("check", {}), prec):  # refused (bf16 here): not compiled for nothing
        return None, entry, manifest, seconds
    ov_model = compiled.get("model")
    if ov_model is None:
        ov_model = (compile_split(entry, prec) if (entry / "stem.xml").is_file()
                    else runtimes.OpenVINOModel(entry / "model.xml", prec, threads, shape))
    return ov_model, entry, manifest, seconds


def _splittable(model) -> bool:
    """A TinyViT encoder (LiteMedSAM), known from the model's spec without building its torch network."""
    return model.spec.encoder == "tinyvit"


def _decoder_callable(ov_model, grid: int):
    """``(embedding, sparse tokens, picked mask indices) -> (masks, IoUs)`` on a compiled folded decoder."""
    from .decoder_graph import unblock_masks

    def run(emb, sp, pick):  # the picked masks, put in image order straight from OpenVINO's output buffer
        return ov_model.run((emb, sp), lambda out: (unblock_masks(out[0], pick, (grid, grid)),
                                                    np.array(out[1][0, pick], dtype=np.float32)))
    run.threads = ov_model.threads
    return run


def compile_decoder_like(model, mask_decoder: "nn.Module"):
    """The fast decoder ``model`` has (OpenVINO fp32, the folded graph), rebuilt from another mask decoder of the
    same architecture, e.g. a copy with an adapter's LoRA weights merged in: a callable for
    ``SamModel.decode`` (the adapter's ``fast_decoder``), or None when ``model`` decodes on torch.

    Built in memory (a temporary folder for the IR, removed after compiling): measured 1.8 s on one thread
    (trace + convert 1.6 s, compile 0.2 s), then each decode as fast as the base model's export (29 ms vs
    168 ms on the torch decoder, LiteMedSAM, Intel Xeon, 1 thread)."""
    import tempfile

    import torch

    base = model._fast_decoder
    if base is None or model._prompt_encoder is None:
        return None
    grid = embedding_grid(model.input_size)
    with tempfile.TemporaryDirectory(prefix="medfm-decoder-") as folder:
        xml = _export_folded(model, mask_decoder, torch.zeros(1, EMBED_DIM, grid, grid), Path(folder))
        ov_model = runtimes.OpenVINOModel(xml, "fp32", getattr(base, "threads", 1))
    return _decoder_callable(ov_model, grid)


def _export_folded(model, mask_decoder: "nn.Module", example_embedding, folder: Path) -> Path:
    """``mask_decoder`` as the folded graph (``decoder_export.FoldedDecoder``: the same function, fewer operations,
    masks in blocked order) with the model's prompt-independent terms built in, exported to OpenVINO IR."""
    import torch

    from .decoder_export import FoldedDecoder

    pe = model.net.prompt_encoder
    emb_shape = [int(n) for n in example_embedding.shape]
    with torch.inference_mode():
        dense_pe = pe.get_dense_pe()
        sparse, dense = pe(points=None, boxes=torch.tensor([runtimes.probe_boxes(model.input_size)[0]]), masks=None)
    if [1, int(dense_pe.shape[1]), *map(int, dense_pe.shape[-2:])] != emb_shape:
        raise RuntimeError(f"{model.spec.id}: embedding {tuple(dense_pe.shape)}, expected {emb_shape}")
    folded = FoldedDecoder(mask_decoder, dense_pe, dense, blocked=True).eval()
    return runtimes.export_openvino(folded, (example_embedding, sparse), folder,
                                    input_shapes=[emb_shape, [1, -1, sparse.shape[-1]]])


def _attach_openvino_decoder(model, threads, root, identity, probe: _Probe, info) -> None:
    grid = embedding_grid(model.input_size)
    emb_shape = [1, EMBED_DIM, grid, grid]  # the embedding grid (known without building the torch net)
    compiled = {}

    def as_decode(decoder, pe):
        import torch

        def run(emb, box):
            with torch.inference_mode():
                sp, _ = pe(points=None, boxes=torch.tensor([box], dtype=torch.float32), masks=None)
            masks, iou = decoder(emb.numpy(), sp.numpy(), [0])
            return masks, iou
        return run

    def export(folder: Path) -> dict:
        pe = model.net.prompt_encoder
        reference, ref_masks = probe.reference, probe.logits
        if [int(n) for n in reference.shape] != emb_shape:
            raise RuntimeError(f"{model.spec.id}: embedding {tuple(reference.shape)}, expected {emb_shape}")
        xml = _export_folded(model, model.net.mask_decoder, reference, folder)
        ov_model = runtimes.OpenVINOModel(xml, "fp32", threads)
        decoder = _decoder_callable(ov_model, grid)
        masks = _probe_masks(model, reference, as_decode(decoder, pe))
        diff = max(float(np.abs(a - b).max()) for a, b in zip(masks, ref_masks))
        compiled["model"] = ov_model
        # the 6 prompt-encoder weights beside the graph: a session from this entry needs no torch
        SparsePromptEncoder.from_state_dict(model.net.state_dict(), model.input_size).save(folder / WEIGHTS_FILE)
        return {"check": {"max_abs_diff": diff, "agreement_dice": runtimes.mask_agreement(ref_masks, masks)}}

    entry, manifest, seconds = runtimes.cached_export(root, "decoder", {**identity, "precision": "fp32",
                                                                       "embedding": emb_shape,
                                                                       "graph": decoder_graph.GRAPH,
                                                                       "prompt_weights": WEIGHTS_FILE}, export)
    check = manifest.get("check", {})
    info.setdefault("exports", {})["decoder"] = {"cache": str(entry), "export_seconds": round(seconds, 2),
                                                 "cached": seconds == 0.0, "check": check}
    # logits, not embeddings: a looser absolute bound (logits are ~10x larger), the same mask agreement
    if check.get("agreement_dice", 0.0) < runtimes.MIN_AGREEMENT["fp32"] or check.get("max_abs_diff", 1.0) > 1e-2:
        log.warning("OpenVINO mask decoder failed its check against torch (%s); it runs on torch", check)
        return
    try:  # checked with the entry's other files (sha256 in its manifest)
        model._prompt_encoder = SparsePromptEncoder.load(entry / WEIGHTS_FILE, model.input_size)
    except (OSError, KeyError, ValueError) as exc:
        log.warning("prompt encoder weights of the decoder export unreadable (%s: %s); it runs on torch",
                    type(exc).__name__, exc)
        return
    ov_model = compiled.get("model") or runtimes.OpenVINOModel(entry / "model.xml", "fp32", threads)
    model._fast_decoder = _decoder_callable(ov_model, grid)
    model.mark_decoder_exported()
    info["decoder"] = "openvino"
