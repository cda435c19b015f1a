"""Cohort throughput: ``medfm batch`` serial vs ``--cluster local:1`` vs ``--cluster local:2``, one run.

The cohort is made at run time in a temporary folder (never committed): 3-slice crops of the shared
data around 7 structures (Colin27 thalamus / putamen / caudate, the head CT's head, the chest CT's
aorta and T12 vertebra, the brain MRI's tumour), each with a one-slice box prompt (the ground-truth
box + 5 px on the middle slice, ``propagate: false``): one image encoding per case.

Each mode runs the real CLI in a subprocess (model loading included, as a user would see it) while
psutil samples the resident memory of the driver and of every worker process. Reported:

- wall time per mode and the speedup against serial;
- scheduler overhead per case: (task start on the worker - the later of its submission and the end of
  that worker's previous case) + (result at the driver - task end), from wall-clock stamps; and the
  idle time per case = (run loop time x workers - sum of per-case times) / cases, which also counts
  workers waiting at the end of the cohort (for serial: the driver's own bookkeeping);
- peak RSS per worker process (and of the driver);
- per-case segmentation time (model already loaded) and the projected throughput for N workers,
  N / (per-case time + overhead), assuming each worker has its own cores;
- whether the three runs wrote identical ``CASE.seg.nrrd`` bytes.

    .venv/bin/python Testing/benchmarks/bench_cohort.py [--modes serial,local:1,local:2] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("MEDFM_SHARED_DATA", REPO.parent / "shared" / "data"))
PYTHONPATH = os.pathsep.join(str(REPO / p) for p in ("MedFMSegment", "MedFMTrain"))

# case: (volume, mask, label value or None for mask > 0)
STRUCTURES = {
    "colin_thalamus_l": ("colin27/ch2.nii.gz", "colin27/aal.nii.gz", 77),
    "colin_putamen_r": ("colin27/ch2.nii.gz", "colin27/aal.nii.gz", 74),
    "colin_caudate_l": ("colin27/ch2.nii.gz", "colin27/aal.nii.gz", 71),
    "ct_head": ("cranium_ct/cranium_ct.nrrd", "cranium_ct/cranium_head_thr-142.nrrd", None),
    "chest_aorta": ("chest_ct/chest_ct.nii.gz", "chest_ct/aorta.nii.gz", None),
    "chest_t12": ("chest_ct/chest_ct.nii.gz", "chest_ct/vertebrae_T12.nii.gz", None),
    "mr_tumour": ("brain_tumour_mr/brain1_image.nrrd", "brain_tumour_mr/brain1_label.nrrd", None),
}


def cpu_info() -> dict:
    model, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model.strip():
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    isa = sorted(f for f in flags if f.startswith(("avx", "amx", "sse4", "fma", "f16c")))
    return {"cpu": model, "cores": os.cpu_count(), "isa_flags": isa}


def make_cohort(folder: Path) -> int:
    cases, prompts = folder / "cases", folder / "prompts"
    cases.mkdir(parents=True)
    prompts.mkdir()
    for name, (volume, mask, label) in STRUCTURES.items():
        image = sitk.ReadImage(str(DATA / volume))
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / mask)))  # [k, j, i]
        target = labels == label if label is not None else labels > 0
        ks = np.nonzero(target.any(axis=(1, 2)))[0]
        k = int(ks[len(ks) // 2])
        j, i = np.nonzero(target[k])
        box = [[max(int(i.min()) - 5, 0), max(int(j.min()) - 5, 0), 1],
               [min(int(i.max()) + 5, target.shape[2] - 1), min(int(j.max()) + 5, target.shape[1] - 1), 1]]
        k0 = max(k - 1, 0)
        sitk.WriteImage(image[:, :, k0:k0 + 3], str(cases / f"{name}.nrrd"), True)
        box[0][2] = box[1][2] = k - k0
        (prompts / f"{name}.json").write_text(json.dumps({"space": "IJK", "segments": [
            {"name": name, "boxes": [{"corners": box, "axis": "axial"}], "propagate": False}]}), encoding="utf-8")
    return len(STRUCTURES)


class RssSampler(threading.Thread):
    """Peak RSS (MB) of a process and all its descendants, by pid, sampled every 50 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.peak = {}
        self.stop = threading.Event()

    def run(self):
        import psutil

        while not self.stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.Error:
                break
            for p in procs:
                try:
                    rss = p.memory_info().rss / 2 ** 20
                except psutil.Error:
                    continue
                self.peak[p.pid] = max(self.peak.get(p.pid, 0.0), rss)
            time.sleep(0.05)


