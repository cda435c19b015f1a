"""``medfm tune``: train a few-shot organ adapter from a volume and its corrected labels.

    medfm tune --image VOL --labels LABELMAP --label-value N --organ NAME --axis axial \\
               --train-slices 40,45,50 --out ADAPTER_DIR [--steps --rank --lr --seed --device --model]

Several corrected volumes (1 to 5): repeat ``--image`` / ``--labels`` in pairs and leave out
``--train-slices`` (slices are then spread over each volume's structure). ``--val-slices`` scores
held-out slices (Dice of the base and the adapted model through the prompt session) into the
manifest. The labels must be on the image grid: a labelmap with the same geometry, or a
``.seg.nrrd`` (``--segment NAME``) whose grid differs from the image only by an integer shift.

Progress goes to stderr as text (``--progress text``, default) or as JSON lines on stdout
(``--progress json``: ``{"progress": 0.42, "message": "..."}``), the final result as one JSON object
on stdout. The MedFMSegmentLib CLI imports :func:`add_tune_parser` lazily; ``python -m
MedFMTrainLib.tune_cli`` runs the same command in its own process (Slicer launches it that way so
that cancelling is killing the process: SIGTERM stops at the next step, nothing is written).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from types import SimpleNamespace
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from MedFMSegmentLib.errors import InputError

log = logging.getLogger(__name__)

AXES = ("axial", "coronal", "sagittal")


def _int_list(text: Optional[str], option: str) -> Optional[List[int]]:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise InputError(f"{option} must be comma-separated slice indices such as 40,45,50; got {text!r}") from None
    if not values:
        raise InputError(f"{option} is empty")
    return values


#: The defaults of ``TuneConfig`` the options show, written out so that building the parser imports no torch
#: (a test checks they equal ``TuneConfig()``'s).
TUNE_DEFAULTS = {"steps": 40, "rank": 8, "lr": 3e-3, "seed": 0, "targets": "decoder", "box_encodes": 14,
                 "click_encodes": 3}


def add_tune_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``medfm tune`` (shared with ``python -m MedFMTrainLib.tune_cli``); imports no torch."""
    d = SimpleNamespace(**TUNE_DEFAULTS)
    p.add_argument("--image", required=True, action="append", help="volume file (repeat with --labels for 1-5 volumes)")
    p.add_argument("--labels", required=True, action="append",
                   help="corrected labels on the image grid: a labelmap, or a .seg.nrrd with --segment")
    p.add_argument("--label-value", type=int, default=1, help="label value of the structure in a labelmap (default 1)")
    p.add_argument("--segment", help="segment name in a .seg.nrrd")
    p.add_argument("--organ", required=True, help="organ / structure name stored with the adapter")
    p.add_argument("--axis", default="axial", choices=AXES)
    p.add_argument("--train-slices", help="corrected slice indices on --axis, e.g. 40,45,50 (one volume)")
    p.add_argument("--slices-per-volume", type=int, default=8, help="without --train-slices: slices per volume")
    p.add_argument("--val-slices", help="held-out slice indices to score into the manifest (one volume)")
    p.add_argument("--out", required=True, help="adapter folder to write (adapter.safetensors + manifest.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing adapter folder")
    p.add_argument("--steps", type=int, default=d.steps, help=f"decoder training steps (default {d.steps})")
    p.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr:g})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--targets", default=d.targets,
                   help="LoRA targets in the mask decoder: attn, attn_mlp, decoder (default) or a regex")
    p.add_argument("--box-encodes", type=int, default=d.box_encodes, help="encoded box crops (incl. augmented)")
    p.add_argument("--click-encodes", type=int, default=d.click_encodes,
                   help="encoded crops around simulated clicks (trains the click-to-box search)")
    p.add_argument("--no-localizer", action="store_true", help="do not train the organ localizer")
    p.add_argument("--model", default="litemedsam", help="base model id (default litemedsam)")
    p.add_argument("--checkpoint", help="checkpoint file for models whose weights are not embedded")
    p.add_argument("--allow-unverified", action="store_true", help="accept a checkpoint whose sha256 is unknown")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--preset", help="intensity preset (default auto)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--progress", choices=("text", "json", "none"), default="text")
    return p


