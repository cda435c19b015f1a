"""Bad arguments that need no model are refused by a real ``medfm`` process that never imports torch.

Importing torch costs 2-5 s on a loaded CPU (most of a bad-input run before this was fixed), so a
check that runs after ``import torch`` cannot fail "in under 3 s". Each case runs the CLI as a user
does (``python -m MedFMSegmentLib.cli``) under ``-X importtime`` and asserts exit 2, that the message
names the problem in one line without a traceback, and that ``torch`` is not among the imported
modules. A positive control (``--device cuda`` on a machine without CUDA, which needs torch to find
out) proves the import detector sees torch when it is imported. No timing is asserted; the wall
times are measured by ``python Testing/Python/test_early_errors.py`` (median of 3 per case).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, NamedTuple

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "Sample" / "colin27_t1_deepgrey.nrrd"
PYTHONPATH = os.pathsep.join(str(REPO / p) for p in ("MedFMSegment", "MedFMTrain"))
#: one line of ``-X importtime``: "import time: SELF | CUMULATIVE | NAME" (NAME indented by depth), after
#: a header line "import time: self [us] | cumulative | imported package"
IMPORT_LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|\s*(\S+)\s*$")


class Case(NamedTuple):
    id: str
    argv: List[str]
    expect: List[str]  # texts the message must contain
    torch: bool = False  # True only for the control: finding out needs torch


SEG = ["segment", "vol.nrrd", "--prompts", "prompts.json", "--output", "o.seg.nrrd"]
DET = ["detect-segment", "vol.nrrd", "--detector", "labelmap:labels.nrrd", "--output", "o.seg.nrrd"]
BATCH = ["batch", "cohort", "--prompts-dir", "prompts", "--output-dir", "out"]
TUNE = ["tune", "--image", "vol.nrrd", "--labels", "labels.nrrd", "--organ", "bright", "--out", "newadapter",
        "--train-slices", "30,32"]

CASES = [
    Case("segment-preset", SEG + ["--preset", "ct-nope"], ["--preset", "ct-nope"]),
    Case("segment-nan-volume", ["segment", "nan.nrrd", *SEG[2:]], ["nan.nrrd", "NaN"]),
    Case("segment-constant-volume", ["segment", "const.nrrd", *SEG[2:]], ["const.nrrd", "constant"]),
    Case("segment-model-unknown", SEG + ["--model", "sam_vit_z"], ["sam_vit_z", "known models"]),
    Case("segment-model-is-a-path", SEG + ["--model", "/no/such/model.pth"], ["/no/such/model.pth", "unknown model"]),
    Case("segment-checkpoint-missing", SEG + ["--model", "sam_vit_b", "--checkpoint", "none.pth"],
         ["--checkpoint none.pth", "not found"]),
    Case("segment-device-meta", SEG + ["--device", "meta"], ["--device 'meta'"]),
    Case("segment-adapter-missing", SEG + ["--adapter", "none"], ["none", "adapter folder not found"]),
    Case("segment-adapter-nan-weights", SEG + ["--adapter", "nanadapter"], ["adapter.safetensors", "NaN"]),
    Case("segment-model-unknown-with-adapter", SEG + ["--adapter", "adapter", "--model", "nope"], ["'nope'"]),
    Case("detect-preset", DET + ["--preset", "nope"], ["--preset", "nope"]),
    Case("detect-nan-volume", ["detect-segment", "nan.nrrd", *DET[2:]], ["nan.nrrd", "NaN"]),
    Case("detect-model-unknown", DET + ["--model", "sam_vit_z"], ["sam_vit_z"]),
    Case("detect-adapter-dir-model-unknown", DET + ["--adapter-dir", "library", "--model", "nope"], ["'nope'"]),
    Case("batch-preset", BATCH + ["--preset", "nope"], ["--preset", "nope"]),
    Case("batch-model-unknown", BATCH + ["--model", "sam_vit_z"], ["sam_vit_z"]),
    Case("batch-device-meta", BATCH + ["--device", "meta"], ["--device 'meta'"]),
    Case("batch-adapter-missing", BATCH + ["--adapter", "none"], ["none", "adapter folder not found"]),
    Case("tune-lr-1e30", TUNE + ["--lr", "1e30"], ["--lr", "1e+30"]),
    Case("tune-threads-negative", TUNE + ["--threads", "-1"], ["--threads", "-1"]),
    Case("tune-model-unknown", TUNE + ["--model", "sam_vit_z"], ["sam_vit_z"]),
    Case("tune-targets-bad-regex", TUNE + ["--targets", "(("], ["targets", "(("]),
    Case("tune-label-value-absent", TUNE + ["--label-value", "9"], ["labels.nrrd", "label value 9"]),
    Case("tune-out-exists", TUNE[:-4] + ["--out", "adapter", "--train-slices", "30,32"], ["adapter", "--overwrite"]),
    Case("models-device-meta", ["models", "--device", "meta"], ["--device 'meta'"]),
    # the control: whether CUDA exists is torch's to say, so this one imports it
    Case("control-device-cuda", SEG + ["--device", "cuda"], ["cuda", "not available"], torch=True),
]


def _write_volume(path: Path, array: np.ndarray) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def make_case_dir(d: Path) -> Path:
    """The inputs the cases refer to, in ``d``: the demo volume and prompts, a NaN and a constant volume,
    labels, an adapter, one with NaN weights, a library folder of adapters and a one-case cohort."""
    import test_abuse as abuse
    from MedFMSegmentLib import io

    if not SAMPLE.is_file():
        pytest.fail(f"the shipped demo sample is missing: {SAMPLE}")
    shutil.copy(SAMPLE, d / "vol.nrrd")
    (d / "prompts.json").write_text(json.dumps(abuse._box_prompts()), encoding="utf-8")
    array, matrix = io.read_volume(SAMPLE)
    io.write_labelmap(d / "labels.nrrd", {"bright": (array > np.percentile(array, 90)).astype(np.uint8)}, matrix)
    _write_volume(d / "nan.nrrd", np.where(np.arange(210).reshape(5, 6, 7) == 3, np.nan, 1.0).astype(np.float32))
    _write_volume(d / "const.nrrd", np.full((5, 6, 7), 7, np.int16))
    abuse._write_adapter(d / "adapter")
    shutil.copytree(d / "adapter", d / "nanadapter")
    abuse._nan_weights(d / "nanadapter")
    (d / "library").mkdir()
    shutil.copytree(d / "adapter", d / "library" / "bright")
    (d / "cohort").mkdir()
    (d / "prompts").mkdir()
    shutil.copy(SAMPLE, d / "cohort" / "case1.nrrd")
    shutil.copy(d / "prompts.json", d / "prompts" / "case1.json")
    return d


def case_folder(inputs: Path, case_id: str) -> Path:
    """A folder of its own for one case: links to the inputs (an output wrongly written lands here)."""
    d = inputs.parent / f"{inputs.name}-{case_id}"
    d.mkdir()
    for p in inputs.iterdir():
        (d / p.name).symlink_to(p, target_is_directory=p.is_dir())
    return d


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory) -> Path:
    inputs = tmp_path_factory.mktemp("early_errors") / "inputs"
    inputs.mkdir()
    return make_case_dir(inputs)


def run_medfm(argv, cwd: Path, importtime: bool = True) -> dict:
    """One ``medfm`` process -> exit code, its message lines, the modules it imported, the wall time."""
    flags = ["-X", "importtime"] if importtime else []
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *flags, "-m", "MedFMSegmentLib.cli", *argv], cwd=cwd, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONPATH=PYTHONPATH))
    seconds = time.perf_counter() - t0
    imported, message = set(), []
    for line in r.stderr.splitlines():
        m = IMPORT_LINE.match(line)
        if m:
            imported.add(m.group(3))
        elif line.strip() and not line.startswith("import time: self [us]"):
            message.append(line)
    return {"code": r.returncode, "message": message, "imported": imported, "seconds": seconds}


@pytest.fixture(scope="module")
def results(case_dir) -> Dict[str, dict]:
    """Every case's process, two at a time (each is independent; the suite stays a few seconds)."""
    def one(case: Case):
        return case.id, run_medfm(case.argv, case_folder(case_dir, case.id))

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, CASES))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_without_importing_torch(case: Case, results):
    r = results[case.id]
    text = "\n".join(r["message"])
    assert r["code"] == 2, f"exit {r['code']}: {text[-2000:]}"
    for part in case.expect:
        assert part in text, f"{part!r} not in the message: {text[-2000:]}"
    assert "Traceback" not in text and len(r["message"]) == 1, text
    assert ("torch" in r["imported"]) == case.torch, (
        f"torch {'not ' if case.torch else ''}imported; the check must run before `import torch`")
    assert any(name.startswith("MedFMSegmentLib.") for name in r["imported"]), "the import log was not parsed"


