"""Where the network runs: torch or OpenVINO, at which precision, on how many threads; chosen per machine.

``plan_runtime`` is the choice (pure logic: CUDA torch on an NVIDIA GPU, MPS on Apple, otherwise
OpenVINO fp32 on the CPU when it is installed, bf16 only on CPUs with native bf16 and only if its
masks agree with fp32). ``cached_export`` keeps converted models in a per-user cache, keyed by the
weights' sha256, the runtime's version, the input size and the precision; every entry carries a
manifest with the sha256 of its files and is written under a temporary name, then renamed, so an
interrupted export never leaves anything that would be loaded. ``models.load_model`` wires these
together and falls back to torch with one log line when an export or its check fails.

ONNX Runtime: ``torch.onnx.export`` needs the ``onnx`` package (and the new exporter ``onnxscript``),
which MedFM does not depend on, so ``runtime="onnxruntime"`` falls back to torch with a log line
unless both are installed (the export itself is not implemented here; see ``onnxruntime_available``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import warnings
import os
import platform
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")
PRECISIONS = ("fp32", "bf16")
# masks decoded from a runtime's embedding must agree with torch fp32's at least this well (Dice)
MIN_AGREEMENT = {"fp32": 0.995, "bf16": 0.98}
FP32_MAX_ABS_DIFF = 1e-3  # largest embedding difference accepted for an fp32 runtime
EXPORT_FORMAT = 1  # bump when the layout of a cache entry changes: old entries are then rebuilt
_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
              "asimd", "neon", "bf16", "sve", "sme")
_NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "bf16")


# --------------------------------------------------------------------------- validation

def check_runtime(runtime: Optional[str]) -> str:
    name = "auto" if runtime is None else str(runtime).lower()
    if name not in RUNTIMES:
        raise InputError(f"unknown runtime {runtime!r}: use {', '.join(RUNTIMES)}")
    return name


def check_precision(precision: Optional[str]) -> Optional[str]:
    """None (choose per machine), 'fp32' or 'bf16'."""
    if precision is None or precision == "auto":
        return None
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}: use fp32 or bf16")
    return precision


# --------------------------------------------------------------------------- the machine

@dataclass(frozen=True)
class CpuInfo:
    model: str
    arch: str
    flags: Tuple[str, ...]  # the ISA extensions that matter for inference, as the OS names them

    @property
    def native_bf16(self) -> bool:
        """AVX512-BF16 or AMX-BF16 (x86), or the Arm BF16 extension."""
        return any(f in self.flags for f in _NATIVE_BF16)

    def as_dict(self) -> dict:
        return {"model": self.model, "arch": self.arch, "isa_flags": list(self.flags),
                "native_bf16": self.native_bf16}


def _sysctl(name: str) -> str:
    import subprocess

    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_info(cpuinfo_text: Optional[str] = None) -> CpuInfo:
    """The CPU model and its inference-relevant ISA flags (``cpuinfo_text``: a /proc/cpuinfo to parse)."""
    arch = platform.machine()
    model, flags = "", set()
    text = cpuinfo_text
    if text is None and os.path.exists("/proc/cpuinfo"):
        try:
            text = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            text = None
    if text:
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu model", "hardware") and not model:
                model = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = set(value.split())
    elif platform.system() == "Darwin":
        model = _sysctl("machdep.cpu.brand_string")
        if arch == "arm64":
            flags = {"neon", "asimd"} | ({"bf16"} if _sysctl("hw.optional.arm.FEAT_BF16") == "1" else set())
        else:
            flags = {f.lower().replace(".", "_") for f in
                     (_sysctl("machdep.cpu.features") + " " + _sysctl("machdep.cpu.leaf7_features")).split()}
    return CpuInfo(model or platform.processor() or "unknown", arch,
                   tuple(f for f in _ISA_FLAGS if f in flags))


def choose_threads(requested: Optional[int] = None) -> Tuple[int, str]:
    """Threads for inference: ``requested``, else ``$MEDFM_THREADS``, else the cores free right now.

    Free cores = the cores this process may run on (``sched_getaffinity``) minus the 1-minute load
    average, at least 1 (on a loaded machine, 1 thread beats 2: threads wait for descheduled peers).
    """
    if requested is not None:
        if int(requested) < 1:
            raise InputError(f"threads must be at least 1, got {requested!r}")
        return int(requested), "requested by the caller"
    env = os.environ.get("MEDFM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise InputError(f"MEDFM_THREADS must be a whole number, got {env!r}") from None
        if n < 1:
            raise InputError(f"MEDFM_THREADS must be at least 1, got {env!r}")
        return n, "from $MEDFM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = max(1, min(cores, int(round(cores - load))))
    return free, f"{cores} cores available, load average {load:.1f}"


def limit_heap_fragmentation(threshold: int = 1 << 20) -> bool:
    """glibc only: serve blocks of >= ``threshold`` bytes with mmap, so a freed embedding goes back to
    the OS. Without it glibc raises its mmap threshold after the first frees and serves the 2-4 MB
    embeddings from the heap: measured, filling a 768 MB embedding cache grew the resident size by
    2,050 MB (by 768 MB with it). Returns whether the setting was applied (process-wide, idempotent).
    """
    if platform.system() != "Linux":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


# --------------------------------------------------------------------------- the choice

@dataclass(frozen=True)
class RuntimePlan:
    runtime: str  # "torch" | "openvino"
    precision: str  # "fp32" | "bf16": what to try; a bf16 plan falls back to fp32 if its check fails
    reason: str


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def onnxruntime_available() -> bool:
    """ONNX Runtime needs an ONNX export, and torch.onnx.export needs the ``onnx`` package."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx", "onnxscript"))


