"""Cohorts on a Dask cluster: ``--cluster SPEC`` for ``medfm batch`` and ``medfm detect-segment COHORT``.

SPEC is one of

- ``local`` / ``local:N``: a ``distributed.LocalCluster`` of N worker processes on this machine
  (default one per 2 cores), one case at a time per worker, torch threads per worker = cores / N;
- ``tcp://HOST:PORT``: an existing scheduler (``dask scheduler`` + ``dask worker --nthreads 1`` on the
  machines); unreachable within 5 s is an error;
- ``slurm:CONFIG.yaml`` / ``pbs:CONFIG.yaml``: a ``dask-jobqueue`` cluster from a config file (see
  :data:`JOBQUEUE_KEYS` and ``Resources/cluster/slurm.example.yaml``); unknown keys are errors.

Only this module imports ``distributed``; the serial path never imports it. One case is one task
(:func:`_worker_case` -> :func:`batch.run_case`): the worker reads the volume from the shared path,
writes the outputs atomically and the report exactly as the serial path does, and keeps its model
in the :class:`MedFMWorkerPlugin` (loaded once per worker process). A worker that dies mid-case is
replaced (LocalCluster's nanny) and the scheduler runs the case again elsewhere, at most
``retries`` times; the case's report counts the attempts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import dask
import distributed
from distributed import WorkerPlugin

from . import batch
from .errors import InputError

log = logging.getLogger(__name__)

PLUGIN_NAME = "medfm"
CONNECT_TIMEOUT_S = 5.0
SPEC_HELP = ("--cluster takes local, local:N (N worker processes), tcp://HOST:PORT (a running Dask scheduler), "
             "slurm:CONFIG.yaml or pbs:CONFIG.yaml (dask-jobqueue; see Resources/cluster/slurm.example.yaml)")

# key: (type(s), required, meaning) of a slurm:/pbs: config file
JOBQUEUE_KEYS: Dict[str, Tuple[tuple, bool, str]] = {
    "jobs": ((int,), False, "number of batch jobs to submit (default 1)"),
    "cores": ((int,), True, "CPU cores per job"),
    "memory": ((str,), True, "memory per job, e.g. 16GB"),
    "processes": ((int,), False, "worker processes per job (default 1); torch threads = cores / processes"),
    "walltime": ((str,), False, "job time limit HH:MM:SS (default 01:00:00)"),
    "queue": ((str,), False, "partition (SLURM -p) / queue (PBS -q)"),
    "account": ((str,), False, "account / project to charge (-A)"),
    "job_extra_directives": ((list,), False, "extra #SBATCH / #PBS lines, e.g. ['--gres=gpu:1']"),
    "job_script_prologue": ((list,), False, "shell lines run before the worker, e.g. ['source ~/venv/bin/activate']"),
    "interface": ((str,), False, "network interface of the workers, e.g. ib0"),
    "local_directory": ((str,), False, "scratch folder on the nodes"),
    "log_directory": ((str,), False, "folder for the jobs' stdout / stderr"),
    "python": ((str,), False, "python executable on the nodes (default: this one)"),
    "startup_timeout": ((int, float), False, "seconds to wait for the first worker (default 3600)"),
}
_MEMORY = re.compile(r"^\d+(\.\d+)?\s*[kmgtp]i?b$", re.I)
_WALLTIME = re.compile(r"^(\d+-)?\d{1,4}:\d{2}(:\d{2})?$")


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    text: str
    kind: str  # local, tcp, slurm, pbs
    workers: Optional[int] = None
    address: Optional[str] = None
    config_path: Optional[str] = None
    config: Optional[dict] = None


def parse_cluster_spec(text: str) -> ClusterSpec:
    """A ``--cluster`` value, checked (a config file is read and validated); bad values raise InputError."""
    text = (text or "").strip()
    kind, sep, rest = text.partition(":")
    kind = kind.lower()
    if kind == "local":
        if not sep:
            return ClusterSpec(text, "local")
        if not rest.isdigit() or not 1 <= int(rest) <= 512:
            raise InputError(f"--cluster {text!r}: N in local:N must be a whole number from 1 to 512\n{SPEC_HELP}")
        return ClusterSpec(text, "local", workers=int(rest))
    if kind in ("tcp", "tls") and rest.startswith("//"):
        host, _, port = rest[2:].rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InputError(f"--cluster {text!r}: a scheduler address is tcp://HOST:PORT\n{SPEC_HELP}")
        return ClusterSpec(text, "tcp", address=text)
    if kind in ("slurm", "pbs") and rest:
        return ClusterSpec(text, kind, config_path=rest, config=read_jobqueue_config(rest, kind))
    raise InputError(f"--cluster {text!r} is not a cluster spec\n{SPEC_HELP}")


def read_jobqueue_config(path: str, kind: str) -> dict:
    """The validated config of a ``slurm:`` / ``pbs:`` spec, defaults filled in."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{kind} config file {p} not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"{kind} config {p}: not readable YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{kind} config {p}: must be a mapping of keys ({', '.join(JOBQUEUE_KEYS)})")
    unknown = sorted(str(k) for k in data if k not in JOBQUEUE_KEYS)
    if unknown:
        raise InputError(f"{kind} config {p}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(JOBQUEUE_KEYS)}")
    for key, (types, required, meaning) in JOBQUEUE_KEYS.items():
        if key not in data or data[key] is None:
            if required:
                raise InputError(f"{kind} config {p}: missing key {key!r} ({meaning})")
            continue
        value = data[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise InputError(f"{kind} config {p}: {key} = {value!r} must be {' or '.join(t.__name__ for t in types)} "
                             f"({meaning})")
        if types == (list,) and not all(isinstance(v, str) for v in value):
            raise InputError(f"{kind} config {p}: {key} must be a list of strings")
        if types in ((int,), (int, float)) and value <= 0:
            raise InputError(f"{kind} config {p}: {key} = {value!r} must be positive")
    config = {"jobs": 1, "processes": 1, "walltime": "01:00:00", "job_extra_directives": [],
              "job_script_prologue": [], "startup_timeout": 3600, **{k: v for k, v in data.items() if v is not None}}
    if not _MEMORY.match(config["memory"]):
        raise InputError(f"{kind} config {p}: memory = {config['memory']!r} must look like 16GB")
    if not _WALLTIME.match(config["walltime"]):
        raise InputError(f"{kind} config {p}: walltime = {config['walltime']!r} must look like HH:MM:SS")
    if config["processes"] > config["cores"]:
        raise InputError(f"{kind} config {p}: processes ({config['processes']}) > cores ({config['cores']})")
    return config


def jobqueue_cluster(kind: str, config: dict):
    """The (not yet scaled) ``SLURMCluster`` / ``PBSCluster`` of a validated config.

    Each worker process runs one case at a time (``--nthreads 1``); the job books ``cores`` CPUs and
    the worker plugin gives torch ``cores / processes`` threads.
    """
    import dask_jobqueue

    common = dict(cores=config["processes"], processes=config["processes"], memory=config["memory"],
                  walltime=config["walltime"], job_extra_directives=list(config["job_extra_directives"]),
                  job_script_prologue=list(config["job_script_prologue"]))
    for key in ("queue", "account", "interface", "local_directory", "log_directory", "python"):
        if config.get(key):
            common[key] = config[key]
    if kind == "slurm":
        return dask_jobqueue.SLURMCluster(job_cpu=config["cores"], **common)
    return dask_jobqueue.PBSCluster(resource_spec=f"select=1:ncpus={config['cores']}:mem={config['memory']}",
                                    **common)


# ----------------------------------------------------------------------------- workers

class MedFMWorkerPlugin(WorkerPlugin):
    """Per worker process: torch threads, one case at a time, the session (model) made once."""

    name = PLUGIN_NAME

    def __init__(self, torch_threads: Optional[int], make_session):
        self.torch_threads = torch_threads
        self.make_session = make_session  # cli._session, pickled by reference

    def setup(self, worker):
        self.lock = threading.Lock()
        self.sessions: Dict[str, object] = {}
        self.model_loads = 0
        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)
            # the OpenVINO / ONNX Runtime encoders take their thread count from here (runtimes.choose_threads)
            os.environ.setdefault("MEDFM_THREADS", str(self.torch_threads))

    def session(self, job: batch.Job):
        key = json.dumps({k: getattr(job.options, k, None) for k in
                          ("model", "checkpoint", "device", "precision", "compile", "allow_unverified",
                           "runtime", "threads")},
                         sort_keys=True, default=str)
        if key not in self.sessions:
            self.sessions[key] = self.make_session(job.options)
            self.model_loads += 1
        return self.sessions[key]


