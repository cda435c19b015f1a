"""Every public name of the engine at c936bda (before the room-per-concern splits) is still importable.

``PUBLIC_NAMES`` is data, generated once from git (not at test time) by running this file:
``python Testing/Python/test_public_names.py c936bda``. It lists, per module, every top-level public
def, class and constant (assignments, type aliases) of ``MedFMSegmentLib`` and ``MedFMTrainLib``,
loggers excluded. A split that drops or moves a name without re-exporting it from its old module
fails here; a deliberate removal edits this list in the same commit, with a reason in the message.
New names need no entry (add them when you want them pinned).

Also checked: the documented way to add a detector (the example in ``MedFMSegmentLib.detectors``'
docstring) works as written.
"""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
LIBS = {"MedFMSegmentLib": "MedFMSegment/MedFMSegmentLib", "MedFMTrainLib": "MedFMTrain/MedFMTrainLib"}
SLICER_MODULES = {"MedFMSegmentLib.mrml"}  # need slicer + vtk (PyPI slicer-core or the Slicer app)

# Generated from c936bda by ``python Testing/Python/test_public_names.py c936bda``; do not edit by hand
# except to drop a name deliberately.
PUBLIC_NAMES = {
    "MedFMSegmentLib": (
        "__version__",
    ),
    "MedFMSegmentLib.api": (
        "AdapterLoader", "SegmentationReport", "as_prompt_set", "segment", "segment_one",
    ),
    "MedFMSegmentLib.chain": (
        "detect_and_segment",
    ),
    "MedFMSegmentLib.cli": (
        "VOLUME_SUFFIXES", "build_parser", "cmd_batch", "cmd_detect_segment", "cmd_models",
        "cmd_segment", "main", "segment_case",
    ),
    "MedFMSegmentLib.detectors": (
        "BoxFileDetector", "BoxIJK", "BoxXY", "ChainResult", "DETECTOR_SPEC_HELP", "Detection",
        "Detector", "IntBoxXY", "LabelmapDetector", "MERGE_MODES", "ModelFrame",
        "MonaiRetinaNetDetector", "PathLike", "RoiDetector", "SPACES", "SegmentLabel", "SliceBox",
        "box_iou", "box_ras_to_ijk", "build_retinanet", "chain", "check_retinanet_config",
        "detections_to_slice_boxes", "detector_from_spec", "detector_labels",
        "load_retinanet_config", "merge_boxes", "read_label_names", "resample_labelmap_nearest",
        "tight_slice_boxes",
    ),
    "MedFMSegmentLib.errors": (
        "Cancelled", "ChecksumError", "InputError", "InputIndexError", "InputTypeError",
        "MedFMError", "ModelError",
    ),
    "MedFMSegmentLib.geometry": (
        "AXES", "array_axis", "bbox_kji", "box_from_mask", "box_ijk_to_slice", "check_axis",
        "check_index", "check_matrix", "closest_axis", "get_slice", "ijk_to_ras", "ijk_to_slice",
        "lps_to_ras_matrix", "num_slices", "ras_to_ijk", "set_slice", "slice_pixel_spacing",
        "slice_shape", "slice_to_ijk", "spacing",
    ),
    "MedFMSegmentLib.io": (
        "ColorInput", "DEFAULT_COLORS", "LABELMAP_SUFFIXES", "MAX_PLAIN_LABELS", "MaskInput",
        "SEG_SUFFIX", "atomic_output", "read_segmentation", "read_volume", "write_labelmap",
        "write_segmentation", "write_text_atomic",
    ),
    "MedFMSegmentLib.models": (
        "DeviceChoice", "LITEMEDSAM_SHA256", "ModelSpec", "PromptableModel", "REGISTRY",
        "asset_path", "build_litemedsam", "choose_device", "file_sha256", "get_spec", "load_model",
        "load_state_dict_file",
    ),
    "MedFMSegmentLib.mrml": (
        "MODES", "POSITIVE_ATTRIBUTE", "SegmentUndoState", "editor_settings",
        "ensure_segmentation_converters", "load_segmentation", "load_volume",
        "markups_to_points_ras", "restore_segment", "roi_corners_world", "roi_to_box_ijk",
        "roi_to_corners_ras", "save_node", "segment_to_mask", "volume_geometry", "volume_to_array",
        "write_mask_to_segment",
    ),
    "MedFMSegmentLib.overlay": (
        "COLORS", "overlay_image", "png_bytes", "write_overlay",
    ),
    "MedFMSegmentLib.preprocess": (
        "Crop", "DEFAULT_PRESET", "PRESETS", "Preset", "box_crop", "full_slice_crop",
        "guess_modality", "intensity_range", "model_to_slice", "normalise_volume", "resolve_preset",
        "slice_to_model", "validate_volume",
    ),
    "MedFMSegmentLib.prompts": (
        "Box2D", "DEFAULT_AXIS", "Point", "PromptSet", "RoiIJK", "SLICE_TOLERANCE", "SPACES",
        "SegmentPrompts", "dump_prompts", "dumps_prompts", "load_prompts", "parse_prompts",
        "resolve", "to_dict",
    ),
    "MedFMSegmentLib.propagate": (
        "Progress", "PropagationConfig", "ShouldStop", "VolumeResult", "propagate", "segment_roi",
    ),
    "MedFMSegmentLib.session": (
        "BoxXY", "EmbeddingCache", "PromptSession", "SessionConfig", "SliceKey", "SliceResult",
        "SliceState", "keep_components_touching",
    ),
    "MedFMTrainLib.adapters": (
        "LoraSettings", "OrganAdapter", "TARGET_PRESETS", "decode_batch", "inject",
        "injected_adapters", "load_state", "lora_parameters", "model_lock", "remove",
        "segmentation_loss", "state", "tensors_digest",
    ),
    "MedFMTrainLib.augment": (
        "AugmentConfig", "Augmenter",
    ),
    "MedFMTrainLib.cli": (
        "AXES", "add_tune_arguments", "add_tune_parser", "emit", "run_tune",
    ),
    "MedFMTrainLib.data": (
        "MAX_VOLUMES", "MIN_MASK_PIXELS", "RECOMMENDED_SLICES", "TrainingSet", "TrainingSlice",
        "even_slices", "slices_from_segmentation", "slices_from_volumes",
    ),
    "MedFMTrainLib.evaluate": (
        "box_iou", "deepest_point", "dice", "ellipse_in_box", "evaluate_localizer",
        "evaluate_slices", "padded_box", "summarize",
    ),
    "MedFMTrainLib.localizer": (
        "LocalizerHead", "LocalizerState", "OrganLocalizer", "box_from_heatmap", "heatmap_target",
        "interpolate_boxes", "localizer_loss", "model_box_to_slice", "predict_box",
    ),
    "MedFMTrainLib.samples": (
        "KINDS", "PoolBuilder", "PoolConfig", "Sample", "click_crop_box", "interior_point",
        "jitter_box", "session_crop",
    ),
    "MedFMTrainLib.store": (
        "ADAPTER_FILE", "FORMAT", "FORMAT_VERSION", "MANIFEST_FILE", "PathLike", "check_output_dir",
        "delete_adapter", "find_adapter", "is_adapter_dir", "list_adapters", "load_adapter",
        "load_detector", "read_manifest", "safe_name", "save_adapter",
    ),
    "MedFMTrainLib.tune": (
        "Progress", "ShouldStop", "TuneConfig", "build_pool", "check_organ", "simulate_box",
        "train_decoder", "train_localizer", "tune",
    ),
    "MedFMTrainLib.tune_cli": (
        "EXIT_CANCELLED", "EXIT_ERROR", "EXIT_OK", "main",
    ),
}


