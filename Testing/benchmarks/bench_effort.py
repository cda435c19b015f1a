"""The user's effort to a correct 3D segmentation: MedFM's correction loop against Fill between slices.

    python Testing/benchmarks/bench_effort.py [--structures ...] [--corrections 10] [--adapt] [--out FILE]
    python Testing/benchmarks/bench_effort.py --part 1/2 --resume A.json     # structures 1, 3, 5, ... into A.json
    python Testing/benchmarks/bench_effort.py --merge A.json B.json --out ALL.json   # one table from parts

``--resume FILE``: structures already in FILE (same settings) are skipped, FILE is rewritten after every
structure (a killed run loses at most the structure in progress). ``--part i/n`` runs every n-th structure
of the list from the i-th, so n processes (``--threads 1`` each) share the list; ``--merge`` joins their
files and recomputes the summary.

Per structure (axial slicing), a simulated user:
- draws one box (ground-truth box + 2 px) on the middle slice of the structure and propagates;
- then corrects one slice at a time (replaces it with the ground truth: ``session.set_slice_mask``) and
  the tool re-propagates (``propagate(..., previous=vol)``), up to ``--corrections`` times;
- picks the slice two ways: ``guided`` (the first slice of ``vol.review`` not yet corrected) and
  ``oracle`` (the slice with the most wrong voxels); ``--adapt`` adds each mode again with online adaptation
  (``guided_adapt``, ``oracle_adapt``: the adapter, MedFMTrainLib.online, updated from the corrected slices
  before every re-propagation, as ``medfm segment`` does by default for a segment with corrections);
  ``--modes guided:POLICY`` adds a guided user visiting the review list in another order (``policy_order``:
  ``tau5`` / ``tau3``, ``dist``, ``ends``, ``model`` / ``gain`` with ``--review-models``, weights from ``fit_review.py``).

Reported: 3D Dice after each step, slices touched (box slice + corrections) to reach 0.85 / 0.90,
slices visited by the first propagation vs the true extent, time per re-propagation / adaptation,
the confidence's Spearman rank correlation with the true per-slice Dice (every candidate signal and
the combined confidence), and in the same run the baselines:
- ``fbs``: Fill between slices (ITK's morphological contour interpolation, the filter of Slicer's
  effect) from n ground-truth slices, n = 2..12, evenly spaced over the extent incl. first and last;
- ``fbs_same``: Fill between slices from exactly the slices each simulated user touched, per step;
- ``ellipse``: the box's inscribed ellipse on every slice of the true extent (first step).
Intermediate JSON goes to ``--tmp`` after every structure. Per step the record holds the re-propagation
wall / CPU seconds, the load average, the slices recomputed and encoded, and with ``--adapt`` the
adaptation's wall / CPU seconds and its manifest metrics.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "MedFMSegment"), str(HERE.parents[1] / "MedFMTrain")]

import datasets as D  # noqa: E402
from MedFMSegmentLib import geometry  # noqa: E402
from MedFMSegmentLib import review as R  # noqa: E402
from MedFMSegmentLib.propagate import PropagationConfig, confidence_of, expected_wrong, propagate  # noqa: E402
from MedFMSegmentLib.session import PromptSession  # noqa: E402

log = logging.getLogger("bench_effort")
DEFAULT = ["Thalamus_L", "T12", "Tumour", "Putamen_L", "Caudate_L", "Hippocampus_L", "Pallidum_L",
           "Amygdala_L", "Cerebellum_L", "CT_intracranial", "Aorta_descending"]  # whole Aorta: 152 slices
AXIS = "axial"


def cpu_info() -> dict:
    flags, model = [], platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma", "amx", "sse4"))]
                break
    except OSError:
        pass
    return {"model": model, "isa": sorted(set(flags)), "threads": torch.get_num_threads()}


def extent(gt):
    ks = np.nonzero(gt.any(axis=(1, 2)))[0]
    return int(ks.min()), int(ks.max())


def fill_between_slices(gt, slices):
    """ITK MorphologicalContourInterpolator (Slicer's Fill between slices) from the GT on ``slices``."""
    import itk

    slices = sorted(set(int(s) for s in slices))
    (k0, j0, i0), (k1, j1, i1) = geometry.bbox_kji(gt)
    j0, i0 = max(j0 - 2, 0), max(i0 - 2, 0)
    j1, i1 = min(j1 + 2, gt.shape[1] - 1), min(i1 + 2, gt.shape[2] - 1)
    lo, hi = min(slices + [k0]), max(slices + [k1])
    sub = np.zeros((hi - lo + 1, j1 - j0 + 1, i1 - i0 + 1), np.uint8)
    for k in slices:
        sub[k - lo] = gt[k, j0:j1 + 1, i0:i1 + 1]
    out = np.zeros_like(gt)
    if sub.any():
        f = itk.MorphologicalContourInterpolator.New(itk.image_from_array(sub))
        f.SetAxis(2)  # ITK index order (i, j, k): interpolate across axial slices
        f.Update()
        out[lo:hi + 1, j0:j1 + 1, i0:i1 + 1] = itk.array_from_image(f.GetOutput()) > 0
    return out


def spread(first, last, n):
    return sorted({int(round(v)) for v in np.linspace(first, last, n)})


def spearman(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None

    def rank(v):
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for u in np.unique(v):  # average ranks for ties
            m = v == u
            r[m] = r[m].mean()
        return r

    return round(float(np.corrcoef(rank(x), rank(y))[0, 1]), 3)


def slice_dice(a, b):
    return D.dice(a, b) if (a.any() or b.any()) else 1.0


def features_of(vol):
    """review.slice_features of every reviewed slice of ``vol`` (the engine's, ``vol.features``)."""
    if getattr(vol, "features", None):
        return vol.features
    fixed = sorted(set(vol.seeds) | set(vol.pinned))
    prompted = set(vol.seeds) - set(vol.pinned)
    return R.slice_features(vol.signals, vol.mask, vol.axis, fixed, prompted,
                            indices=[r["index"] for r in vol.review], scores=vol.confidence)


def policy_order(vol, mode, models=None):
    """The slices a guided user visits, in order: ``vol.review`` ("guided") or an alternative order
    ("guided:tau5" / "guided:tau3": (1 - confidence) x area with a 5 / 3 slice distance decay; "guided:dist":
    area x (1 - exp(-distance / 5)) on propagated slices; "guided:ends": the engine's expected wrong pixels
    x 3 on the result's first / last slice and the border slices; "guided:boxN": the engine's expected wrong
    pixels, x N on the prompted (box) slice; "guided:model": the predicted log wrong pixels,
    log(1 + area) + models["order"] . features; "guided:gain": the predicted 3D Dice gain, models["gain"] .
    features)."""
    if ":" not in mode:  # guided, guided_adapt (the engine's review order)
        return [r["index"] for r in vol.review]
    policy = mode.split(":", 1)[1]
    feats = features_of(vol) if policy in ("model", "ends", "gain") else None
    score = {}
    for item in vol.review:
        k, sig = item["index"], vol.signals.get(item["index"])
        s = item["expected_wrong"]
        if policy.startswith("tau") and sig:
            s = expected_wrong(sig, confidence_of(sig, PropagationConfig(confidence_decay_slices=float(policy[3:]))))
        elif policy == "dist" and sig and "border" not in sig:
            s = sig.get("area", 1.0) * (1 - np.exp(-sig.get("distance", 0.0) / 5.0))
        elif policy.startswith("box") and k in set(vol.seeds) - set(vol.pinned):
            s *= float(policy[3:])  # the prompted (box) slice: the model's own answer, x N
        elif policy == "ends":
            s *= 3.0 if feats[k]["border"] or feats[k]["end"] else 1.0
        elif policy == "model":
            s = feats[k]["log_area"] + R.linear(feats[k], models["order"])
        elif policy == "gain":
            s = R.linear(feats[k], models["gain"])
        score[k] = s
    return sorted(score, key=lambda k: (-score[k], k))


def review_rows(vol, gt, step, models=None):
    """(index, signals, features, confidence, true per-slice Dice, wrong voxels) for every reviewed slice."""
    rows = []
    feats = features_of(vol)
    for item in vol.review:
        k = item["index"]
        sig = dict(vol.signals.get(k, {}))
        rows.append({"step": step, "index": k, "confidence": item["confidence"], "signals": sig,
                     "expected_wrong": item.get("expected_wrong"),
                     "features": {n: round(v, 4) for n, v in feats[k].items()},
                     "dice": round(slice_dice(vol.mask[k], gt[k]), 4),
                     "wrong": int((vol.mask[k] != gt[k]).sum()), "gt_area": int(gt[k].sum())})
        if models and models.get("confidence"):
            rows[-1]["model_confidence"] = round(float(np.clip(R.linear(feats[k], models["confidence"]), 0, 1)), 4)
    return rows


def first_reaching(dices, threshold):
    for n, d in enumerate(dices):
        if d >= threshold:
            return n + 1  # slices touched: the box slice + n corrections
    return None


def run_user(session, gt, mode, args, adapt=None, models=None):
    """One simulated user on one structure; returns its record (``models``: for "guided:model")."""
    first, last = extent(gt)
    mid = (first + last) // 2
    ks = np.nonzero(gt.any(axis=(1, 2)))[0]
    mid = int(ks[np.argmin(np.abs(ks - mid))])
    box = D.padded_box(gt[mid], 2)
    session.reset()
    session.adapter = None
    session.add_box(AXIS, mid, box)
    t = time.perf_counter()
    vol = propagate(session, axis=AXIS)
    first_seconds = time.perf_counter() - t
    visited = sorted(set(vol.recomputed) | {mid})
    rec = {"box_slice": mid, "dice": [round(D.dice(vol.mask, gt), 4)], "touched": [mid],
           "first_propagation": {"seconds": round(first_seconds, 1), "encoded": vol.encoded,
                                 "visited": [min(visited), max(visited)], "n_visited": len(visited),
                                 "result_extent": list(extent(vol.mask)) if vol.mask.any() else None,
                                 "stopped": vol.stopped},
           "repropagation_seconds": [], "recomputed": [], "encoded": [], "adapt_seconds": [],
           "review": review_rows(vol, gt, 0, models)}
    corrected = set()
    for step in range(1, args.corrections + 1):
        if mode.startswith("guided"):
            pick = next((k for k in policy_order(vol, mode, models) if k not in corrected), None)
            if pick is None:  # nothing left to review: the largest remaining error
                mode_used = "oracle-fallback"
            else:
                mode_used = "review"
        if mode.startswith("oracle") or (mode.startswith("guided") and pick is None):
            wrong = (vol.mask != gt).sum(axis=(1, 2)).astype(float)
            for k in corrected:
                wrong[k] = -1
            pick = int(np.argmax(wrong))
            mode_used = mode if mode.startswith("oracle") else "oracle-fallback"
        corrected.add(pick)
        session.set_slice_mask(AXIS, pick, gt[pick])
        if adapt is not None:
            t, c = time.perf_counter(), time.process_time()
            old, session.adapter = session.adapter, adapt(session, vol)
            rec["adapt_seconds"].append(round(time.perf_counter() - t, 2))
            rec.setdefault("adapt_cpu_seconds", []).append(round(time.process_time() - c, 2))
            online = getattr(session.adapter, "manifest", {}).get("online", {})
            rec.setdefault("adapt_metrics", []).append(online.get("metrics"))
            if old is not None and old is not session.adapter:
                old.detach(session.model)  # its LoRA layers would stay in the shared decoder otherwise
        t, c = time.perf_counter(), time.process_time()
        vol = propagate(session, axis=AXIS, previous=vol)
        rec["repropagation_seconds"].append(round(time.perf_counter() - t, 2))
        rec.setdefault("repropagation_cpu_seconds", []).append(round(time.process_time() - c, 2))  # a loaded host
        rec.setdefault("load_average", []).append(round(os.getloadavg()[0], 2))
        rec["recomputed"].append(len(vol.recomputed))
        rec["encoded"].append(vol.encoded)
        rec["touched"].append(pick)
        rec["dice"].append(round(D.dice(vol.mask, gt), 4))
        rec.setdefault("picked_by", []).append(mode_used)
        rec["review"] += review_rows(vol, gt, step, models)
        log.warning("%s step %d: corrected %d -> Dice %.3f (%.1f s, %d slices recomputed, %d encoded)", mode, step,
                    pick, rec["dice"][-1], rec["repropagation_seconds"][-1], len(vol.recomputed), vol.encoded)
    if session.adapter is not None and hasattr(session.adapter, "detach"):
        session.adapter.detach(session.model)
    session.adapter = None
    rec["slices_to_0.85"] = first_reaching(rec["dice"], 0.85)
    rec["slices_to_0.90"] = first_reaching(rec["dice"], 0.90)
    rec["fbs_same"] = [round(D.dice(fill_between_slices(gt, rec["touched"][:n + 1]), gt), 4)
                       for n in range(len(rec["touched"]))]
    return rec


def confidence_study(records, cfg):
    """Spearman of each candidate signal (and of the configured confidence) with the true slice Dice."""
    rows = [r for rec in records for r in rec["review"]]
    out = {"n": len(rows), "confidence": spearman([r["confidence"] for r in rows], [r["dice"] for r in rows])}
    if rows and all("model_confidence" in r for r in rows):
        out["model_confidence"] = spearman([r["model_confidence"] for r in rows], [r["dice"] for r in rows])
    inner = [r for r in rows if "border" not in r["signals"]]
    for name in ("iou", "jitter", "agree", "distance"):
        have = [r for r in inner if name in r["signals"]]
        vals = [r["signals"][name] if name != "distance" else -r["signals"][name] for r in have]
        out[name] = spearman(vals, [r["dice"] for r in have])
    combos = {"iou+jitter": (("iou", 1.0), ("jitter", 1.0)), "jitter+agree": (("jitter", 1.0), ("agree", 1.0)),
              "iou+jitter+agree": (("iou", 1.0), ("jitter", 1.0), ("agree", 1.0)),
              "jitter+2agree": (("jitter", 1.0), ("agree", 2.0))}
    for name, weights in combos.items():
        c = PropagationConfig(confidence_weights=weights)
        vals = [confidence_of(r["signals"], c) if r["signals"] else r["confidence"] for r in rows]
        out[name] = spearman(vals, [r["dice"] for r in rows])
    for tau in (5.0, 20.0):  # the distance decay's length, the configured weights
        c = PropagationConfig(confidence_decay_slices=tau)
        vals = [confidence_of(r["signals"], c) if r["signals"] else r["confidence"] for r in rows]
        out[f"decay_{tau:g}"] = spearman(vals, [r["dice"] for r in rows])
    # the weakest signal instead of the mean (one failing signal is enough to doubt a slice)
    vals = [(min(r["signals"].get(k, 1.0) for k in ("iou", "jitter", "agree"))
             * float(np.exp(-r["signals"].get("distance", 0.0) / 10.0))
             if r["signals"] and "border" not in r["signals"] else r["confidence"]) for r in rows]
    out["min_signal"] = spearman(vals, [r["dice"] for r in rows])
    return out


def settings(args) -> dict:
    """What must agree between parts / a resumed file."""
    return {"precision": args.precision, "corrections": args.corrections, "modes": list(args.modes),
            "adapt": bool(args.adapt), "adapt_min": args.adapt_min, "threads": args.threads,
            "review_models": args.review_models}


def all_modes(modes, adapt: bool) -> list:
    """The modes run: ``modes``, and with ``--adapt`` each of them again with online adaptation (``MODE_adapt``)."""
    return list(modes) + ([f"{m}_adapt" for m in modes] if adapt else [])


def part_of(names, part):
    """``part`` "i/n": every n-th name from the i-th (1-based)."""
    if not part:
        return list(names)
    i, n = (int(v) for v in part.split("/"))
    if not 1 <= i <= n:
        raise SystemExit(f"--part {part}: need 1 <= i <= n")
    return [name for j, name in enumerate(names) if j % n == i - 1]


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    vols, structs = D.volumes(), D.structures()
    sessions = {}
    adapt = None
    if args.adapt:
        from MedFMTrainLib import online

        config = online.OnlineConfig(min_slices=args.adapt_min)

        def adapt(session, vol):
            return online.adapt_from_corrections(session, AXIS, organ="bench", crops=vol.crops, config=config)
    out = {"cpu": cpu_info(), "load_average": list(os.getloadavg()), "precision": args.precision,
           "corrections": args.corrections, "settings": settings(args), "structures": {}}
    if args.resume and Path(args.resume).is_file():
        old = json.loads(Path(args.resume).read_text())
        if old.get("settings") != settings(args):
            raise SystemExit(f"--resume {args.resume}: its settings {old.get('settings')} differ from {settings(args)}")
        out["structures"] = old["structures"]
        log.warning("resuming %s: %s done", args.resume, sorted(out["structures"]))
    modes = all_modes(args.modes, args.adapt)
    for name in part_of(args.structures, args.part):
        if name in out["structures"]:
            continue
        st = structs[name]
        if st.volume not in sessions:
            s = PromptSession(precision=args.precision)
            array, m = vols[st.volume]
            s.set_volume(array, m)
            sessions[st.volume] = s
            out.setdefault("runtime", {k: v for k, v in s.runtime_info.items() if k != "exports"})  # what ran
        session, gt = sessions[st.volume], st.mask
        first, last = extent(gt)
        row = {"volume": st.volume, "extent": [first, last], "slices": int(gt.any(axis=(1, 2)).sum())}
        fbs = {}
        for n in range(2, 13):
            fbs[n] = round(D.dice(fill_between_slices(gt, spread(first, last, n)), gt), 4)
        row["fbs"] = fbs
        row["fbs_slices_to_0.85"] = next((n for n in sorted(fbs) if fbs[n] >= 0.85), None)
        row["fbs_slices_to_0.90"] = next((n for n in sorted(fbs) if fbs[n] >= 0.90), None)
        mid = int(np.nonzero(gt.any(axis=(1, 2)))[0][np.argmin(np.abs(np.nonzero(gt.any(axis=(1, 2)))[0] - (first + last) // 2))])
        ell = np.zeros_like(gt)
        e2 = D.ellipse_in_box(gt[mid].shape, D.padded_box(gt[mid], 2))
        ell[first:last + 1] = e2
        row["ellipse"] = round(D.dice(ell, gt), 4)
        for mode in modes:
            t = time.perf_counter()
            models = None
            if args.review_models:
                table = json.loads(Path(args.review_models).read_text())
                models = table.get(st.volume, table.get("*"))
            row[mode] = run_user(session, gt, mode, args, adapt if mode.endswith("_adapt") else None, models)
            row[mode]["seconds"] = round(time.perf_counter() - t, 1)
            row[mode]["confidence_spearman"] = confidence_study([row[mode]], PropagationConfig())
            log.warning("%s %s: Dice %s", name, mode, row[mode]["dice"])
        row["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
        out["structures"][name] = row
        Path(args.tmp).mkdir(parents=True, exist_ok=True)
        (Path(args.tmp) / "bench_effort_partial.json").write_text(json.dumps(out, indent=1))
        if args.resume:
            write_atomic(Path(args.resume), out)
    for session in sessions.values():
        session.close()
    out["summary"] = summarize(out, modes)
    if args.resume:
        write_atomic(Path(args.resume), out)
    return out


def write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def merge(paths) -> dict:
    """One result from part files of the same settings (a structure in several: the first file's)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    base = parts[0]
    for p, part in zip(paths, parts):
        if part.get("settings") != base.get("settings"):
            raise SystemExit(f"--merge: {p} has settings {part.get('settings')}, {paths[0]} {base.get('settings')}")
    out = {k: v for k, v in base.items() if k not in ("structures", "summary")}
    out["load_average"] = {str(p): part.get("load_average") for p, part in zip(paths, parts)}
    out["structures"] = {}
    for part in parts:
        for name, row in part["structures"].items():
            out["structures"].setdefault(name, row)
    st = base.get("settings", {})
    modes = all_modes(st.get("modes", ["guided", "oracle"]), st.get("adapt"))
    out["summary"] = summarize(out, modes)
    return out


def cached_steps(rows, mode) -> dict:
    """Re-propagation times of the steps that encoded no slice, overall and on structures of >= 40 slices."""
    def stats(recs):
        wall = [w for rec in recs for w, e in zip(rec["repropagation_seconds"], rec["encoded"]) if e == 0]
        cpu = [c for rec in recs for c, e in zip(rec.get("repropagation_cpu_seconds", []), rec["encoded"]) if e == 0]
        if not wall:
            return None
        return {"steps": len(wall), "wall_median": round(float(np.median(wall)), 2), "wall_max": max(wall),
                "cpu_median": round(float(np.median(cpu)), 2) if cpu else None, "cpu_max": max(cpu) if cpu else None}
    recs = [r[mode] for r in rows.values() if mode in r]
    big = [r[mode] for r in rows.values() if mode in r and r.get("slices", 0) >= 40]
    return {"all": stats(recs), "structures_of_40_slices_or_more": stats(big),
            "those_structures": [n for n, r in rows.items() if mode in r and r.get("slices", 0) >= 40]}


def summarize(out, modes) -> dict:
    rows = out["structures"]
    summ = {}
    for mode in modes:
        recs = [r[mode] for r in rows.values() if mode in r]
        both = [(r[mode]["slices_to_0.90"], r["fbs_slices_to_0.90"]) for r in rows.values()
                if mode in r and r[mode]["slices_to_0.90"] and r["fbs_slices_to_0.90"]]
        after3 = [(r[mode]["dice"][3], r[mode]["fbs_same"][3]) for r in rows.values()
                  if mode in r and len(r[mode]["dice"]) > 3]
        summ[mode] = {
            "dice_per_step_mean": [round(float(np.mean([rec["dice"][n] for rec in recs if len(rec["dice"]) > n])), 4)
                                   for n in range(max(len(rec["dice"]) for rec in recs))] if recs else [],
            "reached_0.90": sum(1 for rec in recs if rec["slices_to_0.90"]),
            "slices_to_0.90_vs_fbs_where_both": both,
            "ratio_mean_where_both": round(float(np.mean([a / b for a, b in both])), 3) if both else None,
            "worse_than_fbs": [n for n, r in rows.items() if mode in r and r[mode]["slices_to_0.90"]
                               and r["fbs_slices_to_0.90"] and r[mode]["slices_to_0.90"] > r["fbs_slices_to_0.90"]],
            "after_3_minus_fbs_same_mean": round(float(np.mean([a - b for a, b in after3])), 4) if after3 else None,
            "repropagation_seconds_mean": round(float(np.mean([s for rec in recs for s in rec["repropagation_seconds"]])), 2)
            if recs else None,
            "confidence_spearman": confidence_study(recs, PropagationConfig()),
        }
        rep = [v for rec in recs for v in rec["repropagation_seconds"]]
        if rep:
            first = [rec["repropagation_seconds"][0] for rec in recs if rec["repropagation_seconds"]]
            summ[mode]["repropagation_seconds"] = {
                "median": round(float(np.median(rep)), 2), "max": max(rep),
                "first_correction_median": round(float(np.median(first)), 2),
                "cpu_median": round(float(np.median([v for rec in recs
                                                     for v in rec.get("repropagation_cpu_seconds", [])] or [0])), 2),
                "encoded_per_step_mean": round(float(np.mean([v for rec in recs for v in rec["encoded"]])), 2),
                # the condition, "cached embeddings": the steps that encoded nothing, and among them
                # those of structures of at least 40 slices (wall time depends on the host's load: CPU too)
                "cached": cached_steps(rows, mode)}
        if recs and recs[0]["adapt_seconds"]:
            summ[mode]["adapt_seconds_mean"] = round(float(np.mean([s for rec in recs for s in rec["adapt_seconds"]])), 2)
            cpu = [v for rec in recs for v in rec.get("adapt_cpu_seconds", [])]
            summ[mode]["adapt_cpu_seconds"] = {"median": round(float(np.median(cpu)), 2), "max": max(cpu)} if cpu else None
    for g in [m for m in modes if m.startswith("guided")] if "oracle" in modes else []:
        o = "oracle_adapt" if g.endswith("_adapt") and "oracle_adapt" in modes else "oracle"
        pairs = [(r[g]["slices_to_0.90"], r[o]["slices_to_0.90"]) for r in rows.values()
                 if g in r and o in r and r[g]["slices_to_0.90"] and r[o]["slices_to_0.90"]]
        key = "guided_minus_oracle_slices_to_0.90" + ("" if g == "guided" else f"[{g}]")
        summ[key] = round(float(np.mean([a - b for a, b in pairs])), 2) if pairs else None
    summ["visited_vs_extent"] = {n: {"extent": r["extent"], "visited": r[modes[0]]["first_propagation"]["visited"],
                                     "result": r[modes[0]]["first_propagation"]["result_extent"]}
                                 for n, r in rows.items() if modes[0] in r}
    return summ


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--structures", nargs="+", default=DEFAULT)
    p.add_argument("--modes", nargs="+", default=["guided", "oracle"],
                   help="guided, oracle, or guided:POLICY (policy_order: tau5, tau3, dist, ends, boxN, model, gain)")
    p.add_argument("--review-models", help='JSON {volume or "*": {"order": [[feature, weight], ...], '
                   '"confidence": [...]}} for guided:model (per volume: weights fitted without its dataset)')
    p.add_argument("--corrections", type=int, default=10)
    p.add_argument("--adapt", action="store_true", help="also run every mode with online adaptation (MODE_adapt)")
    p.add_argument("--adapt-min", type=int, default=1, metavar="N",
                   help="--adapt: adapt only from N or more corrected slices holding the structure (default 1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--tmp", default="/tmp/bench_i10")
    p.add_argument("--out", help="write the JSON here too")
    p.add_argument("--resume", help="JSON file: skip the structures it holds, rewrite it after every structure")
    p.add_argument("--part", help="i/n: run every n-th structure from the i-th (for n parallel processes)")
    p.add_argument("--merge", nargs="+", help="merge these result files (no benchmark run)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    res = merge(args.merge) if args.merge else run(args)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def _exit_now(code: int) -> None:
    """Leave without the interpreter's teardown: on this host a finished run aborted in it (glibc
    "malloc_consolidate(): unaligned fastbin chunk detected", exit 134) after every result was written,
    with and without the sessions closed (known problem, cause not found: OpenVINO / torch teardown)."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
