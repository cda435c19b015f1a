"""Soak: 1,000 prompts in one session (boxes, clicks, undo, slice changes) with a bounded embedding
cache; resident memory (psutil RSS) must stay within 10 % of its level after the first 100 prompts.

Marked ``slow`` (minutes). As a report: ``python Testing/Python/test_soak.py [--prompts 1000]`` prints
the RSS curve as JSON with the CPU. Few slices are reused, so the time is mostly decoder calls.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
for sub in ("MedFMTrain", "MedFMSegment"):
    if str(REPO / sub) not in sys.path:
        sys.path.insert(0, str(REPO / sub))

SLICES = (80, 84, 88, 92)  # axial slices of Colin27 through the thalami
BOX = (70.0, 95.0, 110.0, 135.0)


def soak(volume, model, prompts: int = 1000, every: int = 50, cache_bytes: int = 64 << 20) -> dict:
    import psutil

    from MedFMSegmentLib.session import PromptSession

    proc = psutil.Process()
    session = PromptSession(model, cache_bytes=cache_bytes)
    session.set_volume(*volume)
    rng = np.random.default_rng(0)
    curve, t0 = [], time.perf_counter()
    for n in range(1, prompts + 1):
        k = SLICES[n % len(SLICES)] if n % 7 == 0 else SLICES[(n // 25) % len(SLICES)]
        x0, y0, x1, y1 = (v + rng.uniform(-3, 3) for v in BOX)
        kind = n % 5
        if kind == 0 or session.slice_state("axial", k) is None:
            session.add_box("axial", k, (x0, y0, x1, y1))
        elif kind in (1, 2):
            session.add_point(axis="axial", index=k, xy_slice=(rng.uniform(x0, x1), rng.uniform(y0, y1)),
                              positive=kind == 1)
        elif kind == 3:
            session.undo()
        else:
            session.reset()
        if n % every == 0:
            curve.append({"prompts": n, "rss_mb": round(proc.memory_info().rss / 2**20, 1),
                          "cache_mb": round(session.cache.nbytes / 2**20, 1),
                          "seconds": round(time.perf_counter() - t0, 1)})
    session.close()
    ref = next(c["rss_mb"] for c in curve if c["prompts"] >= 100)
    worst = max(c["rss_mb"] for c in curve if c["prompts"] >= 100)
    return {"prompts": prompts, "rss_after_100_mb": ref, "rss_max_mb": worst,
            "growth_pct": round(100 * (worst - ref) / ref, 2), "curve": curve}


@pytest.mark.slow
def test_rss_is_flat_over_1000_prompts(colin27, litemedsam):
    result = soak(colin27, litemedsam)
    print(json.dumps(result))
    assert result["growth_pct"] <= 10.0, result


def main() -> None:
    import torch

    from MedFMSegmentLib import io, models

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    a = parser.parse_args()
    torch.set_num_threads(1)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    volume = io.read_volume(Path(a.data) / "colin27" / "ch2.nii.gz")
    result = soak(volume, models.load_model("litemedsam", device="cpu"), a.prompts)
    print(json.dumps({"cpu": cpu, "isa": torch.backends.cpu.get_cpu_capability(), "torch_threads": 1, **result},
                     indent=1))


if __name__ == "__main__":
    main()
