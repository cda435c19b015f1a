"""Cohorts: discovery, per-case state, locks, the serial executor and the run summary.

A cohort is a folder of volumes ``CASE.nrrd`` / ``CASE.nii.gz`` / ...; every case gets
``OUT/CASE.seg.nrrd`` (optionally ``CASE.labels.nii.gz``) and ``OUT/CASE.report.json``. The report is
the case's state:

- it is written (``status: running``) *before* any output is touched, naming the outputs this run is
  about to write, so an output left behind by a killed run, a full disk or a crash is known to be ours
  and is redone on the next run instead of blocking the case;
- at the end it records ``status: done`` with the sha256 of the inputs (volume, prompts or detector
  file) and of every output. A case is *done* only when the report says so, the settings are the same
  and every hash still matches: editing a case's prompts (or replacing its volume) reruns it;
- an existing output that no report of ours names (or whose content changed after we wrote it) is
  someone else's file: it is never replaced without ``--overwrite``. A 0-byte file holds nothing to
  lose and never blocks a case.

Two runs on one output folder share the work through a lock file per case (``OUT/.CASE.lock``,
holding pid, host and the process start time): a case locked by a live run is skipped and reported
as ``locked``; a lock whose process is gone (a killed run) is taken over.

The executor runs :func:`run_case` for each case; :class:`SerialExecutor` in this process, the Dask
executor of :mod:`MedFMSegmentLib.cluster` on workers. Both write exactly the same files.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import glob
import io as pyio
import json
import logging
import os
import re
import socket
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .checksums import file_sha256
from .errors import InputError, MedFMError

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
SUMMARY_JSON, SUMMARY_CSV = "summary.json", "summary.csv"
SUMMARY_COLUMNS = ("case", "status", "seconds", "worker", "retries", "device", "error")
REPORT_VERSION = 2


def case_name(path: Path) -> str:
    """The case name of a volume file: its name without the volume suffix (``a.nii.gz`` -> ``a``)."""
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# ----------------------------------------------------------------------------- cohort discovery

@dataclasses.dataclass(frozen=True)
class Case:
    """One case: absolute paths of its volume, its other input, its outputs and its report."""

    name: str
    volume: str
    outputs: Tuple[Tuple[str, str], ...]  # (role, path): role "seg", "labelmap"
    report: str
    prompts: Optional[str] = None  # segment: the prompts file
    detector: Optional[str] = None  # detect-segment: the detector spec with {case} filled in
    detector_file: Optional[str] = None  # ... and the per-case file it reads, if any
    extra_inputs: Tuple[str, ...] = ()  # files the prompts name (corrections labelmaps): hashed with the inputs

    def output(self, role: str) -> Optional[str]:
        return dict(self.outputs).get(role)

    @property
    def input_files(self) -> List[str]:
        return [p for p in (self.volume, self.prompts, self.detector_file) if p] + list(self.extra_inputs)


def discover_volumes(cohort: Path, out_dir: Path) -> List[Tuple[str, Path]]:
    """The cohort's volumes as (case, path), sorted; bad folders and duplicate case names are errors.

    Only the cohort folder's own files are cases (not sub-folders), so an output folder inside the
    cohort never turns outputs into cases; an output folder equal to the cohort folder is refused.
    """
    if not cohort.is_dir():
        raise InputError(f"cohort folder {cohort} does not exist or is not a folder")
    if out_dir.exists() and out_dir.resolve() == cohort.resolve():
        raise InputError(f"output folder {out_dir} is the cohort folder {cohort}: its outputs would become cases; "
                         f"pick another --output-dir (a sub-folder is fine)")
    found: Dict[str, List[Path]] = {}
    for p in sorted(cohort.iterdir()):
        if p.is_file() and p.name.endswith(VOLUME_SUFFIXES) and not p.name.startswith("."):
            found.setdefault(case_name(p), []).append(p)
    if not found:
        raise InputError(f"no volumes ({', '.join(VOLUME_SUFFIXES)}) in {cohort}")
    clashes = {name: paths for name, paths in found.items() if len(paths) > 1}
    if clashes:
        text = "; ".join(f"{name}: {' and '.join(str(p) for p in paths)}" for name, paths in clashes.items())
        raise InputError(f"two volumes give the same case name (outputs would collide); rename one: {text}")
    return [(name, paths[0]) for name, paths in found.items()]


def _abs(path) -> str:
    return os.path.abspath(os.fspath(path))


def segment_cases(cohort: Path, prompts_dir: Path, out_dir: Path, labelmaps: bool) -> List[Case]:
    """The cases of ``medfm batch``: ``COHORT/CASE.*`` with ``PROMPTS/CASE.json`` (and the corrections
    labelmaps it names, hashed with the inputs so that editing one reruns the case)."""
    from .corrections import labelmap_paths

    if not prompts_dir.is_dir():
        raise InputError(f"prompts folder {prompts_dir} does not exist or is not a folder")
    volumes = discover_volumes(cohort, out_dir)
    if out_dir.exists() and prompts_dir.resolve() == out_dir.resolve() and "summary" in dict(volumes):
        raise InputError(f"case 'summary' has its prompts in the output folder {out_dir}, where the run "
                         f"writes {SUMMARY_JSON}; use another --output-dir")
    cases = []
    for name, volume in volumes:
        outputs = [("seg", _abs(out_dir / f"{name}.seg.nrrd"))]
        if labelmaps:
            outputs.append(("labelmap", _abs(out_dir / f"{name}.labels.nii.gz")))
        prompts = _abs(prompts_dir / f"{name}.json")
        cases.append(Case(name, _abs(volume), tuple(outputs), _abs(out_dir / f"{name}.report.json"),
                          prompts=prompts, extra_inputs=tuple(labelmap_paths(prompts))))
    return cases


def detect_cases(cohort: Path, detector: str, out_dir: Path, labelmaps: bool) -> List[Case]:
    """The cases of ``medfm detect-segment COHORT``: ``{case}`` in the detector spec names each case's file."""
    volumes = discover_volumes(cohort, out_dir)
    kind, _, rest = detector.partition(":")
    per_case = "{case}" in detector
    if not per_case and kind.strip().lower() in ("labelmap", "boxes"):
        raise InputError(f"detector spec {detector!r}: over a cohort, a {kind} detector needs one file per case; "
                         "write {case} where the case name goes, e.g. labelmap:labels/{case}.nii.gz")
    cases = []
    for name, volume in volumes:
        spec = detector.replace("{case}", name)
        path = _spec_path(spec) if per_case else None
        outputs = [("seg", _abs(out_dir / f"{name}.seg.nrrd"))]
        if labelmaps:
            outputs.append(("labelmap", _abs(out_dir / f"{name}.labels.nii.gz")))
        cases.append(Case(name, _abs(volume), tuple(outputs), _abs(out_dir / f"{name}.report.json"),
                          detector=spec, detector_file=_abs(path) if path else None))
    return cases


