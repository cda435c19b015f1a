"""Tests of the ``medfm`` command line (``cli.main`` in-process) on the shipped demo sample.

The sample is a crop of Colin27 (84x87x63 voxels, the geometry of the full image) with a box prompt on
the left thalamus (axial slice k=33 of the crop). To stay fast most runs switch propagation off; the
batch cohort propagates on a 3-slice crop, where it ends at the volume's edges.
"""
from __future__ import annotations

import contextlib
import errno
import io as pyio
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedFMSegmentLib import cli, geometry, io
from MedFMSegmentLib.session import PromptSession

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "Sample" / "colin27_t1_deepgrey.nrrd"
SAMPLE_PROMPTS = REPO / "Resources" / "Sample" / "colin27_t1_deepgrey.prompts.json"
SAMPLE_LO_IJK = (43, 79, 47)  # the crop's first voxel in the full Colin27 grid (make_sample.py)
PROMPT_K = 33  # the sample prompt's axial slice (RAS z = 9 mm) in the crop
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def prompts_copy(folder: Path, name: str = "prompts.json", propagate: bool = False) -> Path:
    data = json.loads(SAMPLE_PROMPTS.read_text(encoding="utf-8"))
    for seg in data["segments"]:
        seg["propagate"] = propagate
    path = folder / name
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


def run(argv, capsys=None):
    """cli.main(argv) -> (exit code, stdout, stderr)."""
    if capsys is not None:
        code = cli.main(list(map(str, argv)))
        out, err = capsys.readouterr()
        return code, out, err
    out, err = pyio.StringIO(), pyio.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(map(str, argv)))
    return code, out.getvalue(), err.getvalue()


def files_in(folder: Path):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(autouse=True)
def _sample_present():
    if not SAMPLE.is_file() or not SAMPLE_PROMPTS.is_file():
        pytest.fail(f"the shipped demo sample is missing: {SAMPLE}")


