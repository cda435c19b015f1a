"""Checks of the Slicer glue (MedFMSegment.py, MedFMTrain.py, their .ui and CMakeLists) that run without the app.

The Slicer application is not available here: static checks parse the files; the Logic tests import the
module files under minimal fakes of ``qt`` and ``slicer.ScriptedLoadableModule`` / ``slicer.parameterNodeWrapper``
(installed with monkeypatch, only inside the test) and run them on a real headless ``vtkMRMLScene``
from slicer-core.
"""
from __future__ import annotations

import ast
import fnmatch
import glob
import importlib.util
import logging
import re
import sys
import types
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = {
    "MedFMSegment": REPO / "MedFMSegment",
    "MedFMTrain": REPO / "MedFMTrain",
}
MAX_LINES = 750  # glue stays thin: conversions belong in mrml.py, algorithms in the engine
HEAVY_IMPORTS = {"torch", "SimpleITK", "scipy", "monai", "segment_anything", "timm", "peft"}


def module_file(name: str) -> Path:
    return MODULES[name] / f"{name}.py"


def parsed(name: str) -> ast.Module:
    return ast.parse(module_file(name).read_text(encoding="utf-8"), filename=str(module_file(name)))


def top_level_imports(tree: ast.Module) -> set:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def all_imports(tree: ast.Module) -> set:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def ui_tree(name: str) -> ET.ElementTree:
    return ET.parse(MODULES[name] / "Resources" / "UI" / f"{name}.ui")


# --------------------------------------------------------------------------- (1) module files stay glue

@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_parses_and_has_the_slicer_classes(name):
    tree = parsed(name)
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    for suffix in ("", "Widget", "Logic", "Test"):
        assert f"{name}{suffix}" in classes, f"{name}.py has no class {name}{suffix}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_thin_glue(name):
    tree = parsed(name)
    lines = module_file(name).read_text(encoding="utf-8").count("\n")
    assert lines < MAX_LINES, f"{name}.py has {lines} lines: move conversions to mrml.py and algorithms to the engine"
    imported = top_level_imports(tree)
    assert "MedFMSegmentLib" in {m.split(".")[0] for m in imported}, f"{name}.py does not use the engine"
    heavy = all_imports(tree) & HEAVY_IMPORTS
    assert not heavy, f"{name}.py imports {sorted(heavy)}: model code belongs in the engine"
    # The module must load in Slicer without the engine's heavy dependencies: engine modules that import
    # torch are imported lazily, inside functions.
    eager = {m for m in imported if m.startswith("MedFMSegmentLib") or m.startswith("MedFMTrainLib")}
    allowed = {"MedFMSegmentLib", "MedFMSegmentLib.errors", "MedFMSegmentLib.geometry", "MedFMSegmentLib.mrml",
               "MedFMSegmentLib.worker", "MedFMSegmentLib.interaction", "MedFMSegmentLib.mrml_prompts",
               "MedFMSegmentLib.session_cache",
               "MedFMTrainLib", "MedFMTrainLib.process", "MedFMTrainLib.slices"}
    assert eager <= allowed, f"{name}.py imports {sorted(eager - allowed)} at load time (torch): import them lazily"


def test_choice_lists_match_the_engine():
    models = pytest.importorskip("MedFMSegmentLib.models")
    preprocess = pytest.importorskip("MedFMSegmentLib.preprocess")
    values = {}
    for node in parsed("MedFMSegment").body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    assert sorted(values["MODEL_CHOICES"]) == sorted(models.REGISTRY)
    assert values["PRESET_CHOICES"] == ["auto", *preprocess.PRESETS]


# --------------------------------------------------------------------------- (2) .ui files and widget names

@pytest.mark.parametrize("name", sorted(MODULES))
def test_ui_is_well_formed_and_has_every_widget_the_code_uses(name):
    root = ui_tree(name).getroot()
    assert root.tag == "ui"
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget"
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", module_file(name).read_text(encoding="utf-8")))
    assert used, f"{name}.py references no self.ui widget"
    missing = sorted(used - set(widgets))
    assert not missing, f"{name}.py uses widgets missing from {name}.ui: {missing}"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    qt_classes = {c for c in widgets.values() if c.startswith("Q")}
    assert set(widgets.values()) - qt_classes <= declared, "every ctk/qMRML/qSlicer class must be a customwidget"
    for receiver in (c.findtext("receiver") for c in root.iter("connection")):
        assert receiver in widgets
    mrml_widgets = {n for n, c in widgets.items() if c in ("qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget",
                                                            "qSlicerMarkupsPlaceWidget")}
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert mrml_widgets <= connected, f"MRML widgets without a scene: {sorted(mrml_widgets - connected)}"