_SPEC_OPTION = re.compile(r"^(per-component|fully-connected|min-voxels=\d+|device=[\w:]+)$")


def _spec_path(spec: str) -> str:
    """The file of a ``KIND:PATH[:options]`` detector spec (options recognised from the right)."""
    rest = spec.split(":", 1)[1]
    while ":" in rest and _SPEC_OPTION.match(rest.rsplit(":", 1)[1]):
        rest = rest.rsplit(":", 1)[0]
    return rest


# ----------------------------------------------------------------------------- case state

def read_report(path) -> Optional[dict]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _claims(report: Optional[dict]) -> Dict[str, Optional[str]]:
    """{output path: sha256 or None (written or being written, content unknown)} a report claims as ours."""
    if not report:
        return {}
    outputs = report.get("outputs")
    if isinstance(outputs, dict):
        return {str(k): (v if isinstance(v, str) else None) for k, v in outputs.items()}
    # a report of an older medfm: it names its output, without a hash
    return {str(report[k]): None for k in ("output", "labelmap") if isinstance(report.get(k), str)}


def _is_ours(path: str, claims: Dict[str, Optional[str]]) -> bool:
    """An existing output may be replaced: it is empty, or ours and unchanged since we wrote it."""
    try:
        if os.path.getsize(path) == 0:
            return True
    except OSError:
        return True  # vanished
    if path not in claims:
        return False
    recorded = claims[path]
    return recorded is None or recorded == file_sha256(path)


def case_is_done(case: Case, settings: dict, report: Optional[dict] = None) -> bool:
    """The report says done, with these settings, and every input and output hash still matches."""
    report = read_report(case.report) if report is None else report
    if not report or report.get("status") != "done" or report.get("settings") != settings:
        return False
    inputs, outputs = report.get("inputs"), report.get("outputs")
    if not isinstance(inputs, dict) or not isinstance(outputs, dict):
        return False
    if sorted(inputs) != sorted(case.input_files):
        return False
    expected = [p for _, p in case.outputs]
    if report.get("found_nothing"):
        expected = []
    if sorted(outputs) != sorted(expected):
        return False
    try:
        return all(file_sha256(p) == h for p, h in list(inputs.items()) + list(outputs.items()))
    except OSError:
        return False