def plan_runtime(runtime: str, precision: Optional[str], device_type: str, cpu: CpuInfo,
                 have_openvino: bool) -> RuntimePlan:
    """What to run on (see module docstring). ``precision`` None means: choose per machine."""
    if device_type != "cpu":
        why = {"cuda": "NVIDIA GPU", "mps": "Apple GPU (MPS)"}.get(device_type, device_type)
        if runtime not in ("auto", "torch"):
            return RuntimePlan("torch", precision or "fp32", f"{why}: {runtime} runs on the CPU only, using torch")
        return RuntimePlan("torch", precision or "fp32", f"{why}: torch")
    if runtime == "torch":
        if precision == "bf16" and not cpu.native_bf16:
            return RuntimePlan("torch", "bf16", "torch requested; bf16 requested on a CPU without native bf16 "
                                                "(slow)")
        return RuntimePlan("torch", precision or "fp32", "torch requested")
    if runtime == "onnxruntime":
        return RuntimePlan("torch", precision or "fp32",
                           "onnxruntime requested but unavailable: torch.onnx.export needs the 'onnx' package, "
                           "which is not installed; using torch")
    if not have_openvino:
        return RuntimePlan("torch", precision or "fp32", f"{'openvino requested but' if runtime == 'openvino' else ''}"
                                                         " OpenVINO is not installed; torch".strip())
    head = "openvino requested" if runtime == "openvino" else "CPU: OpenVINO (fastest CPU runtime measured)"
    if precision == "fp32":
        return RuntimePlan("openvino", "fp32", f"{head}, fp32 requested")
    if precision == "bf16":
        note = "" if cpu.native_bf16 else " on a CPU without native bf16 (slow)"
        return RuntimePlan("openvino", "bf16", f"{head}, bf16 requested{note}; kept only if its masks agree")
    if cpu.native_bf16:
        return RuntimePlan("openvino", "bf16", f"{head}; native bf16 ({', '.join(f for f in cpu.flags if f in _NATIVE_BF16)}): "
                                               "bf16 if its masks agree with fp32 and it is faster, else fp32")
    return RuntimePlan("openvino", "fp32", f"{head}, fp32 (no native bf16 on this CPU)")


def bf16_accepted(check: dict) -> bool:
    """The gate for bf16: masks agree with torch fp32 and the probe ran faster than fp32."""
    return (check.get("agreement_dice", 0.0) >= MIN_AGREEMENT["bf16"]
            and check.get("seconds", float("inf")) < check.get("fp32_seconds", 0.0))


def check_passed(check: dict, precision: str) -> bool:
    if precision == "bf16":
        return bf16_accepted(check)
    return (check.get("agreement_dice", 0.0) >= MIN_AGREEMENT["fp32"]
            and check.get("max_abs_diff", float("inf")) <= FP32_MAX_ABS_DIFF)


# --------------------------------------------------------------------------- the cache