def _import(module: str):
    if module in SLICER_MODULES:
        try:
            import slicer  # noqa: F401
            import vtk  # noqa: F401
        except ImportError as exc:
            pytest.skip(f"{module} needs slicer-core or the Slicer app: {exc}")
    return importlib.import_module(module)


@pytest.mark.parametrize("module", sorted(PUBLIC_NAMES))
def test_public_names_are_still_importable(module):
    mod = _import(module)
    missing = [name for name in PUBLIC_NAMES[module] if not hasattr(mod, name)]
    assert not missing, (f"{module} no longer provides {', '.join(missing)}: re-export them from {module} "
                         f"(or drop them from PUBLIC_NAMES deliberately)")


def test_the_list_covers_every_engine_module_of_c936bda():
    assert len(PUBLIC_NAMES) >= 24
    assert {"MedFMSegmentLib.detectors", "MedFMSegmentLib.chain", "MedFMSegmentLib.mrml",
            "MedFMSegmentLib.session", "MedFMTrainLib.tune"} <= set(PUBLIC_NAMES)
    assert "chain" in PUBLIC_NAMES["MedFMSegmentLib.detectors"]
    assert "detect_and_segment" in PUBLIC_NAMES["MedFMSegmentLib.chain"]


def test_the_name_scanner_finds_defs_classes_and_constants():
    src = textwrap.dedent("""
        import logging
        from typing import Tuple
        log = logging.getLogger(__name__)
        Box = Tuple[int, int]
        LIMIT: int = 3
        _PRIVATE = 1
        def f(): pass
        class C: pass
        try:
            FAST = True
        except ImportError:
            FAST = False
    """)
    assert public_names(src) == ["Box", "C", "FAST", "LIMIT", "f"]