def parameter_fields(name: str) -> set:
    for node in parsed(name).body:
        if isinstance(node, ast.ClassDef) and node.name == f"{name}ParameterNode":
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError(f"{name}.py has no {name}ParameterNode")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_ui_parameter_bindings_name_real_parameters(name):
    bound = {}
    for widget in ui_tree(name).getroot().iter("widget"):
        for p in widget.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = p.findtext("string")
    assert bound, f"{name}.ui binds no widget to the parameter node"
    fields = parameter_fields(name)
    wrong = {w: f for w, f in bound.items() if f not in fields}
    assert not wrong, f"{name}.ui binds widgets to unknown parameters: {wrong}"


# --------------------------------------------------------------------------- (3) packaging

def cmake_calls(text: str, command: str) -> list:
    return [m.group(1) for m in re.finditer(rf"{command}\s*\((.*?)\)", text, flags=re.S | re.I)]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_cmakelists_package_every_engine_file(name):
    folder = MODULES[name]
    text = re.sub(r"#[^\n]*", "", (folder / "CMakeLists.txt").read_text(encoding="utf-8"))  # no comments
    assert "slicerMacroBuildScriptedModule" in text
    assert re.search(r"slicer_add_python_unittest\s*\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py", text)
    assert re.search(rf"set\s*\(\s*MODULE_NAME\s+{name}\s*\)", text)
    text = text.replace("${MODULE_NAME}", name).replace("${CMAKE_CURRENT_SOURCE_DIR}/", "")
    listed = set(re.findall(r"[\w/.-]+\.(?:py|png|ui)\b", text))
    patterns = [p for call in cmake_calls(text, "file") if call.strip().upper().startswith("GLOB")
                for p in call.split() if "*" in p]
    packaged = {f for f in listed if (folder / f).is_file()}
    for pattern in patterns:
        packaged |= {str(Path(p).relative_to(folder)) for p in glob.glob(str(folder / pattern))}
    lib = folder / f"{name}Lib"
    expected = {str(p.relative_to(folder)) for lib_dir in [lib, *folder.glob("SegmentEditor*Lib")]
                for p in lib_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert expected, f"{lib} is empty"
    missing = sorted(expected - packaged)
    assert not missing, f"{name}/CMakeLists.txt does not package {missing}"
    for f in (f"{name}.py", f"Resources/Icons/{name}.png", f"Resources/UI/{name}.ui"):
        assert f in packaged, f"{name}/CMakeLists.txt does not list {f}"
    stale = sorted(f for f in listed if not (folder / f).is_file() and not any(fnmatch.fnmatch(f, p) for p in patterns))
    assert not stale, f"{name}/CMakeLists.txt lists files that do not exist: {stale}"


@pytest.mark.parametrize("path", ["MedFMSegment/Resources/Icons/MedFMSegment.png",
                                  "MedFMTrain/Resources/Icons/MedFMTrain.png", "Resources/MedFM.png"])
def test_icons_are_128_px_png(path):
    data = (REPO / path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)


# --------------------------------------------------------------------------- (4) Logic under slicer-core

def _fake_slicer_modules():
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

        def getParameterNode(self):
            raise NotImplementedError("no parameter node without the Slicer application")

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=0):
            logging.getLogger("selftest").info(message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = lambda choices: ("choice", tuple(choices))
    pnw.WithinRange = lambda minimum, maximum: ("range", minimum, maximum)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr, i18n.translate = (lambda text: text), (lambda context, text: text)
    return {"qt": types.ModuleType("qt"), "slicer.ScriptedLoadableModule": slm, "slicer.parameterNodeWrapper": pnw,
            "slicer.i18n": i18n}


@pytest.fixture
def glue(monkeypatch):
    """Import a module file under the fakes; returns (load(name), scene). slicer.mrmlScene is a fresh scene."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    for key, fake in _fake_slicer_modules().items():
        monkeypatch.setitem(sys.modules, key, fake)
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    for folder in MODULES.values():
        monkeypatch.syspath_prepend(str(folder))

    def load(name):
        spec = importlib.util.spec_from_file_location(name, module_file(name))
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)  # removed again after the test
        spec.loader.exec_module(module)
        return module

    return load, scene


def _show(slice_node, x_ras, y_ras, origin_ras):
    """Point a slice view: in-plane axes x, y and centre, in RAS (the normal is x cross y)."""
    import vtk

    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = x_ras, y_ras, np.cross(x_ras, y_ras), origin_ras
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, m[r, c])
    slice_node.GetSliceToRAS().DeepCopy(matrix)
    slice_node.UpdateMatrices()


def test_slice_view_axis_and_index(glue):
    load, scene = glue
    seg = load("MedFMSegment")
    volume, _ = seg.makeEllipsoidVolume(scene, shape_kji=(10, 20, 30), radii_kji=(3, 6, 9))
    logic = seg.MedFMSegmentLogic()
    red = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetName("Red")
    _show(red, (-1, 0, 0), (0, 1, 0), (4, 5, 6 * 1.5))  # axial view; spacing (1, 1, 1.5): k = 6
    assert logic.sliceAxisAndIndex(red, volume) == ("axial", 6)
    _show(red, (0, -1, 0), (0, 0, 1), (11.2, 3, 2))  # sagittal view at x = 11.2 mm: i = 11
    assert logic.sliceAxisAndIndex(red, volume) == ("sagittal", 11)
    _show(red, (-1, 0, 0), (0, 0.1, 1), (0, 7, 4))  # coronal, slightly tilted: j = 7
    assert logic.sliceAxisAndIndex(red, volume) == ("coronal", 7)
    _show(red, (0, -1, 0), (0, 0, 1), (99, 0, 0))
    with pytest.raises(ValueError, match="outside the volume"):
        logic.sliceAxisAndIndex(red, volume)


def _dice(a, b) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(int(a.sum()) + int(b.sum()), 1)


@pytest.fixture
def segment_module(glue, monkeypatch, litemedsam):
    """MedFMSegment.py under the fakes, its Logic sharing the test run's LiteMedSAM (loaded once)."""
    load, scene = glue
    seg = load("MedFMSegment")
    monkeypatch.setattr(seg.MedFMSegmentLogic, "_model", lambda self: litemedsam)
    return seg, scene


def test_module_self_test_runs_headless(segment_module, monkeypatch):
    """The module's own self-test: a box prompt on a synthetic ellipsoid (slice Dice > 0.9), then undo."""
    seg, _ = segment_module
    monkeypatch.setenv("MEDFM_TEST_PROPAGATE", "0")  # one slice: seconds, not minutes, on a shared CPU
    selftest = seg.MedFMSegmentTest("test_box_prompt_dice_and_undo")
    selftest.setUp()
    selftest.test_box_prompt_dice_and_undo()


def _ellipsoid_scene(seg, scene, other_region):
    """A 3-slice ellipsoid volume, a segmentation and its segment "Other" covering ``other_region`` (an index)."""
    from MedFMSegmentLib import mrml

    volume, truth = seg.makeEllipsoidVolume(scene, shape_kji=(3, 40, 48), radii_kji=(2, 12, 15))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    ijk_to_ras, shape = mrml.volume_geometry(volume)
    other = np.zeros(shape, np.uint8)
    other[other_region] = 1
    mrml.write_mask_to_segment(segmentation, "Other", other, ijk_to_ras, volume)
    return volume, truth, segmentation, ijk_to_ras, shape, other


def test_interactive_logic_on_a_real_scene(segment_module, tmp_path):
    """addBox, a failing prompt, propagation in the worker thread, undo, detect + segment, on one scene."""
    seg, scene = segment_module
    from MedFMSegmentLib import geometry, mrml
    from MedFMSegmentLib.errors import InputError

    volume, truth, segmentation, ijk_to_ras, shape, other = _ellipsoid_scene(seg, scene, np.s_[0, :4, :4])
    logic = seg.MedFMSegmentLogic()
    with pytest.raises(InputError, match="no prompt"):
        logic.propagate(volume, segmentation, "Ellipsoid", axis="axial")

    def segment_mask(name="Ellipsoid"):
        return mrml.segment_to_mask(segmentation, name, ijk_to_ras, shape)

    k = 1
    ys, xs = np.nonzero(truth[k])
    corners_ijk = np.array([[xs.min() - 2, ys.min() - 2, k], [xs.max() + 2, ys.max() + 2, k]], dtype=float)
    result = logic.addBox(volume, geometry.ijk_to_ras(corners_ijk, ijk_to_ras), segmentation, "Ellipsoid")
    assert (result.axis, result.index) == ("axial", k)
    mask = segment_mask()
    assert mask.sum() == mask[k].sum() > 0, "a slice prompt writes only its slice"
    assert _dice(mask[k], truth[k]) > 0.9
    with pytest.raises(InputError, match="outside"):
        logic.addBox(volume, [[-500.0, -500.0, k * 1.5], [-400.0, -400.0, k * 1.5]], segmentation, "Ellipsoid")
    assert np.array_equal(segment_mask(), mask), "a failed prompt leaves the segment unchanged"

    job = logic.propagate(volume, segmentation, "Ellipsoid", axis="axial", wait=False)  # worker thread
    job._future.result(timeout=300)
    assert np.array_equal(segment_mask(), mask), "nothing is written before finish() on the main thread"
    volume_result = job.finish()
    assert job.fraction == 1.0
    propagated = segment_mask()
    assert np.array_equal(propagated, volume_result.mask)
    assert propagated[0].any() and propagated[2].any() and _dice(propagated, truth) > 0.8
    assert logic.undo() == "propagation"
    assert np.array_equal(segment_mask(), mask)
    assert logic.undo() == f"Box on axial slice {k}"
    assert not segmentation.GetSegmentation().GetSegmentIdBySegmentName("Ellipsoid")
    assert np.array_equal(segment_mask("Other"), other), "other segments are never touched"
    with pytest.raises(InputError, match="nothing to undo"):
        logic.undo()

    boxes = tmp_path / "boxes.json"
    x0, y0, x1, y1 = (int(v) for v in (xs.min() - 2, ys.min() - 2, xs.max() + 2, ys.max() + 2))
    boxes.write_text(f'[{{"label": "Blob", "axis": "axial", "index": {k}, "box_xy": [{x0}, {y0}, {x1}, {y1}]}}]')
    states = logic.detectAndSegment(volume, f"boxes:{boxes}", segmentation, axis="axial")
    assert list(states) == ["Blob"]
    assert _dice(segment_mask("Blob")[k], truth[k]) > 0.9
    logic.undo()
    assert not segmentation.GetSegmentation().GetSegmentIdBySegmentName("Blob")


EFFECT = MODULES["MedFMSegment"] / "SegmentEditorMedFMLib" / "SegmentEditorEffect.py"


def test_effect_has_the_scripted_effect_api_and_documents_its_keys():
    tree = ast.parse(EFFECT.read_text(encoding="utf-8"))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    effect = classes["SegmentEditorEffect"]
    assert [b.id for b in effect.bases if isinstance(b, ast.Name)] == ["AbstractScriptedSegmentEditorEffect"]
    methods = {n.name for n in effect.body if isinstance(n, ast.FunctionDef)}
    required = {"clone", "icon", "helpText", "setupOptionsFrame", "activate", "deactivate", "createCursor",
                "setMRMLDefaults", "updateGUIFromMRML", "updateMRMLFromGUI", "processInteractionEvents"}
    assert required <= methods, f"missing {sorted(required - methods)}"
    keys = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", "") == "KEYS")
    assert {action for _, action, _ in keys} >= {"propagate", "repropagate", "accept", "next", "polarity", "clear"}
    text = EFFECT.read_text(encoding="utf-8")
    assert "saveStateForUndo" in text and "tryWithErrorDisplay" not in text
    assert (EFFECT.parent / "__init__.py").is_file() and (EFFECT.parent / "SegmentEditorEffect.png").is_file()
    module = module_file("MedFMSegment").read_text(encoding="utf-8")
    assert 'slicer.app.connect("startupCompleted()", self.registerEditorEffect)' in module
    assert '"SegmentEditorMedFMLib", "SegmentEditorEffect.py"' in module


def test_effect_logic_prompts_masking_undo_tag_and_scene_close(segment_module, tmp_path):
    """The Logic calls the effect makes, on a real scene: prompt lists, editor masking, prompt tag, accept, cancel."""
    seg, scene = segment_module
    import slicer

    from MedFMSegmentLib import mrml, mrml_prompts
    from MedFMSegmentLib.errors import Cancelled, InputError
    from MedFMSegmentLib.interaction import Interaction

    # "Other" is a segment the editor protects ("outside all segments")
    volume, truth, segmentation, ijk_to_ras, shape, blocked = _ellipsoid_scene(seg, scene, np.s_[:, :, :12])
    sid = segmentation.GetSegmentation().AddEmptySegment("", "Blob")
    editor = slicer.vtkMRMLSegmentEditorNode()
    scene.AddNode(editor)
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    logic = seg.MedFMSegmentLogic()
    it = Interaction()
    it.select(sid)
    k = 1
    ys, xs = np.nonzero(truth[k])
    it.box((xs.min() - 2, ys.min() - 2, k), (xs.max() + 2, ys.max() + 2, k), "axial")
    saves = []
    written = logic.applyPrompts(volume, segmentation, sid, it, editor, beforeWrite=lambda: saves.append(1))
    assert written == [("axial", k)] and saves == [1]
    mask = mrml.segment_to_mask(segmentation, "Blob", ijk_to_ras, shape)
    assert mask[k].any() and not mask[k][:, :12].any(), "the editor's editable area is honoured"
    assert _dice(mask[k][:, 12:], truth[k][:, 12:]) > 0.9
    assert mrml_prompts.stored_prompts(segmentation, sid) == it.text(sid), "the prompt list is stored in the segment"
    assert logic.applyPrompts(volume, segmentation, sid, it, editor) == [], "nothing changed: nothing written"

    stray = it.click((xs.max() + 6, ys.mean(), k), "axial")  # an include click outside the blob
    logic.applyPrompts(volume, segmentation, sid, it, editor)
    it.remove(stray.id)  # the user deletes its marker: the slice is recomputed from the box alone
    logic.applyPrompts(volume, segmentation, sid, it, editor)
    np.testing.assert_array_equal(mrml.segment_to_mask(segmentation, "Blob", ijk_to_ras, shape), mask)

    session = logic._sessions[next(iter(logic._sessions))].session
    if hasattr(session, "set_slice_mask"):
        assert logic.acceptSlice(volume, segmentation, sid, "axial", k) == ("axial", k)
    else:
        with pytest.raises(InputError, match="set_slice_mask"):
            logic.acceptSlice(volume, segmentation, sid, "axial", k)

    job = logic.propagate(volume, segmentation, "Blob", axis="axial", wait=False, editorNode=editor,
                          beforeWrite=lambda: saves.append(2))
    logic.waitForJob(job, pump=lambda: None)
    job.finish()
    assert saves[-1] == 2
    propagated = mrml.segment_to_mask(segmentation, "Blob", ijk_to_ras, shape)
    assert propagated[0].any() and not propagated[:, :, :12].any()
    np.testing.assert_array_equal(mrml.segment_to_mask(segmentation, "Other", ijk_to_ras, shape), blocked)

    it.click((xs.mean(), ys.mean(), k), "axial", shift=True)
    job = logic.applyPrompts(volume, segmentation, sid, it, editor, wait=False)
    scene.RemoveNode(segmentation)  # the scene closes (or the node is deleted) while the job runs
    logic.waitForJob(job)
    with pytest.raises(Cancelled, match="left the scene"):
        job.finish()
    logic.shutdown()


def _boxed_blob(seg, scene):
    """A "Blob" segment on the ellipsoid scene with one box on axial slice 1, applied through the Logic."""
    from MedFMSegmentLib.interaction import Interaction

    volume, truth, segmentation, ijk_to_ras, shape, _ = _ellipsoid_scene(seg, scene, np.s_[0, :1, :1])
    sid = segmentation.GetSegmentation().AddEmptySegment("", "Blob")
    logic = seg.MedFMSegmentLogic()
    it = Interaction()
    it.select(sid)
    k = 1
    ys, xs = np.nonzero(truth[k])
    it.box((xs.min() - 2, ys.min() - 2, k), (xs.max() + 2, ys.max() + 2, k), "axial")
    logic.applyPrompts(volume, segmentation, sid, it)
    return volume, truth, segmentation, ijk_to_ras, shape, sid, logic, it, (xs, ys, k)


def test_accepted_slices_are_corrections_taken_from_the_segment(segment_module):
    """The effect's A key: an accepted slice is a correction as the segment holds it when propagation runs,
    even after the prompt session was reset and replayed (a removed click) and after a later edit of the
    slice; prompting the slice again ends its acceptance."""
    seg, scene = segment_module
    from MedFMSegmentLib import mrml

    volume, truth, segmentation, ijk_to_ras, shape, sid, logic, it, (xs, ys, k) = _boxed_blob(seg, scene)
    logic.onlineAdaptation = False  # the pins alone here (a painted square would also teach the adapter squares)

    def segment_mask():
        return mrml.segment_to_mask(segmentation, "Blob", ijk_to_ras, shape)

    painted = segment_mask()
    painted[2] = 0
    painted[2, 10:20, 10:30] = 1  # the user paints slice 2 (no model would draw this square) and accepts it
    mrml.write_mask_to_segment(segmentation, "Blob", painted, ijk_to_ras, volume)
    assert logic.acceptSlice(volume, segmentation, sid, "axial", 2) == ("axial", 2)
    click = it.click((xs.mean(), ys.mean(), k), "axial")
    logic.applyPrompts(volume, segmentation, sid, it)
    it.remove(click.id)  # a removed click: the session is reset and the prompt list replayed
    logic.applyPrompts(volume, segmentation, sid, it)
    entry = logic._sessions[next(iter(logic._sessions))]
    assert not entry.session.pinned_slices(), "the replay dropped the engine's pin"
    painted[2, 10:20, 30:34] = 1  # edited again after accepting (not accepted again)
    mrml.write_mask_to_segment(segmentation, "Blob", painted, ijk_to_ras, volume)
    logic.propagate(volume, segmentation, "Blob", axis="axial")
    result = segment_mask()
    np.testing.assert_array_equal(result[2], painted[2])  # the accepted slice as the segment holds it now
    assert result[0].any() and _dice(result[k], truth[k]) > 0.8
    assert entry.session.pinned_slices() == [("axial", 2)]
    it.box((xs.min() - 2, ys.min() - 2, 2), (xs.max() + 2, ys.max() + 2, 2), "axial")
    logic.applyPrompts(volume, segmentation, sid, it)
    assert entry.accepted == set(), "a new prompt on the accepted slice replaces the correction"
    logic.shutdown()


def test_propagation_adapts_the_segment_from_its_accepted_slices(segment_module):
    """Online adaptation in the Logic (on by default): with an accepted slice holding the structure, propagation
    first updates the segment's adapter from it (the trainer's ``adapter_updater``, from the segment's own adapter,
    here none), decodes with the result, and a second propagation with the same accepted slices trains nothing."""
    seg, scene = segment_module
    from MedFMSegmentLib import mrml

    volume, truth, segmentation, ijk_to_ras, shape, sid, logic, it, (xs, ys, k) = _boxed_blob(seg, scene)
    assert logic.onlineAdaptation
    real = logic._onlineUpdater()
    assert real is not None, "MedFMTrainLib is importable here"
    calls = []

    def update(session, axis, organ, base, should_stop=None):
        calls.append((axis, organ, base, [i for _, i in session.pinned_slices()]))
        return real(session, axis, organ, base, should_stop=should_stop)
    logic._online = update
    mask = mrml.segment_to_mask(segmentation, "Blob", ijk_to_ras, shape)
    mask[2] = truth[2]  # the user fixes slice 2 and accepts it
    mrml.write_mask_to_segment(segmentation, "Blob", mask, ijk_to_ras, volume)
    logic.acceptSlice(volume, segmentation, sid, "axial", 2)
    entry = logic._sessions[next(iter(logic._sessions))]
    logic.propagate(volume, segmentation, "Blob", axis="axial")
    assert calls == [("axial", "Blob", None, [2])]
    adapter = entry.session.adapter
    assert adapter is not None and adapter.manifest["online"]["corrected_slices"] == [2]
    result = mrml.segment_to_mask(segmentation, "Blob", ijk_to_ras, shape)
    np.testing.assert_array_equal(result[2], truth[2])
    assert _dice(result[k], truth[k]) > 0.8
    logic.propagate(volume, segmentation, "Blob", axis="axial")
    assert len(calls) == 1 and entry.session.adapter is adapter, "same accepted slices: the same adapter"
    logic.onlineAdaptation = False
    logic.propagate(volume, segmentation, "Blob", axis="axial")
    assert len(calls) == 1
    logic.shutdown()


def test_adapter_per_segment_from_the_logic(glue, tmp_path):
    load, scene = glue
    seg = load("MedFMSegment")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    liver = segmentation.GetSegmentation().AddEmptySegment("", "Liver")
    segmentation.GetSegmentation().AddEmptySegment("", "Spleen")
    adapter = tmp_path / "liver"
    adapter.mkdir()
    logic = seg.MedFMSegmentLogic()
    logic.configure(adapterDir=str(tmp_path))
    logic.setSegmentAdapter(segmentation, liver, str(adapter))
    assert logic.segmentAdapter(segmentation, liver) == str(adapter)
    assert logic._adapterDirFor(segmentation, "Liver") == str(adapter)
    assert logic._adapterDirFor(segmentation, "Spleen") == str(tmp_path), "other segments keep the default"
    logic.setSegmentAdapter(segmentation, liver, None)
    assert logic._adapterDirFor(segmentation, "Liver") == str(tmp_path)


def test_job_runs_in_a_worker_and_applies_on_the_caller(glue):
    load, _ = glue
    seg = load("MedFMSegment")
    logic = seg.MedFMSegmentLogic()
    import threading

    threads = {}

    def work(job):
        threads["work"] = threading.current_thread()
        job.progress(0.5, "half")
        return 21

    def apply(value):
        threads["apply"] = threading.current_thread()
        return 2 * value

    job = logic._start(seg.MedFMJob("double", work, apply), wait=False)
    job._future.result(timeout=30)
    assert job.done() and (job.fraction, job.message) == (0.5, "half")
    assert job.finish() == 42
    assert threads["work"] is not threading.current_thread() and threads["apply"] is threading.current_thread()

    def failing(job):
        raise ValueError("bad input")

    job = logic._start(seg.MedFMJob("fail", failing, apply), wait=False)
    job._future.exception(timeout=30)
    with pytest.raises(ValueError, match="bad input"):
        job.finish()
    logic.shutdown()


# --------------------------------------------------------------------------- MedFMTrain Logic

def test_train_module_self_test_runs_headless(glue):
    """MedFMTrain's self-test: segment slices, slice-list parsing, export round trip, the command line."""
    load, _ = glue
    load("MedFMSegment")  # MedFMTrain imports it for the view-to-axis rule and the synthetic volume
    train = load("MedFMTrain")
    selftest = train.MedFMTrainTest("test_export_and_command")
    selftest.setUp()
    selftest.test_export_and_command()


def test_train_module_uses_the_process_tree_run(glue):
    """TrainingRun lives in MedFMTrainLib.process (tested there with a fake launcher: test_train_process.py)."""
    load, _ = glue
    load("MedFMSegment")
    train = load("MedFMTrain")
    from MedFMTrainLib import process

    assert train.TrainingRun is process.TrainingRun


def test_use_adapter_attaches_it_to_one_segment(glue, monkeypatch):
    """"Use in MedFM Segment" calls MedFMSegmentLogic().setSegmentAdapter for the chosen segment only."""
    load, scene = glue
    train = load("MedFMTrain")
    calls = []

    class FakeSegmentLogic:
        def setSegmentAdapter(self, segmentationNode, segmentId, adapterDir):
            calls.append((segmentationNode, segmentId, adapterDir))

    monkeypatch.setitem(sys.modules, "MedFMSegment", types.SimpleNamespace(MedFMSegmentLogic=FakeSegmentLogic))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    liver = segmentation.GetSegmentation().AddEmptySegment("", "Liver")
    segmentation.GetSegmentation().AddEmptySegment("", "Spleen")
    logic = train.MedFMTrainLogic()
    assert logic.useAdapter(segmentation, "Liver", Path("/adapters/liver")) == liver
    assert calls == [(segmentation, liver, str(Path("/adapters/liver")))]
    from MedFMSegmentLib.errors import InputError

    for node, name in ((segmentation, "Kidney"), (segmentation, ""), (None, "Liver")):
        with pytest.raises(InputError, match="choose the segmentation and the segment"):
            logic.useAdapter(node, name, "/adapters/liver")
    assert len(calls) == 1


def test_training_slice_lists():
    from MedFMSegmentLib.errors import InputError
    from MedFMTrainLib.slices import nonempty_slices, parse_slice_list

    assert parse_slice_list(" 12, 8 ;12  3") == [3, 8, 12] and parse_slice_list("  ") == []
    with pytest.raises(InputError, match="'ten'"):
        parse_slice_list("8, ten")
    mask = np.zeros((5, 6, 7), np.uint8)
    mask[1, 2, 3] = mask[3, 4, 3] = 1
    assert nonempty_slices(mask, "axial") == [1, 3]
    assert nonempty_slices(mask, "coronal") == [2, 4] and nonempty_slices(mask, "sagittal") == [3]
    with pytest.raises(ValueError):
        nonempty_slices(mask, "oblique")


def test_tune_command_matches_the_trainer_cli(glue):
    """Every option the Slicer module passes is one the trainer's command line accepts."""
    load, _ = glue
    load("MedFMSegment")
    train = load("MedFMTrain")
    if importlib.util.find_spec(train.TUNE_MODULE) is None:
        pytest.skip(f"{train.TUNE_MODULE} does not exist yet")
    import subprocess

    help_text = subprocess.run([sys.executable, "-m", train.TUNE_MODULE, "--help"], capture_output=True, text=True,
                               env=train.MedFMTrainLogic()._environment(), timeout=120).stdout
    command = train.MedFMTrainLogic().tuneCommand("i.nrrd", "l.nrrd", "Liver", "axial", [3, 4], "out", overwrite=True)
    for option in (c for c in command if c.startswith("--")):
        assert option in help_text, f"{train.TUNE_MODULE} --help does not mention {option}"


@pytest.mark.slow  # a real trainer process loads the model and encodes crops: ~45 s on a shared 2-core CPU
def test_start_training_runs_the_trainer_and_cancel_writes_nothing(glue, tmp_path):
    """Export + the real tune_cli process: it starts reporting progress; cancel stops it with no adapter."""
    load, scene = glue
    seg = load("MedFMSegment")
    train = load("MedFMTrain")
    if importlib.util.find_spec(train.TUNE_MODULE) is None:
        pytest.skip(f"{train.TUNE_MODULE} does not exist yet")
    import time

    from MedFMSegmentLib import mrml

    volume, truth = seg.makeEllipsoidVolume(scene, shape_kji=(12, 40, 48), radii_kji=(5, 12, 15))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    ijk_to_ras, _ = mrml.volume_geometry(volume)
    mrml.write_mask_to_segment(segmentation, "Blob", truth, ijk_to_ras, volume)
    logic = train.MedFMTrainLogic()
    logic.pythonExecutable = sys.executable
    out = tmp_path / "adapters" / "Blob"
    run = logic.startTraining(volume, segmentation, "Blob", "Blob", "axial", [4, 6], out, steps=2, rank=2)
    deadline = time.monotonic() + 240
    while run.running() and run.fraction == 0 and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.1)
    assert run.fraction > 0, f"the trainer reported no progress: {run.lines[-5:]}"
    run.cancel()
    while run.running() and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.1)
    run.poll()
    if run.returncode == 0:  # it finished before the cancel arrived: then the adapter is complete
        assert (out / "manifest.json").is_file()
    else:
        assert run.returncode == 3 and run.error, run.lines[-5:]
        assert not out.exists(), "a cancelled training writes no adapter"
    run.cleanup()
    assert not Path(run.workdir).exists()


