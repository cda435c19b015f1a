"""``medfm batch`` case state (issue 13's batch findings): outputs without their "done" report, 0-byte
outputs, duplicate case names, output folder = cohort folder, edited prompts, locks between two runs,
Ctrl-C. Also ``detect-segment`` over a cohort folder.

The state tests replace the model by a fixed threshold (``fake_segment``): they are about which case
runs and which file is written, and stay fast. The detect-segment cohort runs the real LiteMedSAM.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedFMSegmentLib import api, batch, cli, io
from MedFMSegmentLib.session import PromptSession

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "Sample" / "colin27_t1_deepgrey.nrrd"
SAMPLE_PROMPTS = REPO / "Resources" / "Sample" / "colin27_t1_deepgrey.prompts.json"


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def files_in(folder: Path):
    return sorted(p.name for p in folder.iterdir())


def prompts_json(propagate=False, shift_mm=0.0) -> str:
    data = json.loads(SAMPLE_PROMPTS.read_text(encoding="utf-8"))
    for seg in data["segments"]:
        seg["propagate"] = propagate
        for box in seg.get("boxes", []):
            for corner in box["corners"]:
                corner[0] += shift_mm
    return json.dumps(data)


@pytest.fixture
def cohort(tmp_path):
    """Cases a, b, c: 3-slice crops of the sample (different slices), one prompts file each."""
    cases, prompts, out = tmp_path / "cases", tmp_path / "prompts", tmp_path / "out"
    cases.mkdir()
    prompts.mkdir()
    image = sitk.ReadImage(str(SAMPLE))
    for name, k in (("a", 32), ("b", 33), ("c", 34)):
        sitk.WriteImage(image[:, :, k - 1:k + 2], str(cases / f"{name}.nrrd"), True)
        (prompts / f"{name}.json").write_text(prompts_json(), encoding="utf-8")
    return cases, prompts, out


@pytest.fixture
def fake_segment(monkeypatch):
    """No model: the mask is the volume above its mean. Returns the list of cases segmented, in order."""
    segmented = []
    real_segment_case = cli.segment_case

    def segment_case(args, volume, *rest, **kwargs):
        segmented.append(batch.case_name(Path(volume)))
        return real_segment_case(args, volume, *rest, **kwargs)

    def segment(array_kji, ijk_to_ras, prompt_set, session=None, report=None, **kwargs):
        time.sleep(0.05)
        return {"Thalamus_L": (array_kji > array_kji.mean()).astype(np.uint8)}

    monkeypatch.setattr(cli, "segment_case", segment_case)
    monkeypatch.setattr(cli, "_session", lambda args: object())
    monkeypatch.setattr(api, "segment", segment)
    return segmented


def batch_run(cohort, capsys, *extra):
    cases, prompts, out = cohort
    return run(["-q", "batch", cases, "--prompts-dir", prompts, "--output-dir", out, *extra], capsys)


def report(out: Path, case: str) -> dict:
    return json.loads((out / f"{case}.report.json").read_text(encoding="utf-8"))


def no_leftovers(out: Path):
    """No lock file and no temporary file in the output folder."""
    return [n for n in files_in(out) if n.startswith(".")] == []


# ----------------------------------------------------------------------------- state

def test_done_report_records_the_hashes(cohort, capsys, fake_segment):
    cases, prompts, out = cohort
    code, stdout, err = batch_run(cohort, capsys)
    assert code == 0, err
    rep = report(out, "b")
    assert rep["status"] == "done"
    assert rep["inputs"] == {str(cases / "b.nrrd"): batch.file_sha256(cases / "b.nrrd"),
                             str(prompts / "b.json"): batch.file_sha256(prompts / "b.json")}
    assert rep["outputs"] == {str(out / "b.seg.nrrd"): batch.file_sha256(out / "b.seg.nrrd")}
    assert no_leftovers(out)
    code, stdout, _ = batch_run(cohort, capsys)
    assert code == 0 and json.loads(stdout)["skipped"] == ["a", "b", "c"] and fake_segment == ["a", "b", "c"]


@pytest.mark.parametrize("fault", ["killed", "disk-full"])
def test_output_without_its_done_report_is_redone(cohort, capsys, caplog, fake_segment, monkeypatch, fault):
    """b's output is written, then the run dies (kill / Ctrl-C) or the disk fills before b's "done" report:
    the next run redoes b (it was failing forever with "already exists"), and only b and the unstarted c."""
    cases, prompts, out = cohort
    real_verify, real_write = batch._verify_outputs, io.write_text_atomic

    def verify(case, rep):  # between the outputs and the "done" report
        if case.name == "b" and fault == "killed":
            raise KeyboardInterrupt
        return real_verify(case, rep)

    def write_text_atomic(path, text, overwrite=False):
        if Path(path).name == "b.report.json" and '"running"' not in text:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, text, overwrite=overwrite)

    monkeypatch.setattr(batch, "_verify_outputs", verify)
    monkeypatch.setattr(io, "write_text_atomic", write_text_atomic)
    code, stdout, err = batch_run(cohort, capsys)
    assert (out / "b.seg.nrrd").stat().st_size > 0 and report(out, "b")["status"] == "running"
    if fault == "killed":
        assert code == 130 and fake_segment == ["a", "b"]
        assert not (out / "c.report.json").exists()
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        assert summary["interrupted"] and [r["status"] for r in summary["cases"]] == ["done", "cancelled", "cancelled"]
    else:
        assert code == 1 and json.loads(stdout)["failed"] == ["b"] and "No space left" in caplog.text
    assert no_leftovers(out)
    monkeypatch.setattr(batch, "_verify_outputs", real_verify)
    monkeypatch.setattr(io, "write_text_atomic", real_write)
    fake_segment.clear()
    code, stdout, err = batch_run(cohort, capsys)
    assert code == 0, err
    expected = ["b", "c"] if fault == "killed" else ["b"]
    assert json.loads(stdout) == {"done": expected, "skipped": sorted({"a", "b", "c"} - set(expected)), "failed": []}
    assert report(out, "b")["status"] == "done"


def test_zero_byte_or_partial_output_never_blocks_a_case(cohort, capsys, fake_segment):
    cases, prompts, out = cohort
    out.mkdir()
    (out / "a.seg.nrrd").write_bytes(b"")  # a full disk's leftover, no report
    code, stdout, err = batch_run(cohort, capsys)
    assert code == 0, err
    assert io.read_segmentation(out / "a.seg.nrrd")[0]["Thalamus_L"].any()
    # an older run wrote a truncated b and was killed before its "done" report
    good = (out / "b.seg.nrrd").read_bytes()
    (out / "b.seg.nrrd").write_bytes(good[: len(good) // 2])
    rep = report(out, "b")
    rep.update(status="running", outputs={str(out / "b.seg.nrrd"): None})
    (out / "b.report.json").write_text(json.dumps(rep), encoding="utf-8")
    # c: a done report (an older medfm, no hashes) next to a 0-byte output
    (out / "c.seg.nrrd").write_bytes(b"")
    (out / "c.report.json").write_text(json.dumps({"status": "done", "output": str(out / "c.seg.nrrd")}),
                                       encoding="utf-8")
    code, stdout, err = batch_run(cohort, capsys)
    assert code == 0 and json.loads(stdout)["done"] == ["b", "c"], err
    assert (out / "b.seg.nrrd").read_bytes() == good
    assert (out / "c.seg.nrrd").stat().st_size > 0


def test_output_changed_after_writing_is_kept_without_overwrite(cohort, capsys, fake_segment):
    cases, prompts, out = cohort
    assert batch_run(cohort, capsys)[0] == 0
    edited = out / "a.seg.nrrd"
    edited.write_bytes(edited.read_bytes() + b"\n")  # someone edited the output (non-empty)
    before = edited.read_bytes()
    code, stdout, _ = batch_run(cohort, capsys)
    assert code == 1 and json.loads(stdout)["failed"] == ["a"]
    assert "was changed after medfm wrote it" in report(out, "a")["error"] and edited.read_bytes() == before
    code, stdout, _ = batch_run(cohort, capsys, "--overwrite")
    assert code == 0 and edited.read_bytes() != before


def test_editing_prompts_or_volume_or_settings_reruns_the_case(cohort, capsys, fake_segment):
    cases, prompts, out = cohort
    assert batch_run(cohort, capsys)[0] == 0
    (prompts / "b.json").write_text(prompts_json(shift_mm=1.0), encoding="utf-8")
    code, stdout, _ = batch_run(cohort, capsys)
    assert code == 0 and json.loads(stdout) == {"done": ["b"], "skipped": ["a", "c"], "failed": []}
    assert report(out, "b")["inputs"][str(prompts / "b.json")] == batch.file_sha256(prompts / "b.json")
    (cases / "c.nrrd").write_bytes((cases / "a.nrrd").read_bytes())  # another scan under c's name
    code, stdout, _ = batch_run(cohort, capsys)
    assert json.loads(stdout)["done"] == ["c"]
    code, stdout, _ = batch_run(cohort, capsys, "--labelmaps")  # an output more: every case again
    assert json.loads(stdout)["done"] == ["a", "b", "c"] and (out / "a.labels.nii.gz").is_file()


# ----------------------------------------------------------------------------- cohort folders

def test_duplicate_case_names_are_refused_before_any_work(cohort, capsys, fake_segment):
    cases, prompts, out = cohort
    image = sitk.ReadImage(str(cases / "a.nrrd"))
    sitk.WriteImage(image, str(cases / "a.nii.gz"))
    code, _, err = batch_run(cohort, capsys)
    assert code == 2 and str(cases / "a.nrrd") in err and str(cases / "a.nii.gz") in err
    assert not out.exists() and fake_segment == []


def test_output_folder_equal_to_the_cohort_is_refused(cohort, capsys, fake_segment):
    cases, prompts, out = cohort
    before = files_in(cases)
    code, _, err = run(["-q", "batch", cases, "--prompts-dir", prompts, "--output-dir", cases], capsys)
    assert code == 2 and "is the cohort folder" in err and files_in(cases) == before and fake_segment == []


def test_output_folder_inside_the_cohort_never_becomes_cases(cohort, capsys, fake_segment):
    cases, prompts, out = cohort
    inside = cases / "seg"
    for _ in range(2):
        code, stdout, _ = run(["-q", "batch", cases, "--prompts-dir", prompts, "--output-dir", inside], capsys)
        assert code == 0
    assert json.loads(stdout) == {"done": [], "skipped": ["a", "b", "c"], "failed": []}


# ----------------------------------------------------------------------------- locks

def write_lock(out: Path, case: str, pid: int) -> Path:
    import socket

    started = batch._process_start(pid)
    path = out / f".{case}.lock"
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": started or 1.0,
                                "run": "another-run"}), encoding="utf-8")
    return path


def test_live_lock_is_skipped_and_stale_lock_taken_over(cohort, capsys, caplog, fake_segment):
    cases, prompts, out = cohort
    out.mkdir()
    live = write_lock(out, "a", os.getpid())  # a run in a live process holds a
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(out, "b", dead.pid)  # a killed run held b
    code, stdout, err = batch_run(cohort, capsys)
    assert code == 1  # not every case is done
    printed = json.loads(stdout)
    assert printed["locked"] == ["a"] and printed["done"] == ["b", "c"] and fake_segment == ["b", "c"]
    assert "being processed by another run" in caplog.text and "taking over the lock" in caplog.text
    assert live.exists() and files_in(out).count(".a.lock") == 1 and not (out / ".b.lock").exists()
    rows = {r["case"]: r for r in json.loads((out / "summary.json").read_text(encoding="utf-8"))["cases"]}
    assert rows["a"]["status"] == "locked" and str(os.getpid()) in rows["a"]["error"]
    live.unlink()
    code, stdout, _ = batch_run(cohort, capsys)
    assert code == 0 and json.loads(stdout)["done"] == ["a"]


def test_two_runs_on_one_output_folder_do_each_case_once(cohort, capsys, fake_segment, monkeypatch):
    """Two batch runs at the same time on the same folders: every case is segmented exactly once, and
    afterwards every case is done."""
    cases, prompts, out = cohort
    for name in "defg":
        (cases / f"{name}.nrrd").write_bytes((cases / "a.nrrd").read_bytes())
        (prompts / f"{name}.json").write_text(prompts_json(), encoding="utf-8")
    codes = []
    threads = [threading.Thread(target=lambda: codes.append(cli.main(
        ["-q", "batch", str(cases), "--prompts-dir", str(prompts), "--output-dir", str(out)]))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    capsys.readouterr()
    assert sorted(fake_segment) == list("abcdefg")  # no case twice
    assert set(codes) <= {0, 1} and len(codes) == 2
    assert all(report(out, n)["status"] == "done" for n in "abcdefg") and no_leftovers(out)
    code, stdout, _ = batch_run(cohort, capsys)
    assert code == 0 and json.loads(stdout)["skipped"] == list("abcdefg")


# ----------------------------------------------------------------------------- detect-segment over a cohort

@pytest.fixture
def fast_session(monkeypatch, litemedsam):
    monkeypatch.setattr(cli, "_session", lambda args: PromptSession(litemedsam))


def test_detect_segment_over_a_cohort(tmp_path, capsys, fast_session, litemedsam):
    """Two one-slice cases, each with its own label map (a box on the thalamus): {case} picks the file."""
    cases, labels, out = tmp_path / "cases", tmp_path / "labels", tmp_path / "out"
    cases.mkdir()
    labels.mkdir()
    image = sitk.ReadImage(str(SAMPLE))
    array_kji, ijk_to_ras = io.read_volume(SAMPLE)
    for name, k in (("x", 33), ("y", 32)):
        sitk.WriteImage(image[:, :, k:k + 1], str(cases / f"{name}.nrrd"), True)
        mask = np.zeros((1,) + array_kji.shape[1:], np.uint8)
        mask[0, 30:50, 25:45] = 1
        crop = io.read_volume(cases / f"{name}.nrrd")[1]
        io.write_labelmap(labels / f"{name}.nii.gz", {"thal": mask}, crop)
    code, stdout, err = run(["-q", "detect-segment", cases, "--detector", f"labelmap:{labels}/{{case}}.nii.gz",
                             "--output-dir", out], capsys)
    assert code == 0, err
    assert json.loads(stdout)["done"] == ["x", "y"]
    for name in "xy":
        masks, _ = io.read_segmentation(out / f"{name}.seg.nrrd")
        assert list(masks) == ["1"]  # a label map detector names segments by label value
        assert masks["1"][0, 30:50, 25:45].sum() > 0.3 * 400 and masks["1"][0].sum() < 2 * 400
        assert report(out, name)["inputs"][str(labels / f"{name}.nii.gz")]
        assert report(out, name)["runtime_info"] == json.loads(json.dumps(PromptSession(litemedsam).runtime_info))
    code, stdout, _ = run(["-q", "detect-segment", cases, "--detector", f"labelmap:{labels}/{{case}}.nii.gz",
                           "--output-dir", out], capsys)
    assert code == 0 and json.loads(stdout)["skipped"] == ["x", "y"]


def test_detect_segment_on_one_volume_reports_the_runtime(tmp_path, capsys, fast_session, litemedsam):
    """One volume: the JSON on stdout names the runtime choice (runtime, precision, threads, CPU flags)."""
    image = sitk.ReadImage(str(SAMPLE))
    sitk.WriteImage(image[:, :, 33:34], str(tmp_path / "x.nrrd"), True)
    array_kji, ijk_to_ras = io.read_volume(tmp_path / "x.nrrd")
    mask = np.zeros(array_kji.shape, np.uint8)
    mask[0, 30:50, 25:45] = 1
    io.write_labelmap(tmp_path / "x.nii.gz", {"thal": mask}, ijk_to_ras)
    code, stdout, err = run(["-q", "detect-segment", tmp_path / "x.nrrd", "--detector",
                             f"labelmap:{tmp_path / 'x.nii.gz'}", "--output", tmp_path / "x.seg.nrrd"], capsys)
    assert code == 0, err
    info = json.loads(stdout)["runtime_info"]
    assert info == json.loads(json.dumps(litemedsam.runtime_info))
    assert {"runtime", "precision", "threads", "reason", "threads_reason", "device"} <= set(info)
    assert info["cpu"]["isa_flags"] and info["cpu"]["model"]


@pytest.mark.parametrize("argv, message", [
    (["--detector", "labelmap:one.nii.gz", "--output-dir", "OUT"], "{case}"),
    (["--detector", "labelmap:{case}.nii.gz", "--output", "x.seg.nrrd"], "--output-dir"),
])
def test_detect_segment_cohort_bad_options(tmp_path, capsys, argv, message, monkeypatch):
    monkeypatch.setattr(cli, "_session", lambda args: pytest.fail("model loaded"))
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "x.nrrd").write_bytes(SAMPLE.read_bytes())
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    code, _, err = run(["-q", "detect-segment", cases, *argv], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()