def _worker_case(case: batch.Case, job: batch.Job) -> dict:
    """One case on a worker (the task of the Dask executor)."""
    worker = distributed.get_worker()
    plugin = worker.plugins.get(PLUGIN_NAME)
    if plugin is None:
        raise RuntimeError(f"worker {worker.address} has no MedFM plugin (it joined before it was registered)")
    with plugin.lock:
        row = batch.run_case(case, job, lambda: plugin.session(job), worker=worker.address)
    row["worker_pid"] = os.getpid()
    row["worker_model_loads"] = plugin.model_loads
    return row


def _probe_function(out_dir: str, version: str):
    """A function (pickled by value, so it runs where the engine may be missing) checking one worker."""
    def probe():
        import os as _os
        import socket as _socket
        import sys as _sys
        import tempfile as _tempfile

        result = {"host": _socket.gethostname(), "python": _sys.executable}
        try:
            import importlib

            importlib.import_module("MedFMSegmentLib.cluster")
            engine = importlib.import_module("MedFMSegmentLib")
            if engine.__version__ != version:
                result["import_error"] = (f"it has MedFM {engine.__version__} ({engine.__file__}), "
                                          f"this run needs {version}")
        except Exception as exc:  # noqa: BLE001 - reported to the user, naming the worker
            result["import_error"] = f"{type(exc).__name__}: {exc}"
        try:
            fd, path = _tempfile.mkstemp(prefix=".medfm-probe-", dir=out_dir)
            _os.close(fd)
            _os.remove(path)
        except OSError as exc:
            result["write_error"] = f"{exc.strerror or exc}"
        return result

    return probe


