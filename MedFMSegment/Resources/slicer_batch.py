"""Headless batch segmentation inside Slicer (no window), through the MRML layer and the Logic.

    Slicer --no-main-window --python-script MedFMSegment/Resources/slicer_batch.py -- \
           COHORT_DIR --prompts-dir DIR --output-dir DIR [--overwrite]

Each COHORT_DIR/CASE.<nrrd|nii.gz|...> is loaded as a volume node, segmented from
PROMPTS_DIR/CASE.json with MedFMSegmentLogic().segment, and saved as OUTPUT_DIR/CASE.seg.nrrd with
Slicer's own writer. Finished cases are skipped; a failing case is reported and the next one runs.
"""
import argparse
import json
import logging
import os
import sys
from pathlib import Path

import slicer

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))
import MedFMSegment  # noqa: E402
from MedFMSegmentLib.cli import VOLUME_SUFFIXES  # noqa: E402


def main(argv):
    p = argparse.ArgumentParser(prog="slicer_batch.py")
    p.add_argument("cohort")
    p.add_argument("--prompts-dir", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logic = MedFMSegment.MedFMSegmentLogic()
    failed = 0
    for volume_path in sorted(Path(args.cohort).iterdir()):
        if not volume_path.name.endswith(VOLUME_SUFFIXES):
            continue
        case = next(volume_path.name[: -len(s)] for s in sorted(VOLUME_SUFFIXES, key=len, reverse=True)
                    if volume_path.name.endswith(s))
        output = out_dir / f"{case}.seg.nrrd"
        if output.exists() and not args.overwrite:
            logging.info("%s: done already, skipped", case)
            continue
        slicer.mrmlScene.Clear(0)
        try:
            volume = slicer.util.loadVolume(str(volume_path))
            seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", case)
            seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            logic.segment(volume, str(Path(args.prompts_dir) / f"{case}.json"), seg, None)
            tmp = out_dir / f".{case}.tmp.seg.nrrd"
            if not slicer.util.saveNode(seg, str(tmp)):
                raise OSError(f"could not write {output}")
            os.replace(tmp, output)
            status = {"case": case, "status": "done", "segments": seg.GetSegmentation().GetNumberOfSegments()}
        except Exception as exc:  # keep going with the next case
            failed += 1
            status = {"case": case, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        (out_dir / f"{case}.report.json").write_text(json.dumps(status, indent=1))
        print(json.dumps(status))
    return 1 if failed else 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.exit(code)