def _dispatch_overheads(rows) -> list:
    """Per case: what Dask adds around the worker's own time (wall clocks of one machine).

    (worker start - the later of submission and the end of the worker's previous case)
    + (result received by the driver - worker end). Serial rows have no submission stamps: [].
    """
    out, previous_end = [], {}
    for r in sorted((r for r in rows if r.get("submitted_at")), key=lambda r: r["started_at"]):
        ready = max(r["submitted_at"], previous_end.get(r["worker"], 0.0))
        out.append(max(r["started_at"] - ready, 0.0) + max(r["received_at"] - r["ended_at"], 0.0))
        previous_end[r["worker"]] = r["ended_at"]
    return out


def run_mode(folder: Path, mode: str) -> dict:
    out = folder / f"out_{mode.replace(':', '_')}"
    argv = [sys.executable, "-m", "MedFMSegmentLib.cli", "-q", "batch", str(folder / "cases"),
            "--prompts-dir", str(folder / "prompts"), "--output-dir", str(out)]
    if mode != "serial":
        argv += ["--cluster", mode]
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = RssSampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate(timeout=1800)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join(2)
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: exit {proc.returncode}\n{stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    rows = summary["cases"]
    workers = sorted({r.get("worker_pid") or proc.pid for r in rows})
    n_workers = len({r["worker"] for r in rows})
    case_sum = sum(r["seconds"] for r in rows)
    segment = [r["segment_seconds"] for r in rows if r.get("segment_seconds") is not None]
    dispatch = _dispatch_overheads(rows)
    return {
        "mode": mode, "wall_s": round(wall, 2), "loop_s": summary["seconds"], "startup_s": round(wall - summary["seconds"], 2),
        "cases": len(rows), "workers": n_workers, "case_seconds_sum": round(case_sum, 2),
        "idle_per_case_s": round((summary["seconds"] * n_workers - case_sum) / len(rows), 3),
        "overhead_per_case_s": round(statistics.mean(dispatch), 3) if dispatch else None,
        "overhead_per_case_max_s": round(max(dispatch), 3) if dispatch else None,
        "segment_s_median": round(statistics.median(segment), 3),
        "first_case_s_per_worker": {str(w): max(r["seconds"] for r in rows if (r.get("worker_pid") or proc.pid) == w)
                                    for w in workers},
        "peak_rss_mb_driver": round(sampler.peak.get(proc.pid, 0.0), 1),
        "peak_rss_mb_per_worker": [round(sampler.peak.get(w, 0.0), 1) for w in workers if w != proc.pid]
                                  or [round(sampler.peak.get(proc.pid, 0.0), 1)],
        "torch_threads_per_worker": summary.get("torch_threads_per_worker"),
        "statuses": sorted({r["status"] for r in rows}),
        "_out": str(out),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="serial,local:1,local:2")
    parser.add_argument("--keep", help="keep the cohort and outputs in this folder")
    args = parser.parse_args(argv)
    if not (DATA / "colin27" / "ch2.nii.gz").is_file():
        raise SystemExit(f"shared data not found at {DATA}")
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="medfm-bench-cohort-"))
    try:
        n = make_cohort(folder)
        results = [run_mode(folder, mode) for mode in args.modes.split(",")]
        reference = results[0]
        names = sorted(p.name for p in Path(reference["_out"]).glob("*.seg.nrrd"))
        identical = all((Path(r["_out"]) / name).read_bytes() == (Path(reference["_out"]) / name).read_bytes()
                        for r in results[1:] for name in names)
        for r in results:
            r["speedup_vs_" + reference["mode"]] = round(reference["wall_s"] / r["wall_s"], 2)
            r.pop("_out")
        one_thread = next((r for r in results if r["mode"] == "local:2"), results[-1])
        overhead = max((r["overhead_per_case_s"] for r in results if r["overhead_per_case_s"] is not None),
                       default=0.0)
        per_case = one_thread["segment_s_median"]
        report = {
            "benchmark": "bench_cohort", **cpu_info(), "cohort_cases": n, "seg_bytes_identical_across_modes": identical,
            "modes": results,
            "overhead_target_s": 0.5, "overhead_max_s": overhead, "overhead_within_target": overhead <= 0.5,
            "projection": {"per_case_segment_s_1_thread": per_case, "overhead_s": overhead,
                           "cases_per_hour": {str(k): round(k * 3600 / (per_case + overhead))
                                              for k in (1, 2, 4, 8, 16, 32, 64)},
                           "assumes": "each worker its own core(s); model load once per worker not included"},
        }
        print(json.dumps(report, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
