"""Latency benchmark: every encoder runtime x precision on this machine, in one run; prints JSON.

    python Testing/benchmarks/bench_latency.py [--slices 6] [--rounds 3] [--threads 1 2] [--e2e-slices 40]
                                               [--compile] [--slow-bf16] [--p2m-only] [--out FILE]

At the top: the CPU model and ISA flags. Per thread count, rounds interleaved (each round runs every
runtime over the same slices, in turn):
- per-slice encoder time (median), its ratio to torch eager fp32 measured in the same rounds;
- max abs embedding difference and mask agreement (Dice of the masks from each slice's box) with
  torch fp32; ground-truth Dice on the shared data (deep-grey structures, +5 px boxes) beside the
  ellipse-in-box baseline;
- prompt-to-mask with a cached embedding (a second box on an encoded slice): median wall and CPU time per
  call, split into the embedding from the cache, the prompt encoder, the decoder, resampling the logits to the
  slice, the kept components and the rest; ``--p2m-only``: only this, for the automatic runtime, on real slices
  of the four datasets, per ``--threads`` (``--cache-dir`` to reuse an export cache);
- the one-time export + check cost (into a fresh cache folder) and the resident size after loading;
- ``--memory`` / ``--memory-only``: the one-time export of the automatic runtime (timed), then a 512x512x300 CT
  session in a fresh process (1 thread), its resident size after each step (imports, model, volume, prompts,
  full cache), the heavy modules imported by then (torch, timm, ...) and a digest of its masks;
  ``--memory-code TREE``: also another source tree (e.g. an export of main), interleaved, for a before / after,
  and each tree's masks on real sessions (chest CT aorta, Colin27 Thalamus_L), to compare them bitwise.
bf16 is measured only on CPUs with native bf16 (``--slow-bf16`` forces it: 5-6x slower on AVX2).
Also: fp16 storage of embeddings (mask agreement with fp32), and end to end, the 40-slice structures
(Hippocampus_L ROI on Colin27; the chest CT aorta, 40 axial slices) with today's default (torch eager
fp32, windows per slice, no encoding ahead) against the new default (auto runtime, reused windows, with
and without encoding ahead), ground-truth Dice beside the ellipsoid-in-ROI baseline.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "MedFMSegment"), str(HERE.parents[1] / "MedFMTrain")]

import datasets as D  # noqa: E402
from MedFMSegmentLib import geometry, models, runtimes  # noqa: E402
from MedFMSegmentLib.preprocess import model_to_slice, slice_to_model  # noqa: E402
from MedFMSegmentLib.propagate import segment_roi  # noqa: E402
from MedFMSegmentLib.session import PromptSession, SessionConfig  # noqa: E402


def rss_mb() -> float:
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def cases(n: int):
    """(slice index, +5 px box, ground truth) on axial Colin27 slices of the deep-grey structures."""
    structs = D.structures()
    out = []
    for name in D.DEEP_GREY:
        mask = structs[name].mask
        for index in D.sample_slices(mask, "axial", 1):
            gt = geometry.get_slice(mask, "axial", index)
            out.append((name, index, D.padded_box(gt, 5), gt))
    return out[:n]


def mask_from(model, emb, crop, box, shape):
    logits, _ = model.decode(emb, crop.box_to_model(box), fast=False)  # the same (torch) decoder for all
    return (model_to_slice(logits[0], crop, shape) > 0).astype(np.uint8)


def encoder_rounds(args, threads: int, volume, cache_root: Path) -> dict:
    torch.set_num_threads(threads)
    ref_session = PromptSession(runtime="torch", threads=threads)
    ref_session.set_volume(*volume)
    inputs = []
    for name, index, box, gt in cases(args.slices):
        crop = ref_session.crop_for("axial", box)
        inputs.append((name, index, box, gt, crop, slice_to_model(ref_session.normalised_slice("axial", index), crop)))
    variants = {"torch_eager_fp32": {"runtime": "torch", "precision": "fp32"}}
    if args.compile:
        variants["torch_compile_fp32"] = {"runtime": "torch", "precision": "fp32", "compile": True}
    native = runtimes.cpu_info().native_bf16
    if native or args.slow_bf16:
        variants["torch_bf16"] = {"runtime": "torch", "precision": "bf16"}
    if runtimes.openvino_available():
        variants["openvino_fp32"] = {"runtime": "openvino", "precision": "fp32"}
        if native or args.slow_bf16:
            variants["openvino_bf16"] = {"runtime": "openvino", "precision": "bf16"}
    loaded, res = {}, {}
    for name, kw in variants.items():
        t = time.perf_counter()
        m = models.load_model("litemedsam", threads=threads, cache_dir=cache_root, **kw)
        first = time.perf_counter()
        m.encode(inputs[0][5])  # warm-up / torch.compile, not timed per slice
        res[name] = {"load_seconds": round(first - t, 2), "first_encode_seconds": round(time.perf_counter() - first, 2),
                     "rss_after_load_mb": rss_mb(), "runtime_info": {k: v for k, v in m.runtime_info.items()
                                                                     if k not in ("cpu",)}, "times": []}
        loaded[name] = m
        logging.warning("threads=%d %s loaded: %s", threads, name, {k: v for k, v in res[name].items() if k != "times"})
    bf16 = loaded.get("openvino_bf16")
    forced = {}  # benchmark only: bf16 as the gate would refuse it, and the whole graph in bf16 (no fp32 stem)
    if bf16 is not None and bf16.runtime_info["precision"] != "bf16":
        entry = Path(bf16.runtime_info["exports"]["encoder_bf16"]["cache"])
        forced["openvino_bf16_ungated"] = ("OpenVINO bf16 forced past the automatic gate", entry)
    if bf16 is not None and "openvino_fp32" in loaded:
        entry = Path(loaded["openvino_fp32"].runtime_info["exports"]["encoder_fp32"]["cache"])
        forced["openvino_bf16_whole_graph"] = ("OpenVINO bf16 on the whole encoder graph (the stem in bf16 too)", entry)
    for name, (note, entry) in forced.items():
        m = models.load_model("litemedsam", runtime="openvino", precision="fp32", threads=threads, cache_dir=cache_root)
        shape = (1, 3, m.input_size, m.input_size)
        if (entry / "stem.xml").is_file():  # the stem in fp32, the rest in bf16 (openvino_model.encoder_stem_and_rest)
            stem = runtimes.OpenVINOModel(entry / "stem.xml", "fp32", threads, shape)
            m._fast_encoder = runtimes.ChainedModel(
                [stem, runtimes.OpenVINOModel(entry / "model.xml", "bf16", threads, stem.output_shape())])
        else:
            m._fast_encoder = runtimes.OpenVINOModel(entry / "model.xml", "bf16", threads, shape)
        m.precision = "bf16"
        m.encode(inputs[0][5])
        res[name] = {"note": f"{note} (benchmark only)", "rss_after_load_mb": rss_mb(), "times": [],
                     "gate_check": bf16.runtime_info["exports"]["encoder_bf16"]["check"]}
        loaded[name] = m
        variants[name] = {}
    embs = {name: [None] * len(inputs) for name in variants}
    for _ in range(args.rounds):  # interleaved: every variant over the same slices, in turn, each round
        for name, m in loaded.items():
            for i, inp in enumerate(inputs):
                t = time.perf_counter()
                emb = m.encode(inp[5])
                res[name]["times"].append(time.perf_counter() - t)
                embs[name][i] = torch.as_tensor(emb)  # numpy from OpenVINO, a tensor from torch
            logging.warning("threads=%d round %d %s: median so far %.3f s/slice (load %.2f)", threads, _, name,
                            statistics.median(res[name]["times"]), os.getloadavg()[0])
    ref_model = loaded["torch_eager_fp32"]
    ref_masks = [mask_from(ref_model, e, inp[4], inp[2], inp[3].shape) for e, inp in zip(embs["torch_eager_fp32"], inputs)]
    ref_time = statistics.median(res["torch_eager_fp32"]["times"])
    for name, m in loaded.items():
        masks = [mask_from(ref_model, e, inp[4], inp[2], inp[3].shape) for e, inp in zip(embs[name], inputs)]
        med = statistics.median(res[name]["times"])
        res[name].update(
            encoder_median_s=round(med, 4), ratio_to_torch_eager_fp32=round(med / ref_time, 3),
            max_abs_diff=float(max((a - b).abs().max() for a, b in zip(embs[name], embs["torch_eager_fp32"]))),
            agreement_dice_mean=round(statistics.mean(runtimes.dice(a, b) for a, b in zip(masks, ref_masks)), 5),
            agreement_dice_min=round(min(runtimes.dice(a, b) for a, b in zip(masks, ref_masks)), 5),
            gt_dice_mean=round(statistics.mean(D.dice(a, inp[3]) for a, inp in zip(masks, inputs)), 4))
        res[name]["times"] = [round(t, 3) for t in res[name]["times"]]
    res["ellipse_in_box_gt_dice_mean"] = round(statistics.mean(D.dice(D.ellipse_in_box(inp[3].shape, inp[2]), inp[3])
                                                               for inp in inputs), 4)
    # fp16 storage of the embeddings: masks against fp32 storage
    f16 = [mask_from(ref_model, e.half().float(), inp[4], inp[2], inp[3].shape)
           for e, inp in zip(embs["torch_eager_fp32"], inputs)]
    res["fp16_cache_agreement_dice_min"] = round(min(runtimes.dice(a, b) for a, b in zip(f16, ref_masks)), 5)
    res["prompt_to_mask"] = prompt_to_mask(args, loaded, volume, inputs)
    res["slices"] = [f"{inp[0]}@{inp[1]}" for inp in inputs]
    ref_session.close()
    del loaded
    gc.collect()
    return res


SPLIT = ("embedding", "prompt_encoder", "decoder", "resample", "components")


@contextlib.contextmanager
def timed_split(model, acc: dict):
    """Accumulate wall and CPU seconds per stage of a prompt-to-mask call into ``acc`` (benchmark only: the
    stages' functions are wrapped while the block runs, then restored)."""
    from MedFMSegmentLib import session as session_module

    def wrap(owner, name, label):
        had = name in vars(owner)
        original = vars(owner)[name] if had else None
        f = getattr(owner, name)

        def timed(*a, **k):
            t, c = time.perf_counter(), time.process_time()
            try:
                return f(*a, **k)
            finally:
                d = acc.setdefault(label, [0.0, 0.0])
                d[0] += time.perf_counter() - t
                d[1] += time.process_time() - c
        setattr(owner, name, timed)
        return owner, name, had, original

    decoder_owner = (model, "_fast_decoder") if model._fast_decoder is not None else (model.net.mask_decoder, "forward")
    saved = [wrap(session_module, "model_to_slice", "resample"),
             wrap(session_module, "keep_components_touching", "components"),
             wrap(session_module.PromptSession, "embedding", "embedding"),
             # the light prompt encoder (no torch net), else the net's
             wrap(model, "_prompt_encoder", "prompt_encoder") if model._prompt_encoder is not None
             else wrap(model.net.prompt_encoder, "forward", "prompt_encoder"),
             wrap(*decoder_owner, "decoder")]
    try:
        yield acc
    finally:
        for owner, name, had, original in reversed(saved):
            if had:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


def prompt_to_mask(args, loaded, volume, inputs, names=("torch_eager_fp32", "openvino_fp32")) -> dict:
    """A second, slightly smaller box on an already encoded slice (decoder + postprocessing only): median wall
    and CPU time (``time.process_time``: all of the process's threads) per call, split by stage (the embedding
    from the cache, the prompt encoder, the decoder, resampling the logits to the slice, the kept components;
    "other": the rest, Python and the session's bookkeeping); rounds interleaved over the sessions. Each slice
    then gets a third box at once (``repeat``: the user adjusting a box on the slice they look at)."""
    out = {}
    sessions = {}
    for name in names:
        if name in loaded:
            sessions[name] = []
            for vol, cases_ in (volume if isinstance(volume, list) else [(volume, inputs)]):
                s = PromptSession(loaded[name])
                s.set_volume(*vol)
                for _, index, box, _, _, _ in cases_:
                    s.add_box("axial", index, box)
                sessions[name].append((s, cases_))
    rows = {(name, kind): [] for name in sessions for kind in ("first", "repeat")}
    for _ in range(args.rounds):
        for name, pairs in sessions.items():
            for s, cases_ in pairs:
                for _, index, (x0, y0, x1, y1), _, _, _ in cases_:
                    for kind, d in (("first", 1), ("repeat", 2)):
                        acc = {}
                        with timed_split(loaded[name], acc):
                            t, c = time.perf_counter(), time.process_time()
                            s.add_box("axial", index, (x0 + d, y0 + d, x1 - d, y1 - d))
                            total = [time.perf_counter() - t, time.process_time() - c]
                        acc["other"] = [total[i] - sum(v[i] for v in acc.values()) for i in (0, 1)]
                        acc["total"] = total
                        rows[name, kind].append(acc)
    for name in sessions:
        rs, rep = rows[name, "first"], rows[name, "repeat"]
        med = lambda rs, key, i: round(1000 * statistics.median(r.get(key, [0.0, 0.0])[i] for r in rs), 2)  # noqa: E731
        out[name] = {"median_ms": med(rs, "total", 0), "median_cpu_ms": med(rs, "total", 1), "calls": len(rs),
                     "decoder": loaded[name].runtime_info["decoder"],
                     "split_median_ms": {k: {"wall": med(rs, k, 0), "cpu": med(rs, k, 1)} for k in SPLIT + ("other",)},
                     "repeat_median_ms": med(rep, "total", 0), "repeat_median_cpu_ms": med(rep, "total", 1),
                     "repeat_split_median_ms": {k: {"wall": med(rep, k, 0), "cpu": med(rep, k, 1)}
                                                for k in SPLIT + ("other",)},
                     "load_average": list(os.getloadavg())}
    for pairs in sessions.values():
        for s, _ in pairs:
            s.close()
    return out


def p2m_cases(n_per_structure: int = 1):
    """Real slices for prompt-to-mask: (volume, [(name, index, +5 px box, gt, None, None)]) per dataset."""
    vols, structs = D.volumes(), D.structures()
    by_volume = {}
    for name in ("Thalamus_L", "Putamen_L", "Caudate_R", "Hippocampus_L", "Aorta", "T12", "CT_head", "Tumour"):
        st = structs[name]
        for index in D.sample_slices(st.mask, "axial", n_per_structure):
            gt = geometry.get_slice(st.mask, "axial", index)
            by_volume.setdefault(st.volume, []).append((name, index, D.padded_box(gt, 5), gt, None, None))
    return [(vols[v], c) for v, c in by_volume.items()]


def p2m_rounds(args, threads: int, cache_root: Path) -> dict:
    """Prompt-to-mask only, the automatic runtime (OpenVINO fp32 encoder + decoder here) at ``threads``."""
    torch.set_num_threads(threads)
    m = models.load_model("litemedsam", runtime="auto", threads=threads, cache_dir=cache_root)
    res = prompt_to_mask(args, {"auto": m}, p2m_cases(), None, names=("auto",))["auto"]
    res["runtime_info"] = {k: m.runtime_info.get(k) for k in ("runtime", "precision", "decoder", "threads")}
    return res


MEMORY_PROBE = r"""
import json, os, resource, sys
sys.path[:0] = {paths!r}
import psutil
rss = lambda: round(psutil.Process().memory_info().rss / 2**20, 1)
HEAVY = ("torch", "torchvision", "timm", "segment_anything", "openvino", "SimpleITK")
def peak_mb():  # VmHWM: this process's own peak (ru_maxrss keeps the parent's size from before exec on Linux)
    try:
        with open("/proc/self/status") as fh:
            return round(next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:")) / 1024, 1)
    except (OSError, StopIteration):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
steps, imported = {{"python": rss()}}, {{}}
def step(name):
    steps[name] = rss()
    imported[name] = [m for m in HEAVY if m in sys.modules]
import numpy as np
step("numpy_imported")
from MedFMSegmentLib import models
from MedFMSegmentLib.session import PromptSession
step("medfm_imported")
m = models.load_model("litemedsam", runtime={runtime!r}, threads=1, cache_dir={cache!r})
step("model_loaded")
s = PromptSession(m)  # the default cache
rng = np.random.default_rng(0)
vol = rng.integers(-1000, 1500, (300, 512, 512), dtype=np.int16)  # the caller's CT (150 MB)
vol[:, 200:300, 220:320] = 300
step("caller_volume")
s.set_volume(vol, np.diag([0.8, 0.8, 1.5, 1.0]))
step("set_volume")
masks = [s.add_box("axial", 150, (210, 190, 330, 310)).mask]
step("first_box")
masks.append(s.add_box("axial", 150, (211, 191, 329, 309)).mask)
masks.append(s.add_box("axial", 151, (210, 190, 330, 310)).mask)
step("three_boxes")
crop = s.crop_for("axial", (210, 190, 330, 310))
emb = s.embedding("axial", 150, crop)
for axis, n in (("axial", 300), ("coronal", 512)):  # every slice of two axes through the cache (values need not be real)
    for k in range(n):
        s.cache.put(s._key(axis, k, crop), emb + 0)  # a new embedding (torch tensor or numpy array, as the cache holds)
step("cache_filled")
import hashlib
print(json.dumps({{"rss_mb_steps": steps, "heavy_modules_imported": imported,
                  "torch_imported": "torch" in sys.modules, "torch_model_built": getattr(m, "torch_net_built", True),
                  "peak_rss_mb": peak_mb(),
                  "masks_sha256": hashlib.sha256(b"".join(np.ascontiguousarray(x).tobytes() for x in masks)).hexdigest()[:16],
                  "mask_voxels": [int(x.sum()) for x in masks], "code": {paths!r}[0],
                  "cache_mb": round(s.cache.nbytes / 2**20, 1), "cache_max_mb": s.cache.max_bytes >> 20,
                  "runtime": s.runtime_info["runtime"], "decoder": s.runtime_info["decoder"]}}))
"""


def memory(cache_root: Path, runtime: str = "auto", code: Optional[Path] = None, python: Optional[str] = None) -> dict:
    """A 512x512x300 CT session in a fresh process (1 thread): resident size after each step, the peak,
    which heavy modules were imported by then, and a digest of the three masks (to compare code trees).
    ``code``: the source tree to measure (default: this one), e.g. another checkout for a before/after;
    ``python``: the interpreter to run it in (default: this one), e.g. a venv with a CPU build of torch."""
    import subprocess

    root = Path(code) if code is not None else HERE.parents[1]
    paths = [str(root / "MedFMSegment"), str(root / "MedFMTrain")]
    script = MEMORY_PROBE.format(paths=paths, runtime=runtime, cache=str(cache_root))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDFM_THREADS": "1"}
    proc = subprocess.run([python or sys.executable, "-c", script], capture_output=True, text=True, timeout=1800,
                          env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load_average"] = list(os.getloadavg())
    return out


REAL_PROBE = r"""
import hashlib, json, sys
sys.path[:0] = {paths!r}
import numpy as np
from MedFMSegmentLib import io, models
from MedFMSegmentLib.propagate import propagate
from MedFMSegmentLib.session import PromptSession
data = {data!r}
m = models.load_model("litemedsam", runtime="auto", threads=1, cache_dir={cache!r})
digest, voxels = hashlib.sha256(), []
def keep(mask):
    digest.update(np.ascontiguousarray(mask).tobytes())
    voxels.append(int(np.count_nonzero(mask)))
for image, label, value in (("chest_ct/chest_ct.nii.gz", "chest_ct/aorta.nii.gz", None),
                            ("colin27/ch2.nii.gz", "colin27/aal.nii.gz", 77)):
    vol, ijk_to_ras = io.read_volume(data + "/" + image)
    lab = io.read_volume(data + "/" + label)[0]
    gt = lab > 0 if value is None else lab == value
    ks = np.flatnonzero(gt.any(axis=(1, 2)))
    k = int(ks[len(ks) // 2])
    ys, xs = np.nonzero(gt[k])
    box = (max(xs.min() - 5, 0), max(ys.min() - 5, 0), xs.max() + 5, ys.max() + 5)
    s = PromptSession(m)
    s.set_volume(vol, ijk_to_ras)
    first = s.add_box("axial", k, box).mask
    keep(first)
    y, x = np.argwhere(first)[0]  # a negative click on the mask's first pixel: a local cut
    keep(s.add_point(axis="axial", index=k, xy_slice=(float(x), float(y)), positive=False).mask)
    keep(s.add_box("axial", k + 2, box).mask)
    keep(propagate(s, axis="axial", limits=(k - 6, k + 6)).mask)
    s.close()
print(json.dumps({{"masks_sha256": digest.hexdigest()[:16], "mask_voxels": voxels,
                  "torch_model_built": getattr(m, "torch_net_built", True)}}))
"""


def real_masks(cache_root: Path, code: Optional[Path] = None) -> dict:
    """Masks of real sessions (the chest CT aorta, Colin27 Thalamus_L: boxes, a negative click, propagation over
    13 slices) in a fresh process: their digest, to compare two source trees bitwise."""
    import subprocess

    root = Path(code) if code is not None else HERE.parents[1]
    script = REAL_PROBE.format(paths=[str(root / "MedFMSegment"), str(root / "MedFMTrain")], data=str(D.DATA),
                               cache=str(cache_root))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDFM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=3600, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def end_to_end(args, threads: int, cache_root: Path, save=lambda: None, out=None) -> dict:
    torch.set_num_threads(threads)
    vols, structs = D.volumes(), D.structures()
    chest, chest_m = D.read(D.DATA / "chest_ct" / "chest_ct.nii.gz")
    aorta = (D.read(D.DATA / "chest_ct" / "aorta.nii.gz")[0] > 0).astype(np.uint8)
    targets = {"Hippocampus_L": (vols["mri"], structs["Hippocampus_L"].mask), "aorta_chest_ct": ((chest, chest_m), aorta)}
    configs = {
        "today_default_torch_eager": dict(runtime="torch", config=SessionConfig(reuse_window=False, encode_ahead=0)),
        "new_default": dict(runtime="auto", config=SessionConfig()),
        "new_without_encode_ahead": dict(runtime="auto", config=SessionConfig(encode_ahead=0)),
    }
    models_by_runtime = {rt: models.load_model("litemedsam", runtime=rt, threads=threads, cache_dir=cache_root)
                         for rt in ("torch", "auto")}
    out = {} if out is None else out
    for target, ((array, matrix), gt) in targets.items():
        if target not in args.e2e_targets:
            continue
        ks = np.nonzero(gt.any(axis=(1, 2)))[0]
        if len(ks) > args.e2e_slices:  # the middle e2e_slices slices of the structure
            mid = (ks[0] + ks[-1]) // 2
            keep = np.zeros(gt.shape[0], bool)
            keep[mid - args.e2e_slices // 2: mid - args.e2e_slices // 2 + args.e2e_slices] = True
            gt = gt * keep[:, None, None]
        (k0, j0, i0), (k1, j1, i1) = geometry.bbox_kji(gt)
        lo = (k0, max(j0 - 2, 0), max(i0 - 2, 0))
        hi = (k1, min(j1 + 2, gt.shape[1] - 1), min(i1 + 2, gt.shape[2] - 1))
        row = {"slices": int(k1 - k0 + 1),
               "ellipsoid_roi_dice": round(D.dice(D.ellipsoid_in_box(gt.shape, lo, hi), gt), 3)}
        for rnd in range(args.e2e_rounds):
            for name, cfg in configs.items():
                s = PromptSession(models_by_runtime[cfg["runtime"]], config=cfg["config"])
                s.set_volume(array, matrix)
                t = time.perf_counter()
                r = segment_roi(s, ((lo[2], lo[1], lo[0]), (hi[2], hi[1], hi[0])), axis="axial")
                seconds = time.perf_counter() - t
                s.close()
                logging.warning("e2e %s round %d %s: %.1f s, dice %.4f (load %.2f)", target, rnd, name, seconds,
                                D.dice(r.mask, gt), os.getloadavg()[0])
                entry = row.setdefault(name, {"seconds": [], "dice": round(D.dice(r.mask, gt), 4)})
                entry["seconds"].append(round(seconds, 2))
                entry.setdefault("masks_equal_across_rounds", True)
                if rnd == 0:
                    row.setdefault("_masks", {})[name] = r.mask
                elif not np.array_equal(row["_masks"][name], r.mask):
                    entry["masks_equal_across_rounds"] = False
                out[target] = {k: v for k, v in row.items() if k != "_masks"}  # partial: a stopped run keeps it
                save()
        masks = row.pop("_masks")
        base = statistics.median(row["today_default_torch_eager"]["seconds"])
        for name in configs:
            row[name]["median_s"] = statistics.median(row[name]["seconds"])
            row[name]["ratio_to_today"] = round(row[name]["median_s"] / base, 3)
        row["new_default_vs_without_ahead_masks_equal"] = bool(np.array_equal(masks["new_default"],
                                                                              masks["new_without_encode_ahead"]))
        out[target] = row
        logging.warning("%s %s", target, row)
        save()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--e2e-slices", type=int, default=40)
    p.add_argument("--e2e-rounds", type=int, default=1)
    p.add_argument("--e2e-threads", type=int, default=2)
    p.add_argument("--no-e2e", action="store_true")
    p.add_argument("--compile", action="store_true", help="also torch.compile (30-220 s compile)")
    p.add_argument("--slow-bf16", action="store_true", help="measure bf16 even without native bf16")
    p.add_argument("--e2e-first", action="store_true", help="end to end before the encoder rounds")
    p.add_argument("--e2e-targets", nargs="+", default=["Hippocampus_L", "aorta_chest_ct"])
    p.add_argument("--cache-dir", help="export cache to use (default: a fresh temporary one)")
    p.add_argument("--memory", action="store_true", help="also the 512x512x300 CT session's resident size, step by step")
    p.add_argument("--memory-only", action="store_true", help="only the memory part (and the one-time export it needs)")
    p.add_argument("--p2m-only", action="store_true",
                   help="only prompt-to-mask (cached embedding, automatic runtime) per --threads, with its split")
    p.add_argument("--memory-code", nargs="+", type=Path, default=[],
                   help="also measure these source trees (e.g. a checkout of main), interleaved with this one")
    p.add_argument("--memory-rounds", type=int, default=1)
    p.add_argument("--memory-python", nargs="+", default=[],
                   help="also run this tree's memory probe in these interpreters (e.g. a venv with torch's CPU build)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not D.available():
        sys.exit(f"shared data not found at {D.DATA}")
    cpu = runtimes.cpu_info()
    result = {"cpu": cpu.as_dict(), "torch_capability": torch.backends.cpu.get_cpu_capability(),
              "openvino": runtimes.openvino_version() if runtimes.openvino_available() else None,
              "onnxruntime": "not measured: torch.onnx.export needs the 'onnx' package (not installed)",
              "bf16": "measured" if cpu.native_bf16 or args.slow_bf16 else
                      "not measured: this CPU has no native bf16 (AVX512-BF16 / AMX)",
              "load_average_start": list(os.getloadavg()), "config": vars(args)}
    print(json.dumps({"cpu": result["cpu"]}), flush=True)
    volume = D.volumes()["mri"]

    def save():  # after every section: a run stopped early keeps what it measured
        result["peak_rss_mb"] = peak_rss_mb()
        result["load_average_now"] = list(os.getloadavg())
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1, default=str))

    with tempfile.TemporaryDirectory(prefix="medfm-bench-cache-") as tmp:
        cache_root = Path(args.cache_dir or tmp)  # a fresh cache: the export cost is measured
        if args.memory or args.memory_only:
            t = time.perf_counter()
            m = models.load_model("litemedsam", runtime="auto", threads=max(args.threads), cache_dir=cache_root)
            result["one_time_export"] = {"seconds": round(time.perf_counter() - t, 1), "load_average": list(os.getloadavg()),
                                         "exports": m.runtime_info.get("exports")}
            del m
            gc.collect()
            trees = {"this_tree": (None, None), **{str(c): (c, None) for c in args.memory_code},
                     **{f"this_tree_in {py}": (None, py) for py in args.memory_python}}
            runs = result["memory_512x512x300_ct"] = {name: [] for name in trees}
            for _ in range(args.memory_rounds):  # interleaved: the trees see the same machine state
                for name, (code, py) in trees.items():
                    runs[name].append(memory(cache_root, code=code, python=py))
                    save()
            if args.memory_code:  # the same masks on real data, tree by tree
                result["real_masks"] = {name: real_masks(cache_root, code) for name, (code, py) in trees.items()
                                        if py is None}
                save()
            save()
            if args.memory_only:
                print(json.dumps(result, indent=1, default=str))
                return
        if args.p2m_only:
            for threads in args.threads:
                result[f"prompt_to_mask_threads_{threads}"] = p2m_rounds(args, threads, cache_root)
                logging.warning("threads=%d prompt-to-mask %s", threads, result[f"prompt_to_mask_threads_{threads}"])
                save()
            print(json.dumps(result, indent=1, default=str))
            return
        if not args.e2e_first:
            for threads in args.threads:
                result[f"encoder_threads_{threads}"] = encoder_rounds(args, threads, volume, cache_root)
                save()
        if not args.no_e2e:
            end_to_end(args, args.e2e_threads, cache_root, save, out=result.setdefault(f"end_to_end_threads_{args.e2e_threads}", {}))
            save()
        if args.e2e_first:
            for threads in args.threads:
                result[f"encoder_threads_{threads}"] = encoder_rounds(args, threads, volume, cache_root)
                save()
    save()
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