def _remove_temporaries(case: Case) -> None:
    """Temporary files a killed writer left next to this case's outputs and report (the case is locked)."""
    for path in [p for _, p in case.outputs] + [case.report]:
        folder, name = os.path.split(path)
        for tmp in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*tmp*")):
            try:
                os.remove(tmp)
                log.info("removed the partial file %s of an interrupted run", tmp)
            except OSError:
                pass


# ----------------------------------------------------------------------------- locks

def _process_start(pid: int) -> Optional[float]:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


@contextlib.contextmanager
def _folder_guard(folder: str):
    """An exclusive flock on the folder while a lock is taken or taken over (released if we die)."""
    try:
        import fcntl
    except ImportError:  # Windows: O_EXCL alone (a stale-lock takeover race is possible there)
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock
            pass
        yield
    finally:
        os.close(fd)  # releases the flock


class CaseLocks:
    """``OUT/.CASE.lock`` files held by this run; taken with O_EXCL, stale ones (dead pid) taken over."""

    def __init__(self, out_dir: Path, run_id: str):
        self.out_dir = str(out_dir)
        self.run_id = run_id
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.held: Dict[str, str] = {}

    def path(self, case: str) -> str:
        return os.path.join(self.out_dir, f".{case}.lock")

    def _owner_alive(self, info: Optional[dict], path: str) -> bool:
        if not info:  # empty or garbled: a run killed while writing it (we hold the folder guard)
            try:
                return time.time() - os.path.getmtime(path) < 10
            except OSError:
                return False
        if info.get("host") != self.host:
            return True  # another machine's run: it cannot be checked from here
        try:
            pid, started = int(info["pid"]), float(info["started"])
        except (KeyError, TypeError, ValueError):
            return False
        actual = _process_start(pid)
        return actual is not None and abs(actual - started) < 1.0

    def acquire(self, case: str) -> Optional[dict]:
        """Take the case's lock; ``None`` on success, else the live owner's lock record."""
        path = self.path(case)
        record = json.dumps({"pid": self.pid, "host": self.host, "started": _process_start(self.pid),
                             "run": self.run_id, "case": case})
        with _folder_guard(self.out_dir):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                info = read_report(path)
                if self._owner_alive(info, path):
                    return info or {"file": path}
                log.warning("case %s: taking over the lock %s of a run that is gone (%s)", case, path,
                            f"pid {info.get('pid')} on {info.get('host')}" if info else "unreadable")
                fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(fd, record.encode("utf-8"))
            finally:
                os.close(fd)
        self.held[case] = path
        return None

    def release(self, case: str) -> None:
        path = self.held.pop(case, None)
        if path:
            with contextlib.suppress(OSError):
                os.remove(path)

    def release_all(self) -> None:
        for case in list(self.held):
            self.release(case)


# ----------------------------------------------------------------------------- one case

@dataclasses.dataclass
class Job:
    """What every case of a run shares; picklable (sent to Dask workers)."""

    kind: str  # "segment" or "detect-segment"
    options: argparse.Namespace  # the CLI options (without the parser's func)
    settings: dict  # the options that change a result; a done case with other settings is redone
    run_id: str
    runner: Callable  # runner(options, case, get_session) -> report dict (cli.segment_runner / cli.detect_runner)


def job_options(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "func"})


def _verify_outputs(case: Case, report: dict) -> Dict[str, str]:
    """sha256 of every output the case wrote, after checking each is non-empty and reads back."""
    from . import io

    hashes = {}
    if report.get("found_nothing"):
        return hashes
    for role, path in case.outputs:
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            raise MedFMError(f"output {path} is missing or empty after writing it")
        try:
            (io.read_segmentation if role == "seg" else io.read_volume)(path)
        except Exception as exc:
            raise MedFMError(f"output {path} does not read back: {exc}") from exc
        hashes[path] = file_sha256(path)
    return hashes


