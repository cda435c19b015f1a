"""Soak: 1,000 prompts in one session (boxes, clicks, undo, slice changes) with a bounded embedding
cache; resident memory (psutil RSS) must stay within 10 % of its level after the first 100 prompts.

The session runs on the default path a user gets (``load_model`` with ``runtime="auto"``: OpenVINO on
this kind of CPU, bf16 when its masks agree with fp32), with 1 inference thread. Marked ``slow``
(minutes). As a report: ``python Testing/Python/test_soak.py [--prompts 1000]`` prints each curve
point as one JSON line as it is measured (flushed), then the summary as JSON with the CPU, its ISA
flags and the runtime. Every box jitters by up to 3 pixels, so each box is a new crop and encode;
clicks and undos reuse the slice's embedding (decoder calls).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
for sub in ("MedFMTrain", "MedFMSegment"):
    if str(REPO / sub) not in sys.path:
        sys.path.insert(0, str(REPO / sub))

SLICES = (80, 84, 88, 92)  # axial slices of Colin27 through the thalami
BOX = (70.0, 95.0, 110.0, 135.0)
BOUND_PCT = 10.0


def soak(volume, model, prompts: int = 1000, every: int = 50, cache_bytes: int = 64 << 20,
         on_point: Optional[Callable[[dict], None]] = None) -> dict:
    """Run ``prompts`` prompts in one session; ``on_point`` gets each curve point as it is measured."""
    import psutil

    from MedFMSegmentLib.session import PromptSession

    proc = psutil.Process()
    session = PromptSession(model, cache_bytes=cache_bytes)
    session.set_volume(*volume)
    rng = np.random.default_rng(0)
    curve, t0, counts = [], time.perf_counter(), {"box": 0, "click": 0, "undo": 0, "reset": 0}
    cpu0 = proc.cpu_times()
    for n in range(1, prompts + 1):
        k = SLICES[n % len(SLICES)] if n % 7 == 0 else SLICES[(n // 25) % len(SLICES)]
        x0, y0, x1, y1 = (v + rng.uniform(-3, 3) for v in BOX)
        kind = n % 5
        if kind == 0 or session.slice_state("axial", k) is None:
            session.add_box("axial", k, (x0, y0, x1, y1))
            counts["box"] += 1
        elif kind in (1, 2):
            session.add_point(axis="axial", index=k, xy_slice=(rng.uniform(x0, x1), rng.uniform(y0, y1)),
                              positive=kind == 1)
            counts["click"] += 1
        elif kind == 3:
            session.undo()
            counts["undo"] += 1
        else:
            session.reset()
            counts["reset"] += 1
        if n % every == 0:
            cpu = proc.cpu_times()
            point = {"prompts": n, "rss_mb": round(proc.memory_info().rss / 2**20, 1),
                     "cache_mb": round(session.cache.nbytes / 2**20, 1),
                     "seconds": round(time.perf_counter() - t0, 1),
                     "cpu_seconds": round(cpu.user + cpu.system - cpu0.user - cpu0.system, 1)}
            curve.append(point)
            if on_point is not None:
                on_point(point)
    session.close()
    after = [c for c in curve if c["prompts"] >= 100] or curve[-1:]
    ref = after[0]["rss_mb"]
    worst = max(after, key=lambda c: abs(c["rss_mb"] - ref))["rss_mb"]
    return {"prompts": prompts, "kinds": counts, "rss_after_100_mb": ref,
            "rss_max_mb": max(c["rss_mb"] for c in after), "rss_min_mb": min(c["rss_mb"] for c in after),
            "max_deviation_pct": round(100 * abs(worst - ref) / ref, 2),
            "growth_pct": round(100 * (max(c["rss_mb"] for c in after) - ref) / ref, 2), "curve": curve}


def default_model(threads: int = 1):
    """The model as a user's session gets it (runtime auto), on the CPU with ``threads`` threads."""
    from MedFMSegmentLib import models

    return models.load_model("litemedsam", device="cpu", threads=threads)


def _print_point(point: dict) -> None:
    print(json.dumps(point), flush=True)


@pytest.mark.slow
def test_rss_is_flat_over_1000_prompts(colin27):
    model = default_model()
    result = soak(colin27, model, on_point=_print_point)
    print(json.dumps({"runtime": model.runtime_info.get("runtime"), **result}))
    assert result["max_deviation_pct"] <= BOUND_PCT, result


def main() -> None:
    from MedFMSegmentLib import io, runtimes

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50, help="prompts between curve points")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    a = parser.parse_args()
    volume = io.read_volume(Path(a.data) / "colin27" / "ch2.nii.gz")
    t0 = time.perf_counter()
    model = default_model(a.threads)
    info = {k: v for k, v in model.runtime_info.items() if k != "cpu"}
    print(json.dumps({"cpu": runtimes.cpu_info().as_dict(), "model_load_seconds": round(time.perf_counter() - t0, 1),
                      **info}), flush=True)
    result = soak(volume, model, a.prompts, a.every, on_point=_print_point)
    result["within_bound"] = result["max_deviation_pct"] <= BOUND_PCT
    print(json.dumps({"cpu": runtimes.cpu_info().as_dict(), "runtime": info, **result}, indent=1), flush=True)


if __name__ == "__main__":
    main()
