"""Few-shot adapter benchmark on ../shared/data (Colin27 + AAL): base vs adapted Dice; prints JSON.

    python Testing/benchmarks/bench_tune.py [--structures Caudate_L ...] [--k 1 3 5] [--eval 8]
                                            [--steps N] [--threads 2] [--no-clicks] [--quick] [--out FILE]

Per structure (axial): ``k`` training slices from ``datasets.sample_slices`` (spread over the central
60% of the structure), and ``--eval`` held-out slices spread over the whole structure, never used for
training by any k; each held-out slice is reported with its distance (slices) to the nearest
training slice. On the held-out slices, through ``PromptSession`` (zoomed crops, the same code the
user runs): Dice of the base model and of the adapted model with a box prompt (tight ground-truth
box + 5 px, ``add_box``) and with one click at the deepest point (``add_point``), beside the
model-free baseline (ellipse inscribed in the tight box); the localizer's box IoU; training time
(wall and CPU seconds, ``--threads`` torch threads). Finally the base model's masks on every
structure's held-out slices are recomputed after all adapters were trained, applied and removed:
they must be bitwise identical ("no harm when not applied").
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "MedFMSegment"), str(HERE.parents[1] / "MedFMTrain")]

import datasets as D  # noqa: E402
from MedFMSegmentLib import geometry  # noqa: E402
from MedFMSegmentLib.models import load_model  # noqa: E402
from MedFMSegmentLib.preprocess import normalise_volume  # noqa: E402
from MedFMSegmentLib.session import PromptSession  # noqa: E402
from MedFMTrainLib.data import slices_from_segmentation  # noqa: E402
from MedFMTrainLib.evaluate import evaluate_localizer, evaluate_slices, padded_box, summarize  # noqa: E402
from MedFMTrainLib.samples import PoolConfig  # noqa: E402
from MedFMTrainLib.tune import TuneConfig, tune  # noqa: E402

DEFAULT_STRUCTURES = ["Caudate_L", "Putamen_L", "Pallidum_L", "Hippocampus_L"]


def eval_slices(mask: np.ndarray, n: int, exclude, min_area: int = 20):
    """``n`` slices spread evenly over the whole structure, none of them in ``exclude``."""
    area = mask.sum(axis=(1, 2))
    idx = [int(i) for i in np.nonzero(area >= min_area)[0] if int(i) not in set(exclude)]
    if len(idx) <= n:
        return idx
    picks = np.linspace(0, len(idx) - 1, n).round().astype(int)
    return sorted({idx[p] for p in picks})


def base_masks(session, mask, indices):
    out = {}
    for i in indices:
        session.adapter = None
        session.reset()
        out[i] = session.add_box("axial", i, padded_box(geometry.get_slice(mask, "axial", i) > 0, 5)).mask.copy()
    session.reset()
    return out


def mean(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return round(float(np.mean(vals)), 4) if vals else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structures", nargs="+", default=DEFAULT_STRUCTURES)
    ap.add_argument("--k", nargs="+", type=int, default=[1, 3, 5])
    ap.add_argument("--eval", type=int, default=8, help="held-out slices per structure")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--box-encodes", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-clicks", action="store_true")
    ap.add_argument("--quick", action="store_true", help="1 structure, k=2, 3 held-out slices, tiny training")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if not D.available():
        print(json.dumps({"skipped": f"shared data not found at {D.DATA}"}))
        return 0
    if args.quick:
        args.structures, args.k, args.eval = args.structures[:1], [2], 3
    config = TuneConfig(seed=args.seed)
    if args.quick:
        config = TuneConfig(seed=args.seed, steps=8, localizer_steps=30,
                            pool=PoolConfig(box_encodes=4, click_encodes=1, full_encodes=2))
    if args.steps is not None:
        config.steps = args.steps
    if args.lr is not None:
        config.lr = args.lr
    if args.rank is not None:
        from MedFMTrainLib.adapters import LoraSettings
        config.lora = LoraSettings(args.rank, 2.0 * args.rank, config.lora.targets)
    if args.box_encodes is not None:
        from dataclasses import replace
        config.pool = replace(config.pool, box_encodes=args.box_encodes)

    array, matrix = D.volumes()["mri"]
    structures = D.structures()
    model = load_model("litemedsam", device="cpu")
    session = PromptSession(model)
    session.set_volume(array, matrix)
    plans = {}
    for name in args.structures:
        mask = structures[name].mask
        train = {k: D.sample_slices(mask, "axial", k) for k in args.k}
        used = sorted({i for v in train.values() for i in v})
        plans[name] = (mask, train, eval_slices(mask, args.eval, used))
    before = {name: base_masks(session, plan[0], plan[2]) for name, plan in plans.items()}

    results = {}
    full_cache = {}  # whole-slice embeddings of held-out slices, shared by every localizer
    volume_u8, _, _ = normalise_volume(array)
    t_all = time.perf_counter()
    for name, (mask, train, held) in plans.items():
        base_rows = evaluate_slices(session, mask, "axial", held, adapter=None, clicks=not args.no_clicks)
        entry = {"eval_slices": held, "base": summarize(base_rows), "k": {}}
        for k, idx in train.items():
            ts = slices_from_segmentation(array, matrix, mask, "axial", idx)
            t0, c0 = time.perf_counter(), time.process_time()
            adapter = tune(model, ts, name, config)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            rows = evaluate_slices(session, mask, "axial", held, adapter=adapter, clicks=not args.no_clicks,
                                   base=False)
            loc_rows = evaluate_localizer(adapter.detector(model, cache=full_cache), array, matrix, mask, held,
                                          volume_u8=volume_u8)
            for r, b, lr in zip(rows, base_rows, loc_rows):
                r.update({key: b[key] for key in b if key.endswith("_base")})
                r["distance"] = int(min(abs(r["index"] - i) for i in idx))
                r["localizer_iou"] = lr.get("iou")
            s = summarize(rows)
            entry["k"][str(k)] = {
                "train_slices": idx, "distances": [r["distance"] for r in rows],
                "dice": s, "delta_box": round(s["box_adapted"] - s["box_base"], 4),
                "delta_click": round(s["click_adapted"] - s["click_base"], 4) if "click_adapted" in s else None,
                "localizer_iou": mean(rows, "localizer_iou"),
                "train_seconds_wall": round(wall, 1), "train_seconds_cpu": round(cpu, 1),
                "train_metrics": adapter.manifest["metrics"], "per_slice": rows}
            print(json.dumps({"structure": name, "k": k, "dice": s, "wall": round(wall, 1)}), file=sys.stderr)
        results[name] = entry

    after = {name: base_masks(session, plan[0], plan[2]) for name, plan in plans.items()}
    identical = all(np.array_equal(before[n][i], after[n][i]) for n in before for i in before[n])
    summary = {}
    for k in args.k:
        rows = [results[n]["k"][str(k)] for n in results]
        summary[str(k)] = {key: round(float(np.mean([r["dice"][key] for r in rows if key in r["dice"]])), 4)
                           for key in rows[0]["dice"]}
        summary[str(k)]["delta_box"] = round(float(np.mean([r["delta_box"] for r in rows])), 4)
        if rows[0]["delta_click"] is not None:
            summary[str(k)]["delta_click"] = round(float(np.mean([r["delta_click"] for r in rows])), 4)
        summary[str(k)]["localizer_iou"] = round(float(np.mean([r["localizer_iou"] for r in rows])), 4)
        summary[str(k)]["max_train_seconds_wall"] = max(r["train_seconds_wall"] for r in rows)
        summary[str(k)]["max_train_seconds_cpu"] = max(r["train_seconds_cpu"] for r in rows)
    out = {"model": model.spec.id, "axis": "axial", "threads": args.threads, "config": config.to_dict(),
           "structures": results, "summary": summary,
           "base_unchanged_after_adapters": identical, "seconds": round(time.perf_counter() - t_all, 1)}
    text = json.dumps(out, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
