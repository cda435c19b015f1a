"""Detectors and detector-to-SAM chaining: boxes from a detector become per-slice box prompts.

A *detector* is anything with ``detect(array_kji, ijk_to_ras) -> list[Detection]`` (the
:class:`Detector` protocol). A detector that knows the names it can produce may expose them as a
``labels`` attribute (a sequence of str); :func:`chain` then rejects requests for other names.
Box conventions (inclusive ``box_ijk`` voxel indices, inclusive 2D ``box_xy``, RAS boxes covering
the voxel centres inside them) are in :mod:`.base`.

One module per concern:
  - ``base``: :class:`Detector`, :class:`Detection`, :class:`DetectorKind`, input checks,
    :func:`box_ras_to_ijk`.
  - ``files``: :class:`BoxFileDetector`, boxes from a CSV or JSON file (formats in its docstring).
  - ``roi``: :class:`RoiDetector`, boxes given as RAS corners (e.g. Slicer ROIs).
  - ``labelmap``: :class:`LabelmapDetector`, one box (and tight per-slice boxes) per label or
    connected component of a labelmap; resampling, label-names files.
  - ``retinanet``: :class:`MonaiRetinaNetDetector`, a MONAI RetinaNet bundle or TorchScript file
    (configuration format in its docstring; torch/monai imported lazily).
  - ``planning``: :func:`detections_to_slice_boxes`, per-slice boxes with margins, clipping, NMS.
  - ``chaining``: :func:`chain` (detect, plan, segment each label) and ``detect_and_segment``
    (the same with a prompt session; ``MedFMSegmentLib.chain`` re-exports it).
  - ``specs``: :func:`detector_from_spec`, the ``KIND:PATH[:options]`` registry
    (:data:`DETECTOR_KINDS`, :data:`DETECTOR_SPEC_HELP`).

Layers (``Testing/Python/test_engine_imports.py`` enforces them): ``base`` < ``planning`` < the
detector modules and ``chaining`` < ``specs`` < ``__init__``; a module imports only lower layers (a
detector module: ``base`` and ``planning``, never another detector). At module level only the
standard library, numpy, ``geometry`` and ``errors``; torch, monai, SimpleITK and ``io`` are
imported inside the functions that use them, so ``import detectors`` stays light.

Adding a detector = one new file plus one line in ``specs.DETECTOR_KINDS``, e.g.::

    # detectors/threshold.py: one box around every voxel above a level ("threshold:LEVEL")
    import numpy as np
    from .base import Detection, DetectorKind
    class ThresholdDetector:
        labels = ("bright",)
        def __init__(self, level: str):
            self.level = float(level)
        def detect(self, array_kji, ijk_to_ras):
            k, j, i = np.nonzero(np.asarray(array_kji) > self.level)
            box = ((i.min(), j.min(), k.min()), (i.max(), j.max(), k.max())) if k.size else None
            return [Detection("bright", box_ijk=box)] if box else []
    KIND = DetectorKind("threshold", lambda path, options, spec: ThresholdDetector(path), help="  threshold:LEVEL")
    # detectors/specs.py: DETECTOR_KINDS = (labelmap.KIND, files.KIND, retinanet.KIND, threshold.KIND)

Checks raise :class:`~MedFMSegmentLib.errors.InputError` naming the file, key or value; a missing or
mismatching model raises :class:`~MedFMSegmentLib.errors.ModelError`.

Detector specs (:func:`detector_from_spec`, the CLI's ``--detector SPEC``): see
:data:`DETECTOR_SPEC_HELP`.
"""
from .base import (BoxIJK, BoxXY, Detection, Detector, DetectorKind, IntBoxXY, PathLike, SliceBox, box_ras_to_ijk,
                   detector_labels)
from .chaining import ChainResult, SegmentLabel, chain
from .files import SPACES, BoxFileDetector
from .labelmap import LabelmapDetector, read_label_names, resample_labelmap_nearest, tight_slice_boxes
from .planning import MERGE_MODES, box_iou, detections_to_slice_boxes, merge_boxes
from .retinanet import (ModelFrame, MonaiRetinaNetDetector, build_retinanet, check_retinanet_config,
                        load_retinanet_config)
from .roi import RoiDetector
from .specs import DETECTOR_KINDS, DETECTOR_SPEC_HELP, detector_from_spec

__all__ = [
    "BoxIJK", "BoxXY", "IntBoxXY", "PathLike", "SliceBox", "SegmentLabel", "SPACES", "MERGE_MODES",
    "DETECTOR_KINDS", "DETECTOR_SPEC_HELP",
    "Detection", "Detector", "DetectorKind", "detector_labels", "box_ras_to_ijk",
    "BoxFileDetector", "RoiDetector",
    "LabelmapDetector", "read_label_names", "resample_labelmap_nearest", "tight_slice_boxes",
    "ModelFrame", "MonaiRetinaNetDetector", "build_retinanet", "check_retinanet_config", "load_retinanet_config",
    "box_iou", "merge_boxes", "detections_to_slice_boxes",
    "ChainResult", "chain", "detector_from_spec",
]
