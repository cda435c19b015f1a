"""``medfm``: the headless command line.

    medfm segment VOLUME --prompts P.json --output OUT.seg.nrrd [--labelmap OUT.nii.gz] [--model M]
                  [--device D] [--adapter DIR] [--overlay OUT.png] [--overwrite]
    medfm batch COHORT_DIR --prompts-dir DIR --output-dir DIR [--overwrite]
    medfm detect-segment VOLUME --detector SPEC --output OUT.seg.nrrd
    medfm tune ...            (few-shot adapters; see ``medfm tune --help``)
    medfm models              (the registry)

Exit status: 0 success, 1 some cases failed (batch), 2 bad input.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
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


def _check_outputs(paths: List[Optional[str]], overwrite: bool) -> None:
    from .errors import InputError

    for p in paths:
        if p and os.path.exists(p) and not overwrite:
            raise InputError(f"output {p} already exists; pass --overwrite to replace it")


def segment_case(args, volume: str, prompts_path: str, output: str, labelmap: Optional[str],
                 overlay: Optional[str], session=None, progress=None, get_session=None) -> dict:
    """Segment one volume from one prompts file and write the outputs atomically; returns a report.

    The outputs, the volume and the prompts are checked before a model is loaded; ``get_session``
    (a callable) supplies a session lazily, e.g. one shared by a batch.
    """
    from . import api, io

    _check_outputs([output, labelmap, overlay], args.overwrite)
    array_kji, ijk_to_ras = io.read_volume(volume)
    # prompts are checked on the volume before the model is loaded
    prompt_set = api.as_prompt_set(Path(prompts_path), ijk_to_ras, array_kji.shape)
    report = api.SegmentationReport()
    wants_adapter = args.adapter or any(seg.adapter for seg in prompt_set.segments)
    loader = _adapter_loader() if wants_adapter else None
    session = session or (get_session() if get_session is not None else _session(args))
    masks = api.segment(array_kji, ijk_to_ras, prompt_set, session=session,
                        preset=args.preset, adapter=args.adapter, adapter_loader=loader, report=report,
                        progress=progress)
    created = []  # outputs this call created: removed again if a later one fails (all or nothing)
    try:
        for path, write in ((output, lambda: io.write_segmentation(output, masks, ijk_to_ras,
                                                                    overwrite=args.overwrite)),
                            (labelmap, lambda: io.write_labelmap(labelmap, masks, ijk_to_ras,
                                                                 overwrite=args.overwrite)),
                            (overlay, lambda: _write_overlay(overlay, array_kji, ijk_to_ras, masks,
                                                             args.overwrite))):
            if path:
                existed = os.path.exists(path)
                write()
                if not existed:
                    created.append(path)
    except BaseException:
        for path in created:
            try:
                os.remove(path)
            except OSError:
                log.warning("could not remove the partial output %s", path)
        raise
    return {"volume": str(volume), "prompts": str(prompts_path), "output": str(output),
            "labelmap": labelmap, "overlay": overlay, "model": report.model, "device": report.device,
            "seconds": round(report.seconds, 2), "segments": report.segments}


def _write_overlay(path, array_kji, ijk_to_ras, masks, overwrite: bool) -> None:
    from .overlay import write_overlay

    write_overlay(path, array_kji, ijk_to_ras, masks, overwrite=overwrite)


def cmd_segment(args) -> int:
    from tqdm import tqdm

    with tqdm(total=100, desc="segment", unit="%", disable=args.quiet, file=sys.stderr) as bar:
        def progress(fraction, message):
            bar.n = round(100 * fraction)
            bar.set_postfix_str(message[:40], refresh=True)

        rep = segment_case(args, args.volume, args.prompts, args.output, args.labelmap, args.overlay,
                           progress=progress)
    print(json.dumps(rep, indent=1))
    return 0


BATCH_SETTINGS = ("model", "checkpoint", "adapter", "preset", "labelmaps")  # a change redoes done cases
DETECT_SETTINGS = ("model", "checkpoint", "axis", "score_threshold", "margin", "adapter_dir", "preset", "labelmaps")


def cmd_batch(args) -> int:
    """Every volume of a cohort folder with its prompts file; resumable, never overwrites, keeps going."""
    from . import batch

    cases = batch.segment_cases(Path(args.cohort), Path(args.prompts_dir), Path(args.output_dir), args.labelmaps)
    return _run_cohort(args, "batch", cases, batch.segment_runner, BATCH_SETTINGS)


def cmd_detect_cohort(args) -> int:
    """``medfm detect-segment COHORT_DIR --detector SPEC --output-dir DIR``: one case per volume."""
    from . import batch
    from .errors import InputError

    if not args.output_dir:
        raise InputError(f"{args.volume} is a folder (a cohort): pass --output-dir (not --output)")
    cases = batch.detect_cases(Path(args.volume), args.detector, Path(args.output_dir), args.labelmaps)
    return _run_cohort(args, "detect-segment", cases, batch.detect_runner, DETECT_SETTINGS + ("detector",))


def _run_cohort(args, kind: str, cases, runner, setting_keys) -> int:
    """Run ``cases`` serially or on ``--cluster``; print the short summary; exit 0 / 1 (see batch.exit_status)."""
    from . import batch

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


def cmd_detect_segment(args) -> int:
    from . import detectors, io
    from .chain import detect_and_segment
    from .errors import InputError

    if os.path.isdir(args.volume):
        return cmd_detect_cohort(args)
    if not args.output or args.output_dir or args.cluster:
        raise InputError("detect-segment on one volume needs --output (--output-dir and --cluster are for a "
                         "cohort folder)")
    _check_outputs([args.output, args.labelmap], args.overwrite)
    array_kji, ijk_to_ras = io.read_volume(args.volume)
    detector = detectors.detector_from_spec(args.detector)
    loader = _adapter_loader() if args.adapter_dir else None
    masks, report = detect_and_segment(_session(args), detector, array_kji, ijk_to_ras, axis=args.axis,
                                       score_threshold=args.score_threshold, margin_vox=args.margin,
                                       adapter_dir=args.adapter_dir, adapter_loader=loader, preset=args.preset)
    if not masks:
        print(json.dumps({"message": "the detector found nothing; no output written", **report}, indent=1))
        return 0
    io.write_segmentation(args.output, masks, ijk_to_ras, overwrite=args.overwrite)
    if args.labelmap:
        io.write_labelmap(args.labelmap, masks, ijk_to_ras, overwrite=args.overwrite)
    print(json.dumps(report, indent=1, default=str))
    return 0


def cmd_models(args) -> int:
    """The registry, then where models would run on this machine and why (nothing is loaded)."""
    import torch

    from . import runtimes
    from .models import REGISTRY, choose_device

    for spec in REGISTRY.values():
        print(f"{spec.id:14s} {'embedded' if spec.embedded else 'checkpoint path':16s} {spec.description}")
    cpu = runtimes.cpu_info()
    device = choose_device(args.device)
    plan = runtimes.plan_runtime(runtimes.check_runtime(args.runtime), runtimes.check_precision(args.precision),
                                 device.device.type, cpu, runtimes.openvino_available())
    threads, why = runtimes.choose_threads(args.threads)
    info = {"device": str(device.device), "device_reason": device.reason, "runtime": plan.runtime,
            "precision": plan.precision, "reason": plan.reason, "threads": min(threads, torch.get_num_threads())
            if args.threads is None else threads, "threads_reason": why, "cpu": cpu.as_dict(),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medfm", description="MedFM: promptable medical segmentation, headless.")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment one volume from a prompts file")
    p.add_argument("volume")
    p.add_argument("--prompts", required=True, help="prompts JSON (see README, 'The prompts file')")
    p.add_argument("--output", required=True, help="output .seg.nrrd")
    p.add_argument("--labelmap", help="also write a labelmap (.nii.gz / .nrrd), label i+1 for segment i")
    p.add_argument("--overlay", help="also write a PNG overlay of the result")
    p.add_argument("--adapter", help="adapter directory applied to every segment")
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

    try:  # the trainer adds `medfm tune`; imported here only to build its parser (no torch work)
        from MedFMTrainLib.cli import add_tune_parser
    except ImportError:
        add_tune_parser = None
    if add_tune_parser is not None:
        add_tune_parser(sub)
    return parser


def _os_error_text(exc: OSError) -> str:
    """An OSError as one line naming the file(s) involved."""
    text = exc.strerror or str(exc)
    files = [str(f) for f in (exc.filename, getattr(exc, "filename2", None)) if f]
    if files and not any(f in text for f in files):
        text = f"{text}: {' -> '.join(files)}"
    return text


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except MedFMError as exc:
        print(f"medfm: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions, a folder that vanished: outputs are left as they were
        print(f"medfm: error: {_os_error_text(exc)}; no partial output was left", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medfm: interrupted; outputs not written are left as they were", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
