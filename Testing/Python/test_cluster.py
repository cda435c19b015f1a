"""``--cluster`` for ``medfm batch``: specs and configs, unreachable / broken workers, and a real
``LocalCluster`` run that matches the serial run byte for byte while a worker is killed (-9) mid-case.

Kept cheap: one-slice crops of the shipped sample, no propagation, clusters of 1-2 worker processes.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import SimpleITK as sitk

from MedFMSegmentLib import cli
from MedFMSegmentLib.session import PromptSession

distributed = pytest.importorskip("distributed")
pytest.importorskip("dask_jobqueue")

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "Sample" / "colin27_t1_deepgrey.nrrd"
SAMPLE_PROMPTS = REPO / "Resources" / "Sample" / "colin27_t1_deepgrey.prompts.json"
SLURM_EXAMPLE = REPO / "Resources" / "cluster" / "slurm.example.yaml"
PYTHONPATH = os.pathsep.join(str(REPO / p) for p in ("MedFMSegment", "MedFMTrain"))


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def make_cohort(folder: Path, slices=(33, 32, 34)):
    """One-slice crops of the sample (slice k of the crop; the prompt's slice is 33), prompts without propagation."""
    cases, prompts = folder / "cases", folder / "prompts"
    cases.mkdir(parents=True)
    prompts.mkdir()
    image = sitk.ReadImage(str(SAMPLE))
    data = json.loads(SAMPLE_PROMPTS.read_text(encoding="utf-8"))
    for seg in data["segments"]:
        seg["propagate"] = False
    for n, k in enumerate(slices):
        name = "abcdefgh"[n]
        sitk.WriteImage(image[:, :, k - 1:k + 2], str(cases / f"{name}.nrrd"), True)  # 3 slices, prompt on one
        (prompts / f"{name}.json").write_text(json.dumps(data), encoding="utf-8")
    return cases, prompts


@pytest.fixture
def no_model(monkeypatch):
    def session(args):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cli, "_session", session)


# ----------------------------------------------------------------------------- specs and configs

BAD_SPECS = [
    ("local:0", "local:N"), ("local:two", "local:N"), ("gpu", "not a cluster spec"), ("tcp://nohost", "HOST:PORT"),
    ("slurm:missing.yaml", "not found"), ("slurm:", "not a cluster spec"),
]