def check_workers(client, out_dir: Path) -> int:
    """Every connected worker can import the engine and write ``out_dir``; returns the worker count."""
    from . import __version__

    results = client.run(_probe_function(str(out_dir), __version__), on_error="return")
    problems = []
    for address, result in sorted(results.items()):
        if isinstance(result, BaseException):
            problems.append(f"worker {address} failed the check: {type(result).__name__}: {result}")
            continue
        if "import_error" in result:
            problems.append(f"worker {address} ({result['host']}, {result['python']}) cannot import the MedFM "
                            f"engine: {result['import_error']}")
        if "write_error" in result:
            problems.append(f"worker {address} ({result['host']}) cannot write the output folder {out_dir}: "
                            f"{result['write_error']}")
    if problems:
        raise InputError("; ".join(problems))
    return len(results)


# ----------------------------------------------------------------------------- connecting

def connect(spec: ClusterSpec, retries: int = 2, timeout_s: float = CONNECT_TIMEOUT_S):
    """(client, cluster or None, {workers, torch_threads}) for ``spec``; the caller closes both."""
    cores = os.cpu_count() or 2
    cluster = None
    with dask.config.set({"distributed.scheduler.allowed-failures": retries,
                          "distributed.comm.timeouts.connect": f"{timeout_s}s"}):
        try:
            if spec.kind == "local":
                workers = spec.workers or max(1, cores // 2)
                info = {"workers": workers, "torch_threads": max(1, cores // workers)}
                cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                   dashboard_address=":0", silence_logs=logging.ERROR)
                client = distributed.Client(cluster)
            elif spec.kind == "tcp":
                info = {"workers": None, "torch_threads": None}
                try:
                    client = distributed.Client(spec.address, timeout=timeout_s)
                except (OSError, TimeoutError) as exc:
                    raise InputError(f"cannot reach the Dask scheduler at {spec.address} within {timeout_s:g} s "
                                     f"({exc}); is `dask scheduler` running there?") from exc
                try:
                    client.wait_for_workers(1, timeout=timeout_s)
                except (OSError, TimeoutError) as exc:
                    client.close()
                    raise InputError(f"the Dask scheduler at {spec.address} has no workers; start some with "
                                     f"`dask worker {spec.address} --nthreads 1`") from exc
            else:
                config = spec.config
                info = {"workers": config["jobs"] * config["processes"],
                        "torch_threads": max(1, config["cores"] // config["processes"])}
                cluster = jobqueue_cluster(spec.kind, config)
                cluster.scale(jobs=config["jobs"])
                client = distributed.Client(cluster)
                log.warning("submitted %d %s job(s); waiting for the first worker", config["jobs"], spec.kind)
                try:
                    client.wait_for_workers(1, timeout=config["startup_timeout"])
                except (OSError, TimeoutError) as exc:
                    raise InputError(f"no {spec.kind} worker started within {config['startup_timeout']} s "
                                     f"(config {spec.config_path}); check the queue and the job logs") from exc
        except BaseException:
            if cluster is not None:
                cluster.close()
            raise
    return client, cluster, info


class DaskExecutor:
    """One task per case on a Dask client; a few tasks in flight per worker."""

    def __init__(self, client, cluster, info: dict, make_session, retries: int):
        self.client, self.cluster = client, cluster
        self.retries = retries
        workers = info.get("workers") or len(client.scheduler_info().get("workers", {})) or 1
        self.window = max(2 * workers, 2)
        self.info = info
        self.futures: Dict[str, Tuple[batch.Case, object]] = {}
        self.submitted_at: Dict[str, float] = {}  # wall clock: rows carry the worker's started_at / ended_at
        self.done = distributed.as_completed()
        client.register_plugin(MedFMWorkerPlugin(info.get("torch_threads"), make_session))
        self.description = {"executor": "dask", "scheduler": client.scheduler.address,
                            "workers": len(client.scheduler_info().get("workers", {})),
                            "torch_threads_per_worker": info.get("torch_threads")}

    def submit(self, case: batch.Case, job: batch.Job) -> None:
        future = self.client.submit(_worker_case, case, job, key=f"medfm-{job.run_id}-{case.name}", pure=False)
        self.futures[future.key] = (case, future)
        self.submitted_at[case.name] = time.time()
        self.done.add(future)

    def next_result(self) -> Tuple[batch.Case, dict]:
        future = next(self.done)
        case, _ = self.futures.pop(future.key)
        try:
            row = future.result()
            row.update(submitted_at=self.submitted_at.pop(case.name, None), received_at=time.time())
            return case, row
        except distributed.KilledWorker as exc:
            error = (f"the worker running the case died {self.retries + 1} times "
                     f"(retried {self.retries} times, then gave up): {exc}")
        except Exception as exc:  # noqa: BLE001 - e.g. a worker that cannot unpickle the task
            error = f"{type(exc).__name__}: {exc}"
        log.error("case %s failed on the cluster: %s", case.name, error)
        return case, {"case": case.name, "status": "failed", "seconds": 0.0, "worker": None,
                      "retries": self.retries if "died" in error else 0, "device": None, "error": error}

    def cancel(self) -> List[batch.Case]:
        cases = [case for case, _ in self.futures.values()]
        with contextlib.suppress(Exception):
            self.client.cancel([f for _, f in self.futures.values()], force=True)
        self.futures.clear()
        return cases

    def close(self) -> None:
        """Disconnect; a cluster this run started (local, slurm, pbs) is shut down with its workers."""
        with contextlib.suppress(Exception):
            self.client.close()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close()
        self.cluster = None

    def describe(self) -> dict:
        return self.description