def test_tune_option_defaults_are_the_configs():
    """``medfm tune``'s options show TuneConfig's defaults, written out so the parser imports no torch."""
    import argparse

    from MedFMTrainLib.cli import TUNE_DEFAULTS, add_tune_arguments
    from MedFMTrainLib.tune import TuneConfig

    d = TuneConfig()
    assert TUNE_DEFAULTS == {"steps": d.steps, "rank": d.lora.rank, "lr": d.lr, "seed": d.seed,
                             "targets": d.lora.targets, "box_encodes": d.pool.box_encodes,
                             "click_encodes": d.pool.click_encodes}
    args = add_tune_arguments(argparse.ArgumentParser()).parse_args(
        ["--image", "v", "--labels", "l", "--organ", "o", "--out", "x"])
    assert (args.steps, args.rank, args.lr, args.targets) == (d.steps, d.lora.rank, d.lr, d.lora.targets)


def main() -> None:
    """Wall time (median of 3) of every case, without -X importtime, as JSON with the CPU."""
    import argparse
    import tempfile

    from MedFMSegmentLib import runtimes

    parser = argparse.ArgumentParser(description="time the early-error cases through real processes")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="case ids (default: all)")
    a = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="early_errors"))
    inputs = root / "inputs"
    inputs.mkdir()
    make_case_dir(inputs)
    rows = []
    for case in CASES:
        if a.only and case.id not in a.only:
            continue
        times, codes = [], set()
        for n in range(a.repeat):
            r = run_medfm(case.argv, case_folder(inputs, f"{case.id}-{n}"), importtime=False)
            times.append(r["seconds"])
            codes.add(r["code"])
        rows.append({"case": case.id, "exit": sorted(codes), "median_s": round(statistics.median(times), 2),
                     "runs_s": [round(t, 2) for t in times]})
        print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"cpu": runtimes.cpu_info().as_dict(), "load_average": os.getloadavg(), "cases": rows},
                     indent=1))


if __name__ == "__main__":
    main()