def add_tune_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``tune`` subcommand to an argparse subparsers object (``func=run_tune``)."""
    p = subparsers.add_parser("tune", help="train a few-shot organ adapter (LoRA + localizer)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tune_arguments(p)
    p.set_defaults(func=run_tune)
    return p


def _read_pair(image_path: str, labels_path: str, args) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    from MedFMSegmentLib import io

    array, matrix = io.read_volume(image_path)
    if labels_path.lower().endswith(".seg.nrrd"):
        masks, _ = io.read_segmentation(labels_path, reference=(array.shape, matrix),
                                        only=[args.segment] if args.segment else None)
        if args.segment is None and len(masks) != 1:
            raise InputError(f"{labels_path} holds {len(masks)} segments ({', '.join(masks)}); "
                             "choose one with --segment")
        mask = next(iter(masks.values()))
    else:
        labels, lab_matrix = io.read_volume(labels_path)
        if labels.shape != array.shape or not np.allclose(lab_matrix, matrix, atol=1e-4):
            raise InputError(f"{labels_path} is on a different grid than {image_path}: labels shape (k, j, i) "
                             f"{labels.shape} vs image {array.shape}, largest geometry difference "
                             f"{np.abs(lab_matrix - matrix).max():.4g} mm; resample the labels onto the image")
        mask = (labels == args.label_value).astype(np.uint8)
        if not mask.any():
            present = np.unique(labels)
            shown = ", ".join(str(v) for v in present[:20]) + (" ..." if present.size > 20 else "")
            raise InputError(f"{labels_path}: label value {args.label_value} does not occur (values present: {shown})")
    return array, matrix, mask


#: (option, attribute, lowest, highest) of the numeric options, checked before anything is read.
_RANGES = (("--steps", "steps", 1, 100_000), ("--rank", "rank", 1, 256), ("--lr", "lr", 1e-8, 1.0),
           ("--threads", "threads", 1, 1024), ("--box-encodes", "box_encodes", 1, 100_000),
           ("--click-encodes", "click_encodes", 0, 100_000), ("--slices-per-volume", "slices_per_volume", 1, 10_000))


def check_ranges(args) -> None:
    """Refuse out-of-range numeric options (e.g. --lr 1e30 would train to NaN, --threads -1 crash torch)."""
    import math

    for option, name, low, high in _RANGES:
        value = getattr(args, name, None)
        if value is None:
            continue
        if not (math.isfinite(value) and low <= value <= high):
            raise InputError(f"{option} must be in {low:g}..{high:g}, got {value:.4g}")


def emit(obj) -> None:
    """One JSON object on one stdout line (the machine-readable channel of ``tune_cli``)."""
    print(json.dumps(obj), flush=True)


def _printer(mode: str) -> Optional[Callable[[float, str], None]]:
    if mode == "none":
        return None
    last = {"t": 0.0}

    def progress(fraction: float, message: str) -> None:
        if mode == "json":
            emit({"progress": round(fraction, 4), "message": message})
        elif time.monotonic() - last["t"] > 1.0 or fraction >= 1.0:
            last["t"] = time.monotonic()
            print(f"[{100 * fraction:5.1f}%] {message}", file=sys.stderr, flush=True)
    return progress


def _config(args):
    from dataclasses import replace

    from .adapters import LoraSettings
    from .tune import TuneConfig

    d = TuneConfig()
    pool = replace(d.pool, box_encodes=args.box_encodes, click_encodes=args.click_encodes)
    return TuneConfig(steps=args.steps, lr=args.lr, seed=args.seed, pool=pool,
                      lora=LoraSettings(args.rank, 2.0 * args.rank, args.targets), localizer=not args.no_localizer)


def run_tune(args, should_stop: Optional[Callable[[], bool]] = None) -> int:
    """Run ``medfm tune`` from parsed arguments; prints the result JSON; returns the exit status (0)."""
    from MedFMSegmentLib.model_options import check_model_options

    from .data import slices_from_segmentation, slices_from_volumes
    from .lora_settings import LoraSettings
    from .store_files import check_organ, check_output_dir

    # every check that needs no model comes first, and imports no torch (a bad option fails in a second)
    if len(args.image) != len(args.labels):
        raise InputError(f"give one --labels per --image ({len(args.image)} images, {len(args.labels)} labels)")
    check_ranges(args)
    check_organ(args.organ)
    check_output_dir(args.out, args.overwrite)
    train = _int_list(args.train_slices, "--train-slices")
    val = _int_list(args.val_slices, "--val-slices")
    if (train is not None or val is not None) and len(args.image) != 1:
        raise InputError("--train-slices and --val-slices need exactly one --image")
    LoraSettings(args.rank, 2.0 * args.rank, args.targets)  # --rank, --targets (a regular expression)
    check_model_options(args)
    pairs = [_read_pair(i, l, args) for i, l in zip(args.image, args.labels)]
    if train is not None:
        array, matrix, mask = pairs[0]
        overlap = sorted(set(train) & set(val or []))
        if overlap:
            raise InputError(f"slice(s) {overlap} are in both --train-slices and --val-slices")
        training = slices_from_segmentation(array, matrix, mask, args.axis, train, args.preset, name=args.image[0])
    else:
        training = slices_from_volumes(pairs, args.axis, args.slices_per_volume, preset=args.preset)

    import torch

    from MedFMSegmentLib.models import load_model
    from MedFMSegmentLib.session import PromptSession

    from .evaluate import evaluate_slices, summarize
    from .store import save_adapter
    from .tune import tune

    config = _config(args)
    config.check()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, checkpoint=args.checkpoint, device=args.device,
                       allow_unverified=args.allow_unverified)
    t0 = time.perf_counter()
    adapter = tune(model, training, args.organ, config, progress=_printer(args.progress), should_stop=should_stop)
    if val:
        array, matrix, mask = pairs[0]
        session = PromptSession(model)
        session.set_volume(array, matrix, preset=args.preset)
        rows = evaluate_slices(session, mask, args.axis, val, adapter=adapter)
        adapter.manifest["metrics"]["validation"] = {"slices": val, "mean": summarize(rows), "per_slice": rows}
    if should_stop is not None and should_stop():
        from MedFMSegmentLib.errors import Cancelled
        raise Cancelled("tuning stopped by the user before saving; no adapter was written")
    path = save_adapter(adapter, args.out, overwrite=args.overwrite)
    result = {"adapter": str(path), "organ": adapter.organ, "base_model": adapter.manifest["base_model"],
              "metrics": adapter.manifest["metrics"], "seconds": round(time.perf_counter() - t0, 1)}
    if args.progress == "json":
        emit({"result": result})
    else:
        print(json.dumps(result, indent=1))
    return 0
