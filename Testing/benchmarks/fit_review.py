"""Fit the review list's weights from bench_effort results, leave-one-dataset-out, and score them offline.

    python Testing/benchmarks/fit_review.py ALL.json [MORE.json ...] --out models.json [--modes guided oracle]
    python Testing/benchmarks/fit_review.py ALL.json --confidence-grid     # the reported confidence's rule

From the review rows (every reviewed slice at every step: ``review.slice_features`` and the true per-slice
Dice and wrong pixels) of the given modes, ridge least squares fits
- ``order``: log((1 + wrong pixels) / (1 + area)) from the features (the order: log(1 + area) + this);
- ``confidence``: the per-slice Dice from the features (clipped to [0, 1]);
- ``gain``: the 3D Dice a correction of the slice gained, from the picked slices' features.
Each dataset (volume: mri, ct, chest_ct, tumour_mr) gets the weights fitted on the others (``--out``:
``{volume: {"order": [...], "confidence": [...]}, "*": fitted on all}``, bench_effort ``--review-models``).
Printed, per held-out dataset and pooled: the confidence's Spearman with the Dice (held-out fits, the rows
of ``--score-modes``), and the one-step pick quality of each order (the wrong pixels of the slice it picks
over the most wrong pixels among the reviewable, not yet corrected slices, mean over steps).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "MedFMSegment")]

from bench_effort import spearman  # noqa: E402
from MedFMSegmentLib.review import FEATURES, add_sums  # noqa: E402

ORDER_FEATURES = FEATURES
CONF_FEATURES = tuple(f for f in FEATURES if f != "log_area")


def augment(rec):
    """Features that the rows of older runs lack, from the record: ``toward_empty`` (a pinned slice is the
    ground truth: empty where its gt_area is 0; a slice never reviewed was picked for its missing mask)."""
    gt_area = {r["index"]: r.get("gt_area") for r in rec["review"]}
    for r in rec["review"]:
        f = r.get("features")
        if f is None or "log_doubt" in f:
            continue
        f["confidence"] = float(r["confidence"])
        f["log_doubt"] = float(np.log(1.01 - f["confidence"]))
        fixed = sorted(set(rec["touched"][:r["step"] + 1]))
        below = [x for x in fixed if x < r["index"]]
        above = [x for x in fixed if x > r["index"]]
        inside = bool(f["inside"]) and below and above
        f["toward_empty"] = float(bool(inside) and any(gt_area.get(x) == 0 for x in (below[-1], above[0])
                                                       if x != rec["touched"][0]))
    for step in {r["step"] for r in rec["review"]}:
        rows = {r["index"]: r["features"] for r in rec["review"] if r["step"] == step and "features" in r}
        if rows and "log_beyond" not in next(iter(rows.values())):
            wrong = {r["index"]: float(r["expected_wrong"]) for r in rec["review"] if r["step"] == step}
            add_sums(rows, sorted(set(rec["touched"][:step + 1])), wrong)
    return rec


def load(paths, modes):
    """[(structure, volume, mode, record)] from result files (a structure in several: the first file's)."""
    out, seen = [], set()
    for p in paths:
        for name, row in json.loads(Path(p).read_text())["structures"].items():
            for mode in modes:
                if mode in row and (name, mode) not in seen:
                    seen.add((name, mode))
                    out.append((name, row["volume"], mode, augment(row[mode])))
    return out


def matrix(rows, names):
    return np.array([[r["features"].get(n, 0.0) for n in names] for r in rows], float)


def targets(rows):
    area = np.array([np.expm1(r["features"]["log_area"]) for r in rows])
    wrong = np.array([r["wrong"] for r in rows], float)
    return np.log((1 + wrong) / (1 + area)), np.array([r["dice"] for r in rows], float)


def ridge(x, y, w, lam):
    """Weighted ridge least squares (the bias, column 0, unpenalised)."""
    sw = np.sqrt(w)[:, None]
    a, b = x * sw, y * sw[:, 0]
    pen = np.eye(x.shape[1]) * lam * w.sum()
    pen[0, 0] = 0.0
    return np.linalg.solve(a.T @ a + pen, a.T @ b)


def fit(recs, lam):
    rows, wts = [], []
    for name, vol, mode, rec in recs:
        rs = [r for r in rec["review"] if "features" in r]
        rows += rs
        wts += [1.0 / max(len(rs), 1)] * len(rs)  # every (structure, mode) weighs the same
    if not rows:
        return None
    w = np.array(wts)
    y_order, y_dice = targets(rows)
    order = ridge(matrix(rows, ORDER_FEATURES), y_order, w, lam)
    conf = ridge(matrix(rows, CONF_FEATURES), y_dice, w, lam)
    out = {"order": [[n, round(float(v), 5)] for n, v in zip(ORDER_FEATURES, order)],
           "confidence": [[n, round(float(v), 5)] for n, v in zip(CONF_FEATURES, conf)]}
    picked, gains = [], []  # the 3D Dice gained by correcting the slice a user picked, from its features
    for name, vol, mode, rec in recs:
        for step in range(len(rec["touched"]) - 1):
            row = next((r for r in rec["review"] if r["step"] == step and r["index"] == rec["touched"][step + 1]
                        and "features" in r), None)
            if row is not None:
                picked.append(row)
                gains.append(rec["dice"][step + 1] - rec["dice"][step])
    if picked:
        gain = ridge(matrix(picked, ORDER_FEATURES), np.array(gains), np.ones(len(picked)), lam)
        out["gain"] = [[n, round(float(v), 5)] for n, v in zip(ORDER_FEATURES, gain)]
    return out


def lin(feats, weights):
    return sum(w * feats.get(n, 0.0) for n, w in weights)


def pick_quality(rec, score):
    """Mean over steps of wrong[pick] / max wrong among the reviewable, not yet corrected slices."""
    q = []
    touched = rec["touched"]
    for step in range(len(touched) - 1):
        done = set(touched[:step + 1])
        cand = [r for r in rec["review"] if r["step"] == step and r["index"] not in done]
        if not cand:
            continue
        best = max(r["wrong"] for r in cand)
        if best <= 0:
            continue
        pick = max(cand, key=lambda r: (score(r), -r["index"]))
        q.append(pick["wrong"] / best)
    return float(np.mean(q)) if q else None


def confidence_grid(files, modes=("guided",)):
    """The reported confidence's rule (``PropagationConfig.value_*``) chosen from a grid, leave-one-dataset-out:
    per held-out dataset the grid point of the best pooled Spearman on the other datasets' rows of ``modes``;
    returns {"in_sample": [(point, Spearman)] best first, "held_out": {volume: (point, its Spearman, the base
    confidence's)}, "pooled_held_out", "pooled_base"}."""
    import itertools

    from MedFMSegmentLib.propagate import PropagationConfig, review_confidence

    recs = load(files, list(modes))
    vols = sorted({v for _, v, _, _ in recs})
    weights = {"iou+jitter+agree": (("iou", 1.0), ("jitter", 1.0), ("agree", 1.0)),
               "iou+jitter": (("iou", 1.0), ("jitter", 1.0))}
    grid = list(itertools.product((10.0, 20.0), sorted(weights), (0.0, 0.2, 0.5), (0.0, 0.25, 0.5)))
    rows = {v: [r for _, vv, _, rec in recs if vv == v for r in rec["review"]] for v in vols}
    dice = {v: [r["dice"] for r in rows[v]] for v in vols}
    pred = {}
    for g in grid:
        cfg = PropagationConfig(value_decay_slices=g[0], value_weights=weights[g[1]], value_outside_factor=g[2],
                                value_area_weight=g[3])
        pred[g] = {v: [review_confidence(r["signals"] or None, r["features"], cfg) for r in rows[v]] for v in vols}

    def pooled(g, vs):
        return spearman([x for v in vs for x in pred[g][v]], [x for v in vs for x in dice[v]])

    base = {v: [r["features"]["confidence"] for r in rows[v]] for v in vols}
    out = {"in_sample": sorted(((g, pooled(g, vols)) for g in grid), key=lambda t: -t[1])[:5], "held_out": {}}
    hp, hd = [], []
    for v in vols:
        best = max(grid, key=lambda g: pooled(g, [x for x in vols if x != v]))
        out["held_out"][v] = (best, spearman(pred[best][v], dice[v]), spearman(base[v], dice[v]))
        hp += pred[best][v]
        hd += dice[v]
    out["pooled_held_out"] = spearman(hp, hd)
    out["pooled_base"] = spearman([x for v in vols for x in base[v]], [x for v in vols for x in dice[v]])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--modes", nargs="+", default=None, help="records to fit on (default: every mode)")
    p.add_argument("--score-modes", nargs="+", default=["guided"], help="records to score Spearman on")
    p.add_argument("--lam", type=float, default=0.01)
    p.add_argument("--out")
    p.add_argument("--confidence-grid", action="store_true",
                   help="only choose the reported confidence's rule leave-one-dataset-out (confidence_grid)")
    args = p.parse_args(argv)
    if args.confidence_grid:
        print(json.dumps(confidence_grid(args.files, args.score_modes), indent=1))
        return 0
    modes = args.modes
    if modes is None:
        st = json.loads(Path(args.files[0]).read_text())["settings"]
        modes = list(st["modes"])
    recs = load(args.files, sorted(set(modes) | set(args.score_modes)))
    fit_recs = [r for r in recs if r[2] in modes]
    vols = sorted({v for _, v, _, _ in recs})
    models = {"*": fit(fit_recs, args.lam)}
    for v in vols:
        models[v] = fit([r for r in fit_recs if r[1] != v], args.lam)
    report = {"per_volume": {}, "pooled": {}}
    pooled_c, pooled_d, pooled_old = [], [], []
    quality = {}
    for name, vol, mode, rec in recs:
        m = models[vol]
        rows = [r for r in rec["review"] if "features" in r]
        if mode in args.score_modes:
            pooled_c += [float(np.clip(lin(r["features"], m["confidence"]), 0, 1)) for r in rows]
            pooled_d += [r["dice"] for r in rows]
            pooled_old += [r["confidence"] for r in rows]
        scorers = {"engine": lambda r: r["expected_wrong"],
                   "model_heldout": lambda r, m=m: r["features"]["log_area"] + lin(r["features"], m["order"]),
                   "model_insample": lambda r: r["features"]["log_area"] + lin(r["features"], models["*"]["order"]),
                   "gain_heldout": lambda r, m=m: lin(r["features"], m["gain"]),
                   "area": lambda r: r["features"]["log_area"]}
        for sname, fn in scorers.items():
            qv = pick_quality(rec, fn)
            if qv is not None:
                quality.setdefault(mode, {}).setdefault(sname, []).append((name, round(qv, 3)))
    report["spearman_heldout_confidence"] = spearman(pooled_c, pooled_d)
    report["spearman_engine_confidence"] = spearman(pooled_old, pooled_d)
    report["pick_quality"] = {mode: {s: {"mean": round(float(np.mean([v for _, v in lst])), 3), "per": lst}
                                     for s, lst in d.items()} for mode, d in quality.items()}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(models, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