def run_case(case: Case, job: Job, get_session: Callable, worker: str = "local") -> dict:
    """Run one case and write its outputs and report; returns the per-case summary row.

    Bad input (a missing prompts file, a prompt off the volume, an output of someone else) is a
    ``failed`` row, never an exception; ``KeyboardInterrupt`` leaves the ``running`` report (the next
    run redoes the case) and propagates.
    """
    from .io import write_text_atomic

    t0, started_at = time.perf_counter(), time.time()
    prior = read_report(case.report)
    attempt = 1
    if prior and prior.get("status") == "running" and prior.get("run") == job.run_id:
        attempt = int(prior.get("attempt", 1)) + 1  # the previous attempt's worker died
    claims = _claims(prior)
    base = {"case": case.name, "report_version": REPORT_VERSION, "run": job.run_id, "attempt": attempt,
            "retries": attempt - 1, "worker": worker, "host": socket.gethostname(), "pid": os.getpid(),
            "volume": case.volume, "settings": job.settings}
    _remove_temporaries(case)
    try:
        # a missing corrections labelmap is named with its key path when the prompts are resolved
        missing = [p for p in case.input_files if not os.path.isfile(p) and p not in case.extra_inputs]
        if case.prompts and case.prompts in missing:
            raise InputError(f"no prompts file {case.prompts} for case {case.name}")
        if missing:
            raise InputError(f"case {case.name}: input file {missing[0]} not found")
        existing = [p for _, p in case.outputs if os.path.exists(p)]
        foreign = [p for p in existing if not _is_ours(p, claims)]
        if foreign and not job.options.overwrite:
            changed = [p for p in foreign if p in claims]
            why = "was changed after medfm wrote it" if changed else "already exists and was not written by this batch"
            raise InputError(f"output {foreign[0]} {why}; pass --overwrite to replace it")
        inputs = {p: file_sha256(p) for p in case.input_files if os.path.isfile(p)}
        # from here on the outputs are ours: a kill leaves this report, and the next run redoes the case
        claimed = {**{p: None for p in existing}, **{p: None for _, p in case.outputs}}
        write_text_atomic(case.report, json.dumps({**base, "status": "running", "inputs": inputs,
                                                   "outputs": claimed}, indent=1), overwrite=True)
        options = argparse.Namespace(**vars(job.options))
        options.overwrite = True  # every existing output is ours (or --overwrite was given)
        rep = job.runner(options, case, get_session)
        outputs = _verify_outputs(case, rep)
        row = {**base, **rep, "status": "done", "inputs": inputs, "outputs": outputs,
               "segment_seconds": rep.get("seconds"), "seconds": round(time.perf_counter() - t0, 2),
               "settings": job.settings}
        write_text_atomic(case.report, json.dumps(row, indent=1, default=str), overwrite=True)
    except Exception as exc:  # one bad case must not stop the cohort
        log.error("case %s failed: %s", case.name, exc)
        keep = {p: None for p in claims if os.path.exists(p) and _is_ours(p, claims)}
        row = {**base, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
               "seconds": round(time.perf_counter() - t0, 2), "outputs": keep}
        if not isinstance(exc, (MedFMError, OSError)):
            row["traceback"] = traceback.format_exc()
        try:
            write_text_atomic(case.report, json.dumps(row, indent=1, default=str), overwrite=True)
        except OSError as write_exc:  # e.g. the disk is full: the running report stays, the case is redone
            log.error("case %s: could not write its report %s: %s", case.name, case.report, write_exc)
    return {"case": case.name, "status": row["status"], "seconds": row["seconds"], "worker": worker,
            "retries": row["retries"], "device": row.get("device"), "error": row.get("error"),
            "segment_seconds": row.get("segment_seconds"), "started_at": started_at, "ended_at": time.time()}


# ----------------------------------------------------------------------------- executors and the run