def test_detectors_are_the_same_objects_at_their_old_and_new_homes():
    from MedFMSegmentLib import chain, detectors
    from MedFMSegmentLib.detectors import chaining, labelmap, planning

    assert callable(detectors.chain) and detectors.chain is chaining.chain  # the function, not a module
    assert chain.detect_and_segment is chaining.detect_and_segment
    assert detectors.LabelmapDetector is labelmap.LabelmapDetector
    assert detectors.detections_to_slice_boxes is planning.detections_to_slice_boxes


# --------------------------------------------------------------------------- the documented extension point

def _docstring_example() -> str:
    from MedFMSegmentLib import detectors

    doc = detectors.__doc__
    start = doc.index("Adding a detector")
    block = doc[doc.index("::\n", start) + 3:]
    lines = []
    for line in block.splitlines():
        if line.strip() and not line.startswith("    "):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines))


def test_adding_a_detector_as_the_package_docstring_shows(cranium_ct, shared_data):
    from MedFMSegmentLib import detectors, io
    from MedFMSegmentLib.errors import InputError

    code = _docstring_example()
    assert 8 <= len([l for l in code.splitlines() if l.strip() and not l.lstrip().startswith("#")]) <= 12, code
    namespace = {"__name__": "MedFMSegmentLib.detectors.threshold", "__package__": "MedFMSegmentLib.detectors"}
    exec(compile(code, "detectors/threshold.py (docstring example)", "exec"), namespace)
    kinds = detectors.DETECTOR_KINDS + (namespace["KIND"],)
    with pytest.raises(InputError, match="unknown detector kind 'threshold'"):
        detectors.detector_from_spec("threshold:225.5")  # not registered: the registry is not a global
    detector = detectors.detector_from_spec("threshold:225.5", kinds=kinds)
    assert isinstance(detector, detectors.Detector)
    array_kji, ijk_to_ras = cranium_ct
    bone_kji = io.read_volume(shared_data / "cranium_ct" / "cranium_bone_thr226.nrrd")[0] > 0
    (found,) = detector.detect(array_kji, ijk_to_ras)
    k, j, i = np.nonzero(bone_kji)  # the stored bone mask: the CT thresholded at 226..3071 HU
    assert found.label == "bright"
    assert found.box_ijk == ((i.min(), j.min(), k.min()), (i.max(), j.max(), k.max()))
    # the planned prompts and the other kinds keep working with the extra kind registered
    plan = detectors.detections_to_slice_boxes([found], array_kji.shape, "axial", margin_vox=0)
    assert [index for index, _ in plan["bright"]] == list(range(k.min(), k.max() + 1))
    with pytest.raises(InputError, match="does not apply to a threshold detector"):
        detectors.detector_from_spec("threshold:225.5:per-component", kinds=kinds)


# --------------------------------------------------------------------------- regenerating the list

def _is_logger(value) -> bool:
    return (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
            and value.func.attr == "getLogger")


def public_names(source: str) -> list:
    """Sorted top-level public defs, classes and assigned names (also under top-level if / try)."""
    names = []

    def walk(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.append(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and not _is_logger(node.value):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    names.extend(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            elif isinstance(node, ast.If):
                walk(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                walk(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])

    walk(ast.parse(source).body)
    return sorted({n for n in names if not n.startswith("_") or n == "__version__"})


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


def generate(rev: str) -> str:
    """The ``PUBLIC_NAMES = {...}`` literal of the engine at git revision ``rev``."""
    out = ["PUBLIC_NAMES = {"]
    for package, folder in LIBS.items():
        for path in sorted(_git("ls-tree", "--name-only", rev, folder + "/").split()):
            if not path.endswith(".py"):
                continue
            names = public_names(_git("show", f"{rev}:{path}"))
            if not names:
                continue
            stem = Path(path).stem
            module = package if stem == "__init__" else f"{package}.{stem}"
            body = textwrap.wrap(", ".join(f"\"{n}\"" for n in names) + ",", width=100, initial_indent=" " * 8,
                                 subsequent_indent=" " * 8, break_on_hyphens=False, break_long_words=False)
            out += [f"    \"{module}\": (", *body, "    ),"]
    return "\n".join(out + ["}"])


if __name__ == "__main__":
    print(generate(sys.argv[1] if len(sys.argv) > 1 else "HEAD"))