@pytest.fixture
def fast_session(monkeypatch, litemedsam):
    """cli builds its session on the already loaded LiteMedSAM; ``.calls`` counts the sessions built."""
    calls = []

    def session(args):
        calls.append(args.model)
        return PromptSession(litemedsam)

    monkeypatch.setattr(cli, "_session", session)
    return calls


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command loads a model (errors must come before that)."""
    def session(args):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cli, "_session", session)


# ----------------------------------------------------------------------------- medfm segment

@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """``medfm segment`` on the sample (real model loading path), without propagation."""
    folder = tmp_path_factory.mktemp("segment")
    prompts = prompts_copy(folder)
    out = folder / "thalamus.seg.nrrd"
    png = folder / "thalamus.png"
    labels = folder / "thalamus.labels.nii.gz"
    code, stdout, stderr = run(["-q", "segment", SAMPLE, "--prompts", prompts, "--output", out,
                                "--overlay", png, "--labelmap", labels, "--device", "cpu"])
    return dict(folder=folder, prompts=prompts, out=out, png=png, labels=labels, code=code, stdout=stdout,
                stderr=stderr)


def test_segment_writes_a_seg_nrrd_on_the_input_grid(sample_run):
    assert sample_run["code"] == 0, sample_run["stderr"]
    volume, ijk_to_ras = io.read_volume(SAMPLE)
    masks, seg_matrix = io.read_segmentation(sample_run["out"])
    assert list(masks) == ["Thalamus_L"]
    assert np.allclose(seg_matrix, ijk_to_ras, atol=1e-5)
    mask = masks["Thalamus_L"]
    assert mask.shape == volume.shape and mask.dtype == np.uint8
    assert set(np.nonzero(mask.sum(axis=(1, 2)))[0]) == {PROMPT_K}  # propagation off: the prompted slice
    assert 200 < mask.sum() < 1500  # the thalamus' cross-section is ~500 mm2
    report = json.loads(sample_run["stdout"])
    assert report["model"] == "litemedsam" and report["device"] == "cpu"
    assert report["segments"]["Thalamus_L"]["voxels"] == int(mask.sum())
    labels, label_matrix = io.read_volume(sample_run["labels"])
    assert np.allclose(label_matrix, ijk_to_ras, atol=1e-5)
    assert np.array_equal(labels > 0, mask > 0) and set(np.unique(labels)) == {0, 1}
    assert files_in(sample_run["folder"]) == sorted(["prompts.json", "thalamus.seg.nrrd", "thalamus.png",
                                                     "thalamus.labels.nii.gz"])  # no temporary files


RUNTIME_KEYS = {"device", "device_reason", "runtime", "precision", "reason", "threads", "threads_reason", "cpu"}


def models_runtime(capsys) -> dict:
    """The runtime choice ``medfm models`` prints (stderr: ``runtime {json}``)."""
    code, _, err = run(["models"], capsys)
    assert code == 0
    line = [row for row in err.splitlines() if row.startswith("runtime ")][-1]
    return json.loads(line[len("runtime "):])


def test_segment_report_names_the_runtime_as_models_shows_it(sample_run, capsys):
    """The JSON report on stdout carries the runtime choice: device, runtime, precision, threads, reasons,
    the CPU model and its ISA flags, the same as ``medfm models`` plans on this machine."""
    info = json.loads(sample_run["stdout"])["runtime_info"]
    assert RUNTIME_KEYS <= set(info), sorted(info)
    planned = models_runtime(capsys)
    assert info["cpu"] == planned["cpu"] and info["cpu"]["isa_flags"] and info["cpu"]["model"]
    assert (info["device"], info["runtime"]) == (planned["device"], planned["runtime"]), (info, planned)
    if info["threads"] != planned["threads"]:  # the automatic count follows the load, which moved between the runs
        assert all("load average" in r["threads_reason"] for r in (info, planned)), (info, planned)
    if info["precision"] != planned["precision"]:  # a planned bf16 that failed its check runs fp32, and says so
        assert (planned["precision"], info["precision"]) == ("bf16", "fp32") and "failed its check" in info["reason"]


def ellipse_in_box(shape, box):
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    ry, rx = (y1 - y0 + 1) / 2, (x1 - x0 + 1) / 2
    return (((yy - (y0 + y1) / 2) / ry) ** 2 + ((xx - (x0 + x1) / 2) / rx) ** 2 <= 1).astype(np.uint8)


def test_segment_result_matches_the_atlas(sample_run, colin27_aal):
    """Measured: Dice 0.90 on the prompted slice; the ellipse inscribed in the prompt box gives 0.75."""
    i0, j0, k0 = SAMPLE_LO_IJK
    volume, ijk_to_ras = io.read_volume(SAMPLE)
    nk, nj, ni = volume.shape
    gt = (colin27_aal[k0:k0 + nk, j0:j0 + nj, i0:i0 + ni] == 77).astype(np.uint8)
    corners_ras = json.loads(SAMPLE_PROMPTS.read_text(encoding="utf-8"))["segments"][0]["boxes"][0]["corners"]
    corners_ijk = geometry.ras_to_ijk(np.array(corners_ras), ijk_to_ras)
    k, box = geometry.box_ijk_to_slice(corners_ijk[0], corners_ijk[1], "axial")
    assert k == PROMPT_K
    masks, _ = io.read_segmentation(sample_run["out"])
    d = dice(masks["Thalamus_L"][k], gt[k])
    baseline = dice(ellipse_in_box(gt[k].shape, box), gt[k])
    assert d > 0.85 and d > baseline + 0.08, f"Dice {d:.3f} on the prompted slice, ellipse-in-box {baseline:.3f}"


def test_segment_overlay_is_a_png(sample_run):
    data = sample_run["png"].read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 50
    assert data.endswith(b"IEND\xaeB`\x82")


def test_existing_output_without_overwrite(tmp_path, capsys, no_model):
    out = tmp_path / "out.seg.nrrd"
    out.write_bytes(b"precious")
    before = out.stat().st_mtime_ns
    code, _, err = run(["-q", "segment", SAMPLE, "--prompts", prompts_copy(tmp_path), "--output", out], capsys)
    assert code == 2
    assert "already exists" in err and "--overwrite" in err and str(out) in err
    assert out.read_bytes() == b"precious" and out.stat().st_mtime_ns == before


def test_malformed_prompts_json_names_the_line(tmp_path, capsys, no_model):
    prompts = tmp_path / "bad.json"
    prompts.write_text('{\n "space": "RAS",\n "segments": [\n  {"name": "A",}\n ]\n}\n', encoding="utf-8")
    code, _, err = run(["-q", "segment", SAMPLE, "--prompts", prompts, "--output", tmp_path / "o.seg.nrrd"], capsys)
    assert code == 2
    assert str(prompts) in err and "line 4" in err
    assert files_in(tmp_path) == ["bad.json"]


def test_prompts_that_do_not_fit_the_volume(tmp_path, capsys, no_model):
    data = json.loads(SAMPLE_PROMPTS.read_text(encoding="utf-8"))
    data["segments"][0]["boxes"][0]["corners"] = [[300.0, 300.0, 300.0], [310.0, 310.0, 300.0]]
    prompts = tmp_path / "far.json"
    prompts.write_text(json.dumps(data), encoding="utf-8")
    code, _, err = run(["-q", "segment", SAMPLE, "--prompts", prompts, "--output", tmp_path / "o.seg.nrrd"], capsys)
    assert code == 2 and "Thalamus_L" in err and "outside" in err
    assert files_in(tmp_path) == ["far.json"]


def test_missing_prompts_file(tmp_path, capsys, no_model):
    missing = tmp_path / "nope.json"
    code, _, err = run(["-q", "segment", SAMPLE, "--prompts", missing, "--output", tmp_path / "o.seg.nrrd"], capsys)
    assert code == 2 and str(missing) in err and "not found" in err
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("dims", [2, 4])
def test_2d_or_4d_image_is_refused(tmp_path, capsys, no_model, dims):
    if dims == 2:
        image = sitk.GetImageFromArray(np.arange(64 * 64, dtype=np.int16).reshape(64, 64))
    else:
        image = sitk.JoinSeries([sitk.GetImageFromArray(np.full((4, 8, 8), v, np.int16)) for v in (1, 2)])
    path = tmp_path / f"image{dims}d.nrrd"
    sitk.WriteImage(image, str(path))
    out = tmp_path / "o.seg.nrrd"
    code, _, err = run(["-q", "segment", path, "--prompts", prompts_copy(tmp_path), "--output", out], capsys)
    assert code == 2 and str(path) in err and f"{dims}D" in err
    assert not out.exists() and files_in(tmp_path) == sorted([path.name, "prompts.json"])


@pytest.mark.parametrize("fail_at", [1, 2])
def test_write_failing_midway_leaves_no_partial_output(tmp_path, capsys, monkeypatch, fast_session, sample_run,
                                                        fail_at):
    """os.replace fails (disk full) on the first output, or on the second after the first was written:
    either way the command exits 2 and leaves no output and no temporary file. (The segmentation is the
    sample run's, to spare a model run: this is about writing.)"""
    from MedFMSegmentLib import api

    masks, _ = io.read_segmentation(sample_run["out"])
    monkeypatch.setattr(api, "segment", lambda *a, **k: masks)
    real_replace = os.replace
    count = []

    def replace(src, dst, *a, **k):
        count.append(dst)
        if len(count) == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    prompts = prompts_copy(tmp_path)
    out, labels = tmp_path / "o.seg.nrrd", tmp_path / "o.labels.nrrd"
    code, _, err = run(["-q", "segment", SAMPLE, "--prompts", prompts, "--output", out, "--labelmap", labels],
                       capsys)
    assert len(count) == fail_at
    assert code == 2, err
    assert "No space left on device" in err and str(count[-1]) in err
    assert files_in(tmp_path) == ["prompts.json"]


def test_unexpected_os_error_is_reported_not_raised(tmp_path, capsys, no_model):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    (cohort / "a.nrrd").write_bytes(SAMPLE.read_bytes())
    (tmp_path / "prompts").mkdir()
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    code, _, err = run(["-q", "batch", cohort, "--prompts-dir", tmp_path / "prompts",
                        "--output-dir", blocker / "out"], capsys)
    assert code == 2 and str(blocker) in err


# ----------------------------------------------------------------------------- medfm batch

def write_crop(path: Path, k0: int, k1: int) -> None:
    """The sample's axial slices k0..k1 (inclusive), geometry kept (so RAS prompts still apply)."""
    image = sitk.ReadImage(str(SAMPLE))
    sitk.WriteImage(image[:, :, k0:k1 + 1], str(path), True)


@pytest.fixture
def cohort(tmp_path):
    """Three cases: ok (3 slices around the prompt, propagation on), noprompts, broken (bad prompts)."""
    cases, prompts, out = tmp_path / "cases", tmp_path / "prompts", tmp_path / "out"
    cases.mkdir()
    prompts.mkdir()
    write_crop(cases / "ok.nrrd", PROMPT_K - 1, PROMPT_K + 1)
    write_crop(cases / "noprompts.nrrd", PROMPT_K - 3, PROMPT_K + 3)
    write_crop(cases / "broken.nii.gz", PROMPT_K - 1, PROMPT_K + 1)
    prompts_copy(prompts, "ok.json", propagate=True)
    (prompts / "broken.json").write_text('{"space": "RAS", "segments": [{"name": "X", "boxes": [{"corners": 3}]}]}',
                                         encoding="utf-8")
    (cases / "notes.txt").write_text("not a volume")
    return cases, prompts, out


def batch(cohort, capsys, *extra):
    cases, prompts, out = cohort
    return run(["-q", "batch", cases, "--prompts-dir", prompts, "--output-dir", out, *extra], capsys)


def report(out: Path, case: str) -> dict:
    return json.loads((out / f"{case}.report.json").read_text(encoding="utf-8"))


def test_batch_keeps_going_reports_and_resumes(cohort, capsys, fast_session, litemedsam):
    cases, prompts, out = cohort
    code, stdout, err = batch(cohort, capsys)
    assert code == 1, err
    summary = json.loads(stdout)
    assert summary == {"done": ["ok"], "skipped": [], "failed": ["broken", "noprompts"]}
    assert files_in(out) == sorted(["ok.seg.nrrd", "ok.report.json", "noprompts.report.json",
                                    "broken.report.json", "summary.json", "summary.csv"])
    ok = report(out, "ok")
    assert ok["status"] == "done" and ok["output"] == str(out / "ok.seg.nrrd")
    assert ok["runtime_info"] == json.loads(json.dumps(litemedsam.runtime_info))  # the case's session's runtime
    assert RUNTIME_KEYS <= set(ok["runtime_info"])
    info = ok["segments"]["Thalamus_L"]
    assert info["propagate_axial"]["slices"] == 3  # propagated from slice 1 to both ends of the crop
    masks, matrix = io.read_segmentation(out / "ok.seg.nrrd")
    volume, ijk_to_ras = io.read_volume(cases / "ok.nrrd")
    assert np.allclose(matrix, ijk_to_ras, atol=1e-5) and masks["Thalamus_L"].shape == volume.shape
    assert all(masks["Thalamus_L"][k].sum() > 100 for k in range(3))
    missing = report(out, "noprompts")
    assert missing["status"] == "failed" and "no prompts file" in missing["error"]
    assert str(prompts / "noprompts.json") in missing["error"]
    broken = report(out, "broken")
    assert broken["status"] == "failed" and str(prompts / "broken.json") in broken["error"]
    assert "corners" in broken["error"] and "traceback" not in broken
    assert len(fast_session) == 1  # one model for the cohort

    # resume: the done case is skipped (untouched), the failed ones are retried
    stamp = (out / "ok.seg.nrrd").stat().st_mtime_ns
    code, stdout, _ = batch(cohort, capsys)
    assert code == 1
    assert json.loads(stdout) == {"done": [], "skipped": ["ok"], "failed": ["broken", "noprompts"]}
    assert (out / "ok.seg.nrrd").stat().st_mtime_ns == stamp

    # fixing a case's prompts: the next run does it, the rest stays
    prompts_copy(prompts, "broken.json", propagate=False)
    code, stdout, _ = batch(cohort, capsys)
    assert code == 1
    assert json.loads(stdout) == {"done": ["broken"], "skipped": ["ok"], "failed": ["noprompts"]}
    assert report(out, "broken")["status"] == "done"


def test_batch_never_overwrites_without_overwrite(cohort, capsys, fast_session):
    cases, prompts, out = cohort
    (cases / "noprompts.nrrd").unlink()
    (cases / "broken.nii.gz").unlink()
    prompts_copy(prompts, "ok.json", propagate=False)  # one slice is enough here
    out.mkdir()
    foreign = out / "ok.seg.nrrd"
    foreign.write_bytes(b"someone else's segmentation")  # an output with no report of ours
    code, stdout, _ = batch(cohort, capsys)
    assert code == 1 and json.loads(stdout)["failed"] == ["ok"]
    assert "already exists" in report(out, "ok")["error"]
    assert foreign.read_bytes() == b"someone else's segmentation"
    assert fast_session == []  # refused before loading the model

    code, stdout, _ = batch(cohort, capsys, "--overwrite")
    assert code == 0 and json.loads(stdout) == {"done": ["ok"], "skipped": [], "failed": []}
    assert io.read_segmentation(foreign)[0]["Thalamus_L"].any()


def test_batch_bad_folders(tmp_path, capsys, no_model):
    code, _, err = run(["-q", "batch", tmp_path / "nope", "--prompts-dir", tmp_path, "--output-dir", tmp_path / "o"],
                       capsys)
    assert code == 2 and "cohort folder" in err and "nope" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(["-q", "batch", tmp_path / "empty", "--prompts-dir", tmp_path, "--output-dir", tmp_path / "o"],
                       capsys)
    assert code == 2 and "no volumes" in err


def test_models_lists_the_registry(capsys):
    code, out, _ = run(["models"], capsys)
    assert code == 0
    assert [line.split()[0] for line in out.strip().splitlines()] == ["litemedsam", "sam_vit_b", "sam_vit_l",
                                                                      "sam_vit_h", "medsam_vit_b"]