def default_cache_dir() -> Path:
    """``$MEDFM_CACHE_DIR``, else the platform's per-user cache folder + ``medfm``."""
    env = os.environ.get("MEDFM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    system = platform.system()
    if system == "Windows":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "medfm" / "Cache"
    if system == "Darwin":
        return Path.home() / "Library" / "Caches" / "medfm"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medfm"


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def cache_dir(path: Optional[Path] = None) -> Path:
    """A writable cache folder: ``path`` or the default; a private temporary one (warned) if read-only."""
    wanted = Path(path) if path is not None else default_cache_dir()
    if _writable(wanted):
        return wanted
    uid = os.getuid() if hasattr(os, "getuid") else os.getpid()
    fallback = Path(tempfile.gettempdir()) / f"medfm-cache-{uid}"
    try:
        fallback.mkdir(mode=0o700, exist_ok=True)
        if hasattr(os, "getuid") and fallback.stat().st_uid != os.getuid():
            raise OSError("owned by another user")
    except OSError:
        fallback = Path(tempfile.mkdtemp(prefix="medfm-cache-"))
    log.warning("cache folder %s is not writable; using %s (exported models are rebuilt there)", wanted, fallback)
    return fallback


def _file_sha256(path: Path) -> str:
    from .checksums import file_sha256

    return file_sha256(path)


def entry_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def read_entry(entry: Path, identity: dict) -> Tuple[Optional[dict], str]:
    """(manifest, "") if the cache entry is complete and belongs to ``identity``; else (None, why not)."""
    manifest_path = entry / "manifest.json"
    if not entry.is_dir():
        return None, "not cached"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"unreadable manifest ({exc.__class__.__name__})"
    if not isinstance(manifest, dict) or manifest.get("identity") != identity:
        return None, "made for another model, runtime version, input size or precision"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return None, "manifest lists no files"
    for name, sha in files.items():
        path = entry / name
        if not path.is_file():
            return None, f"{name} is missing"
        if _file_sha256(path) != sha:
            return None, f"{name} does not match its sha256 (truncated or modified)"
    return manifest, ""


def _remove_stale_temporaries(parent: Path, max_age_s: float = 3600.0) -> None:
    now = time.time()
    for tmp in parent.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def cached_export(root: Path, kind: str, identity: dict, export: Callable[[Path], dict]) -> Tuple[Path, dict, float]:
    """The cache entry for ``identity``, exported by ``export(folder) -> manifest extras`` if needed.

    Returns (entry folder, manifest, seconds spent exporting: 0 on a cache hit). ``export`` writes its
    files into a fresh temporary folder; the manifest (their sha256s + the identity) is written last and
    the folder is renamed into place, so readers only ever see complete entries. A stale or corrupt
    entry is removed and rebuilt.
    """
    identity = {**identity, "kind": kind, "format": EXPORT_FORMAT}
    parent = Path(root) / kind
    entry = parent / entry_key(identity)
    manifest, why = read_entry(entry, identity)
    if manifest is not None:
        return entry, manifest, 0.0
    if entry.exists():
        log.warning("cached %s export %s is unusable (%s): rebuilding it", kind, entry, why)
        shutil.rmtree(entry, ignore_errors=True)
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=parent))
    t0 = time.perf_counter()
    try:
        extras = export(tmp) or {}
        files = {p.name: _file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {**extras, "identity": identity, "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(tmp / "manifest.json", "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        seconds = time.perf_counter() - t0
        try:
            os.rename(tmp, entry)
        except OSError:  # another process finished the same export first: use theirs if it is good
            theirs, _ = read_entry(entry, identity)
            if theirs is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return entry, theirs, seconds
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry, manifest, seconds


# --------------------------------------------------------------------------- OpenVINO

_TELEMETRY_LOCK = threading.Lock()


@contextlib.contextmanager
def _no_telemetry() -> Iterator[None]:
    """Run OpenVINO's model conversion with its telemetry replaced by the no-op stub (no network)."""
    from openvino.tools.ovc import convert_impl, telemetry_stub

    with _TELEMETRY_LOCK:
        saved = convert_impl.tm, convert_impl.init_ovc_telemetry
        convert_impl.tm = telemetry_stub
        convert_impl.init_ovc_telemetry = lambda *a, **k: telemetry_stub.Telemetry()
        try:
            yield
        finally:
            convert_impl.tm, convert_impl.init_ovc_telemetry = saved


def openvino_version() -> str:
    import openvino as ov

    return ov.get_version()


def export_openvino(module, example_inputs: tuple, folder: Path, input_shapes: Optional[list] = None,
                    name: str = "model") -> Path:
    """Convert a torch module to OpenVINO IR (``NAME.xml`` + ``NAME.bin``, fp32 weights) in ``folder``."""
    import openvino as ov
    import torch

    with _no_telemetry(), torch.inference_mode():
        example = example_inputs if len(example_inputs) > 1 else example_inputs[0]
        kwargs = {"example_input": example}
        if input_shapes is not None:
            kwargs["input"] = [(shape, ov.Type.f32) for shape in input_shapes]
        with warnings.catch_warnings():  # torch.jit's Tracer/Future warnings about the model's own code:
            warnings.simplefilter("ignore")  # noise on the user's terminal, the probe check is what counts
            # traced once here, without torch's trace check (two more forward passes): convert_model given the
            # module traces it itself with the check, 3 passes; measured 52 s -> 17 s for the encoder (2 cores,
            # load 4). The export is checked against torch on the probe image anyway.
            traced = torch.jit.trace(module, example, check_trace=False)
            model = ov.convert_model(traced, **kwargs)
    xml = Path(folder) / f"{name}.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml


class ChainedModel:
    """Compiled OpenVINO models run one after the other (each one's first output is the next one's input),
    e.g. an encoder's high-resolution stem in fp32 and the rest in bf16; called like an ``OpenVINOModel``."""

    def __init__(self, models: Sequence["OpenVINOModel"]):
        self.models = list(models)
        self.threads = self.models[0].threads
        self.precision = "+".join(m.precision for m in self.models)

    def __call__(self, *arrays: np.ndarray) -> List[np.ndarray]:
        out = self.models[0](*arrays)
        for m in self.models[1:]:
            out = m(out[0])
        return out


class OpenVINOModel:
    """A compiled OpenVINO model: ``model(*float32 arrays) -> list of float32 arrays`` (thread-safe).

    ``input_shape``: compile for this one input shape (the exported graph's is dynamic). Measured on the
    LiteMedSAM encoder ((1, 3, 256, 256), 1 thread): 65 MB less working memory at the first inference
    (226 -> 159 MB), bitwise the same embeddings (Testing/Python/test_memory.py), no slower.
    """

    def __init__(self, xml: Path, precision: str, threads: int, input_shape: Optional[Sequence[int]] = None):
        import openvino as ov

        self.precision, self.threads = precision, int(threads)
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                  "INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY"}
        model = core.read_model(str(xml))
        if input_shape is not None:
            model.reshape([int(n) for n in input_shape])
        self._compiled = core.compile_model(model, "CPU", config)
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()

    def __call__(self, *arrays: np.ndarray) -> List[np.ndarray]:
        return self.run(arrays, lambda outputs: [np.array(o, dtype=np.float32, copy=True) for o in outputs])

    def output_shape(self, index: int = 0) -> Tuple[int, ...]:
        """The shape of output ``index`` (static when the model was compiled for one input shape)."""
        return tuple(self._compiled.outputs[index].get_partial_shape().to_shape())

    def run(self, arrays: Sequence[np.ndarray], read: Callable[[List[np.ndarray]], object]):
        """``read(outputs)`` on the request's own output buffers (valid only inside ``read``: it copies
        what it keeps), so a caller that needs a part of an output copies only that part."""
        inputs = [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]  # no copy if already so
        with self._lock:  # share_inputs: OpenVINO reads the arrays in place (no second copy)
            outputs = self._request.infer(inputs, share_inputs=True)
            return read([outputs[o] for o in self._compiled.outputs])


# --------------------------------------------------------------------------- agreement check

def probe_image(size: int) -> np.ndarray:
    """A deterministic (S, S) image in [0, 1] with a few smooth objects on texture (the export check)."""
    rng = np.random.default_rng(12)
    yy, xx = np.mgrid[:size, :size] / size
    img = 0.15 * rng.random((size, size))
    for cx, cy, r, v in ((0.3, 0.35, 0.12, 0.8), (0.65, 0.6, 0.18, 0.55), (0.7, 0.25, 0.07, 1.0)):
        img += v * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r ** 2))
    return np.clip(img, 0, 1).astype(np.float32)


def probe_boxes(size: int) -> List[Tuple[float, float, float, float]]:
    s = float(size)
    return [(0.15 * s, 0.2 * s, 0.45 * s, 0.5 * s), (0.42 * s, 0.38 * s, 0.88 * s, 0.82 * s),
            (0.6 * s, 0.15 * s, 0.8 * s, 0.35 * s), (0.1 * s, 0.1 * s, 0.9 * s, 0.9 * s)]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def mask_agreement(masks_ref: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """The smallest Dice between corresponding masks (1.0 when both are empty)."""
    return min(dice(a, b) for a, b in zip(masks_ref, masks))