def test_accepted_slices_outlive_another_segment_and_a_saved_file(segment_module, tmp_path):
    """The accepted slices live in the segment's tag: working on another segment (which resets the prompt
    session) and saving + reloading the segmentation keep them; propagation still keeps them exactly."""
    seg, scene = segment_module
    from MedFMSegmentLib import mrml, mrml_prompts

    volume, truth, segmentation, ijk_to_ras, shape, sid, logic, it, (xs, ys, k) = _boxed_blob(seg, scene)
    other = segmentation.GetSegmentation().AddEmptySegment("", "Second")
    painted = mrml.segment_to_mask(segmentation, "Blob", ijk_to_ras, shape)
    painted[2] = 0
    painted[2, 10:20, 10:30] = 1  # a square no model draws
    mrml.write_mask_to_segment(segmentation, "Blob", painted, ijk_to_ras, volume)
    logic.acceptSlice(volume, segmentation, sid, "axial", 2)
    assert mrml_prompts.accepted_slices(segmentation, sid) == {("axial", 2)}

    it.select(other)  # the user works on another segment: the session now holds that segment's prompts
    it.box((xs.min() - 2, ys.min() - 2, k), (xs.max() + 2, ys.max() + 2, k), "axial")
    logic.applyPrompts(volume, segmentation, other, it)
    entry = logic._sessions[next(iter(logic._sessions))]
    assert entry.accepted == set(), "the session forgot Blob's pin when it moved to the other segment"

    path = tmp_path / "blob.seg.nrrd"
    mrml.save_node(segmentation, str(path))
    reloaded = mrml.load_segmentation(scene, str(path))
    rid = reloaded.GetSegmentation().GetSegmentIdBySegmentName("Blob")
    assert mrml_prompts.accepted_slices(reloaded, rid) == {("axial", 2)}, "the tag is saved with the file"

    it.select(sid)
    logic.applyPrompts(volume, segmentation, sid, it)  # back on Blob: its prompt list is replayed
    logic.propagate(volume, segmentation, "Blob", axis="axial")
    result = mrml.segment_to_mask(segmentation, "Blob", ijk_to_ras, shape)
    np.testing.assert_array_equal(result[2], painted[2])
    assert entry.session.pinned_slices() == [("axial", 2)]

    mrml_prompts.set_segment_tag(segmentation, sid, mrml_prompts.ACCEPTED_TAG, "not json")
    assert mrml_prompts.accepted_slices(segmentation, sid) == set(), "an unreadable tag is ignored, not fatal"
    mrml_prompts.set_accepted_slices(segmentation, sid, [("axial", 99)])  # outside this 3-slice volume
    logic.propagate(volume, segmentation, "Blob", axis="axial")  # skipped with a warning
    logic.shutdown()