@pytest.mark.parametrize("spec, message", BAD_SPECS)
def test_malformed_spec_is_exit_2_and_writes_nothing(tmp_path, capsys, no_model, spec, message):
    cases, prompts = make_cohort(tmp_path, slices=(33,))
    out = tmp_path / "out"
    code, _, err = run(["-q", "batch", cases, "--prompts-dir", prompts, "--output-dir", out, "--cluster", spec], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("text, message", [
    ("cores: 4\nmemory: 8GB\nqueue: cpu\nwaltime: '01:00:00'\n", "unknown key(s) waltime"),
    ("cores: 4\n", "missing key 'memory'"),
    ("cores: four\nmemory: 8GB\n", "cores = 'four' must be int"),
    ("cores: 4\nmemory: lots\n", "must look like 16GB"),
    ("cores: 4\nmemory: 8GB\nwalltime: soon\n", "HH:MM:SS"),
    ("cores: 2\nmemory: 8GB\nprocesses: 4\n", "processes (4) > cores (2)"),
    ("- cores\n- memory\n", "must be a mapping"),
    ("cores: [1\n", "not readable YAML"),
])
def test_jobqueue_config_is_validated(tmp_path, capsys, no_model, text, message):
    cases, prompts = make_cohort(tmp_path, slices=(33,))
    config = tmp_path / "slurm.yaml"
    config.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    code, _, err = run(["-q", "batch", cases, "--prompts-dir", prompts, "--output-dir", out,
                        "--cluster", f"slurm:{config}"], capsys)
    assert code == 2 and message in err and str(config) in err, err
    assert not out.exists()


def test_example_config_gives_the_job_scripts(tmp_path):
    """The shipped example config builds SLURM and PBS clusters whose job scripts book the cores and
    memory, run one case at a time per worker process and source the prologue (nothing submitted)."""
    from MedFMSegmentLib import cluster

    spec = cluster.parse_cluster_spec(f"slurm:{SLURM_EXAMPLE}")
    assert spec.config["cores"] == 8 and spec.config["processes"] == 2 and spec.config["jobs"] == 4
    slurm = cluster.jobqueue_cluster("slurm", spec.config)
    try:
        script = slurm.job_script()
    finally:
        slurm.close()
    for line in ("#SBATCH -p cpu", "#SBATCH --cpus-per-task=8", "#SBATCH -t 04:00:00",
                 "source ~/medfm-venv/bin/activate", "--nthreads 1", "--nworkers 2"):
        assert line in script, script
    assert "#SBATCH --mem=" in script
    config = tmp_path / "pbs.yaml"
    config.write_text("cores: 4\nmemory: 8GB\nqueue: workq\naccount: lab\nwalltime: '00:30:00'\n", encoding="utf-8")
    pbs_spec = cluster.parse_cluster_spec(f"pbs:{config}")
    pbs = cluster.jobqueue_cluster("pbs", pbs_spec.config)
    try:
        script = pbs.job_script()
    finally:
        pbs.close()
    for line in ("#PBS -q workq", "#PBS -A lab", "#PBS -l select=1:ncpus=4:mem=8GB", "#PBS -l walltime=00:30:00",
                 "--nthreads 1"):
        assert line in script, script


def test_unreachable_scheduler_fails_fast_and_writes_nothing(tmp_path, capsys, no_model):
    cases, prompts = make_cohort(tmp_path, slices=(33,))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    t0 = time.monotonic()
    code, _, err = run(["-q", "batch", cases, "--prompts-dir", prompts, "--output-dir", out,
                        "--cluster", f"tcp://127.0.0.1:{port}"], capsys)
    assert time.monotonic() - t0 < 10
    assert code == 2 and f"tcp://127.0.0.1:{port}" in err and "cannot reach" in err, err
    assert not out.exists()


def test_serial_path_does_not_import_distributed(tmp_path):
    """Without --cluster the batch never imports distributed / dask (the cases fail before any model)."""
    cases, prompts = make_cohort(tmp_path, slices=(33,))
    (prompts / "a.json").unlink()
    code = ("import sys; from MedFMSegmentLib import cli; "
            f"rc = cli.main(['-q', 'batch', {str(cases)!r}, '--prompts-dir', {str(prompts)!r}, "
            f"'--output-dir', {str(tmp_path / 'out')!r}]); "
            "print(rc, sorted(m for m in sys.modules if m.split('.')[0] in ('distributed', 'dask', 'dask_jobqueue')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": PYTHONPATH})
    assert result.stdout.strip().splitlines()[-1] == "1 []", result.stdout + result.stderr


# ----------------------------------------------------------------------------- broken workers

PRELOAD = '''
import os, sys

def dask_setup(worker):
    if str(worker.name) == "0":  # this worker cannot import the engine
        sys.modules["MedFMSegmentLib"] = None
        return
    deny, real_open = {deny!r}, os.open  # this one sees the output folder read-only

    def guarded(path, flags, *args, **kwargs):
        if str(path).startswith(deny) and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    os.open = guarded
'''


def test_workers_that_cannot_import_the_engine_or_write_are_named(tmp_path, capsys, no_model):
    cases, prompts = make_cohort(tmp_path, slices=(33,))
    out = tmp_path / "out"
    preload = tmp_path / "medfm_test_preload.py"
    preload.write_text(PRELOAD.format(deny=str(out.resolve())), encoding="utf-8")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  preload=[str(preload)], silence_logs=40) as local:
        workers = {str(w.name): w.worker_address for w in local.workers.values()}
        code, _, err = run(["-q", "batch", cases, "--prompts-dir", prompts, "--output-dir", out,
                            "--cluster", local.scheduler_address], capsys)
    assert code == 2, err
    assert f"worker {workers['0']}" in err and "cannot import the MedFM engine" in err, err
    assert f"worker {workers['1']}" in err and "cannot write the output folder" in err and "Permission denied" in err
    assert not out.exists()  # the folder this run created is removed again


# ----------------------------------------------------------------------------- a real cluster run

def files_in(folder: Path):
    return sorted(p.name for p in folder.iterdir())