class SerialExecutor:
    """Cases one after the other in this process, on one lazily made session."""

    window = 1

    def __init__(self, make_session: Callable):
        self._make_session = make_session
        self._sessions: List[object] = []
        self._queue: List[Tuple[Case, Job]] = []

    def get_session(self):
        if not self._sessions:
            self._sessions.append(self._make_session())
        return self._sessions[0]

    def submit(self, case: Case, job: Job) -> None:
        self._queue.append((case, job))

    def next_result(self) -> Tuple[Case, dict]:
        case, job = self._queue.pop(0)
        return case, run_case(case, job, self.get_session)

    def cancel(self) -> List[Case]:
        cases = [c for c, _ in self._queue]
        self._queue.clear()
        return cases

    def close(self) -> None:
        pass

    def describe(self) -> dict:
        return {"executor": "serial"}


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def run_cohort(cases: Sequence[Case], job: Job, executor, out_dir: Path, quiet: bool = True,
               cluster: Optional[str] = None) -> dict:
    """Every case through ``executor``: skipped if done, ``locked`` if another live run holds it.

    Writes ``summary.json`` + ``summary.csv`` and returns the summary (``summary["cases"]`` rows).
    """
    from tqdm import tqdm

    locks = CaseLocks(out_dir, job.run_id)
    rows: Dict[str, dict] = {}
    inflight: Dict[str, Case] = {}
    t0 = time.perf_counter()
    pending = list(cases)
    interrupted = False
    bar = tqdm(total=len(cases), desc="batch", unit="case", disable=quiet, file=sys.stderr)
    try:
        while pending or inflight:
            while pending and len(inflight) < executor.window:
                case = pending.pop(0)
                state = _claim(case, job, locks)
                if state is None:
                    executor.submit(case, job)
                    inflight[case.name] = case
                else:
                    rows[case.name] = state
                    bar.update(1)
            if not inflight:
                continue
            case, row = executor.next_result()
            inflight.pop(case.name, None)
            locks.release(case.name)
            rows[case.name] = row
            bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
        stopped = list(inflight.values()) + executor.cancel()
        executor.close()  # a cluster of this run stops its workers: no writer is left
        for case in stopped:
            rows.setdefault(case.name, _row(case.name, "cancelled"))
            _remove_temporaries(case)
        for case in pending:
            rows.setdefault(case.name, _row(case.name, "cancelled"))
        raise
    finally:
        bar.close()
        locks.release_all()
        summary = _summary([rows.get(c.name) or _row(c.name, "cancelled") for c in cases], job,
                           time.perf_counter() - t0, cluster, executor.describe(), interrupted)
        write_summary(out_dir, summary)
    return summary


def _row(case: str, status: str, **extra) -> dict:
    return {"case": case, "status": status, "seconds": 0.0, "worker": None, "retries": 0, "device": None,
            "error": None, **extra}


def _claim(case: Case, job: Job, locks: CaseLocks) -> Optional[dict]:
    """None when the case is to run (its lock is held), else its row (skipped / locked)."""
    if not job.options.overwrite and case_is_done(case, job.settings):
        return _row(case.name, "skipped")
    owner = locks.acquire(case.name)
    if owner is not None:
        who = f"pid {owner.get('pid')} on {owner.get('host')}" if "pid" in owner else owner.get("file")
        log.warning("case %s is being processed by another run (%s); skipped", case.name, who)
        return _row(case.name, "locked", error=f"locked by {who} ({locks.path(case.name)})")
    if not job.options.overwrite and case_is_done(case, job.settings):  # finished meanwhile
        locks.release(case.name)
        return _row(case.name, "skipped")
    return None


def _summary(rows: List[dict], job: Job, seconds: float, cluster: Optional[str], executor: dict,
             interrupted: bool) -> dict:
    totals = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed", "locked", "cancelled")}
    totals.update(cases=len(rows), retried=sum(1 for r in rows if r.get("retries")),
                  case_seconds=round(sum(r.get("seconds") or 0 for r in rows), 2))
    return {"run": job.run_id, "command": job.kind, "cluster": cluster, **executor,
            "seconds": round(seconds, 2), "interrupted": interrupted, "totals": totals, "cases": rows}


def write_summary(out_dir: Path, summary: dict) -> None:
    """``summary.json`` and ``summary.csv`` (one row per case), written atomically."""
    from .io import write_text_atomic

    try:
        write_text_atomic(Path(out_dir) / SUMMARY_JSON, json.dumps(summary, indent=1, default=str), overwrite=True)
        text = pyio.StringIO()
        writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in summary["cases"]:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in SUMMARY_COLUMNS})
        write_text_atomic(Path(out_dir) / SUMMARY_CSV, text.getvalue(), overwrite=True)
    except OSError as exc:
        log.error("could not write the run summary in %s: %s", out_dir, exc)


def stdout_summary(summary: dict) -> dict:
    """The short summary printed by the CLI: case names by outcome (``locked`` / ``retried`` when any)."""
    rows = summary["cases"]
    out = {s: [r["case"] for r in rows if r["status"] == s] for s in ("done", "skipped", "failed")}
    for key, names in (("locked", [r["case"] for r in rows if r["status"] == "locked"]),
                       ("retried", [r["case"] for r in rows if r.get("retries")])):
        if names:
            out[key] = names
    return out


def exit_status(summary: dict) -> int:
    """0 when every case of the cohort is done (now or before); 1 when some failed or are locked."""
    return 0 if all(r["status"] in ("done", "skipped") for r in summary["cases"]) else 1


def settings_of(args: argparse.Namespace, kind: str, keys: Iterable[str]) -> dict:
    return {"command": kind, **{k: getattr(args, k, None) for k in keys}}
