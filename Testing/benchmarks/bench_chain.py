"""Detector-to-SAM chain benchmark on ../shared/data; prints JSON.

    python Testing/benchmarks/bench_chain.py [--margin 2] [--structures ...]

The label-map detector reads boxes from the AAL atlas labels (tight per-slice boxes enlarged by
``--margin`` voxels); the chain segments every slice of each label with LiteMedSAM. Reported per
structure: 3D Dice, the model-free baseline on the same boxes (an ellipse inscribed in each
per-slice box), and the time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "MedFMSegment")]

import datasets as D  # noqa: E402
from MedFMSegmentLib import detectors  # noqa: E402
from MedFMSegmentLib.chain import detect_and_segment  # noqa: E402
from MedFMSegmentLib.session import PromptSession  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--structures", nargs="*", default=D.DEEP_GREY)
    p.add_argument("--margin", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (same masks, faster)")
    args = p.parse_args(argv)
    if not D.available():
        sys.exit(f"shared data not found at {D.DATA}")
    torch.set_num_threads(args.threads)
    array, m = D.volumes()["mri"]
    aal, _ = D.read(D.DATA / "colin27" / "aal.nii.gz")
    values = {D.AAL[n][0]: n for n in args.structures}
    det = detectors.LabelmapDetector(aal, m, labels=values)
    session = PromptSession(precision=args.precision, compile=args.compile)
    session.model.encode(np.zeros((session.model.input_size,) * 2, np.float32))  # compile / warm up, not timed
    t0 = time.perf_counter()
    masks, report = detect_and_segment(session, det, array, m, margin_vox=args.margin)
    seconds = time.perf_counter() - t0
    plan = detectors.detections_to_slice_boxes(det.detect(array, m), array.shape, "axial", margin_vox=args.margin)
    structs = D.structures()
    rows = {}
    for name in args.structures:
        gt = structs[name].mask
        ell = np.zeros_like(gt)
        for index, box in plan.get(name, []):
            ell[index] |= D.ellipse_in_box(gt[index].shape, box)
        rows[name] = {"dice": round(D.dice(masks.get(name, np.zeros_like(gt)), gt), 3),
                      "ellipse_same_boxes": round(D.dice(ell, gt), 3), "slices": len(plan.get(name, []))}
    out = {"per_structure": rows,
           "mean": {k: round(statistics.mean(r[k] for r in rows.values()), 3) for k in ("dice", "ellipse_same_boxes")},
           "seconds_total": round(seconds, 1), "slices_total": sum(r["slices"] for r in rows.values()),
           "margin_vox": args.margin, "precision": args.precision, "compile": args.compile, "threads": args.threads}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