def test_local_cluster_matches_serial_and_survives_a_killed_worker(tmp_path, capsys, monkeypatch, litemedsam):
    """3 cases (+ one without prompts): serial (this process) vs --cluster local:2. One worker is killed with
    SIGKILL while it runs a case: the case is run again on a worker, the run completes, the summary names
    the retried case, the bad case fails once (not retried, exit 1), every output has the serial run's
    bytes, no partial or lock file is left, and a rerun skips every case."""
    import torch

    cases, prompts = make_cohort(tmp_path)
    (cases / "z.nrrd").write_bytes((cases / "a.nrrd").read_bytes())  # bad input (no prompts): failed, not retried
    serial, clustered = tmp_path / "serial", tmp_path / "cluster"
    monkeypatch.setattr(cli, "_session", lambda args: PromptSession(litemedsam))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the local:2 workers on 2 cores
    try:
        code, _, err = run(["-q", "batch", cases, "--prompts-dir", prompts, "--output-dir", serial], capsys)
    finally:
        torch.set_num_threads(threads)
    assert code == 1, err
    monkeypatch.undo()  # the workers load the model themselves

    killed = []

    def kill_first_running_worker():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            for report in clustered.glob("*.report.json") if clustered.is_dir() else ():
                try:
                    data = json.loads(report.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if data.get("status") == "running" and data.get("pid") not in (None, os.getpid()):
                    os.kill(data["pid"], signal.SIGKILL)
                    killed.append(data["case"])
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_first_running_worker, daemon=True)
    killer.start()
    code, stdout, err = run(["-q", "batch", cases, "--prompts-dir", prompts, "--output-dir", clustered,
                             "--cluster", "local:2", "--runtime", "torch"], capsys)  # the serial run's runtime
    killer.join(5)
    assert killed, "no case was seen running"
    assert code == 1, err
    printed = json.loads(stdout)
    assert printed["done"] == ["a", "b", "c"] and printed["failed"] == ["z"] and printed["retried"] == killed
    summary = json.loads((clustered / "summary.json").read_text(encoding="utf-8"))
    rows = {r["case"]: r for r in summary["cases"]}
    assert rows[killed[0]]["retries"] >= 1 and summary["totals"]["retried"] == 1
    bad = rows.pop("z")
    assert bad["status"] == "failed" and bad["retries"] == 0 and "no prompts file" in bad["error"]
    assert all(r["status"] == "done" and r["device"] == "cpu" and r["worker"].startswith("tcp://") for r in rows.values())
    assert all(r["worker_model_loads"] == 1 for r in rows.values())  # one model per worker process
    csv_lines = (clustered / "summary.csv").read_text(encoding="utf-8").splitlines()
    assert csv_lines[0] == "case,status,seconds,worker,retries,device,error" and len(csv_lines) == 5
    for name in "abc":
        assert (clustered / f"{name}.seg.nrrd").read_bytes() == (serial / f"{name}.seg.nrrd").read_bytes(), name
        ours, theirs = (json.loads((f / f"{name}.report.json").read_text(encoding="utf-8")) for f in (clustered, serial))
        assert ours["segments"] == theirs["segments"] and ours["inputs"] == theirs["inputs"]
    assert files_in(clustered) == sorted([f"{n}.{s}" for n in "abc" for s in ("seg.nrrd", "report.json")]
                                         + ["z.report.json", "summary.json", "summary.csv"])

    (cases / "z.nrrd").unlink()
    # resume: every case is done, so no cluster is even started
    t0 = time.monotonic()
    code, stdout, _ = run(["-q", "batch", cases, "--prompts-dir", prompts, "--output-dir", clustered,
                           "--cluster", "local:2"], capsys)
    assert code == 0 and json.loads(stdout) == {"done": [], "skipped": ["a", "b", "c"], "failed": []}
    assert time.monotonic() - t0 < 10


def test_ctrl_c_on_a_cluster_run_leaves_only_complete_outputs(tmp_path):
    """SIGINT to `medfm batch --cluster local:1` while a case runs: exit 130, the futures are cancelled and
    the cluster stopped, no lock or temporary file remains, every output present is complete."""
    cases, prompts = make_cohort(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "MedFMSegmentLib.cli", "-q", "batch", str(cases), "--prompts-dir",
                             str(prompts), "--output-dir", str(out), "--cluster", "local:1"],
                            env={**os.environ, "PYTHONPATH": PYTHONPATH}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            reports = list(out.glob("*.report.json")) if out.is_dir() else []
            if any('"running"' in r.read_text(encoding="utf-8") for r in reports):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert [n for n in files_in(out) if n.startswith(".")] == []
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["interrupted"] and "cancelled" in {r["status"] for r in summary["cases"]}
    from MedFMSegmentLib import io

    for seg in out.glob("*.seg.nrrd"):
        io.read_segmentation(seg)
