"""Slicer's real ``parameterNodeWrapper`` on the modules' parameter nodes and .ui files (no Slicer application).

``slicer.parameterNodeWrapper`` is plain Python in Slicer's sources, but slicer-core does not ship it. Given
a Slicer checkout in ``$MEDFM_SLICER_SOURCE`` (a source tree or a git directory; nothing of it is
committed here), this test imports that package under small stand-ins for the Qt / CTK widget classes of
the .ui files, builds the widgets with the .ui properties, and runs the real serializers on a real
``vtkMRMLScriptedModuleNode`` and the real ``connectGui`` / GUI connectors: the .ui limits must survive,
choices must fill the combo boxes, and values must flow both ways. Skipped when no checkout is given.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PNW = "Base/Python/slicer/parameterNodeWrapper"
FILES = ["__init__", "default", "guiConnectors", "guiCreation", "parameterInfo", "parameterPack", "serializers",
         "types", "util", "validators", "wrapper"]


def _source(tmp_path_factory):
    root = os.environ.get("MEDFM_SLICER_SOURCE")
    if not root:
        pytest.skip("set MEDFM_SLICER_SOURCE to a Slicer checkout (source tree or git dir) to run Slicer's "
                    "parameterNodeWrapper for real")
    root = Path(root)
    if (root / PNW).is_dir():
        return root / PNW, "source tree " + str(root)
    out = tmp_path_factory.mktemp("parameterNodeWrapper")
    for name in FILES:
        text = subprocess.run(["git", "--git-dir", str(root), "show", f"HEAD:{PNW}/{name}.py"], check=True,
                              capture_output=True, text=True).stdout
        (out / f"{name}.py").write_text(text, encoding="utf-8")
    commit = subprocess.run(["git", "--git-dir", str(root), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return out, "Slicer " + commit


# ----------------------------------------------------------------- stand-ins for the Qt / CTK widgets

class Signal:
    def __init__(self):
        self._slots = []

    def connect(self, slot):
        self._slots.append(slot)

    def disconnect(self, slot):
        self._slots.remove(slot)

    def emit(self, *args):
        """Like PythonQt, pass a slot only as many arguments as it takes."""
        import inspect

        for slot in list(self._slots):
            parameters = inspect.signature(slot).parameters.values()
            if any(p.kind == p.VAR_POSITIONAL for p in parameters):
                slot(*args)
            else:
                slot(*args[:len([p for p in parameters if p.default is p.empty])])


class Widget:
    SIGNALS = ()

    def __init__(self):
        self._properties = {}
        for name in self.SIGNALS:
            setattr(self, name, Signal())

    def property(self, name):
        return self._properties.get(name)

    def setProperty(self, name, value):
        self._properties[name] = value


class QSpinBox(Widget):
    SIGNALS = ("valueChanged",)
    minimum, maximum, value, singleStep = 0, 99, 0, 1

    def setMinimum(self, v):
        self.minimum = v

    def setMaximum(self, v):
        self.maximum = v

    def setRange(self, a, b):
        self.minimum, self.maximum = a, b


class QSlider(QSpinBox):
    pass


class QDoubleSpinBox(QSpinBox):
    decimals = 2


class QComboBox(Widget):
    SIGNALS = ("currentIndexChanged",)
    currentIndex = -1

    def __init__(self):
        super().__init__()
        self.items = []

    def clear(self):
        self.items, self.currentIndex = [], -1

    def addItem(self, text):
        self.items.append(text)
        if self.currentIndex < 0:
            self.currentIndex = 0


class QLineEdit(Widget):
    SIGNALS = ("textChanged",)
    text = ""


class QCheckBox(Widget):
    SIGNALS = ("stateChanged",)
    checked = False


class QPushButton(Widget):
    SIGNALS = ("toggled",)
    checked = checkable = False


class ctkDirectoryButton(Widget):
    SIGNALS = ("directoryChanged",)
    directory = ""


class ctkPathLineEdit(Widget):
    SIGNALS = ("currentPathChanged",)
    currentPath = ""


class qMRMLNodeComboBox(Widget):
    SIGNALS = ("currentNodeChanged",)
    nodeTypes = ()

    def __init__(self):
        super().__init__()
        self._node = None

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node):
        self._node = node


class QColor:
    pass


def _fake_qt_ctk():
    qt = types.ModuleType("qt")
    for cls in (QSpinBox, QSlider, QDoubleSpinBox, QComboBox, QLineEdit, QCheckBox, QPushButton, QColor):
        setattr(qt, cls.__name__, cls)
    for name in ("QWidget", "QLabel", "QTextEdit", "QVBoxLayout", "QFormLayout"):
        setattr(qt, name, type(name, (Widget,), {}))
    ctk = types.ModuleType("ctk")
    ctk.ctkDirectoryButton, ctk.ctkPathLineEdit = ctkDirectoryButton, ctkPathLineEdit
    for name in ("ctkCheckBox", "ctkComboBox", "ctkCheckablePushButton", "ctkSliderWidget", "ctkDoubleSlider",
                 "ctkDoubleSpinBox", "ctkRangeWidget", "ctkDoubleRangeSlider", "ctkColorPickerButton"):
        setattr(ctk, name, type(name, (Widget,), {}))
    return qt, ctk


def _number(text):
    return int(text) if text.lstrip("-").isdigit() else float(text)


def ui_namespace(path: Path, qt, ctk, slicer):
    """The .ui widgets bound to parameters, built with their .ui properties (as loadUI would)."""
    ui = types.SimpleNamespace()
    for element in ET.parse(path).getroot().iter("widget"):
        cls = element.get("class")
        factory = getattr(qt, cls, None) or getattr(ctk, cls, None) or getattr(slicer, cls, None)
        properties = {p.get("name"): next(iter(p)) for p in element.findall("property")}
        if factory is None or "SlicerParameterName" not in properties:
            continue
        widget = factory()
        for name, value in properties.items():
            if name == "SlicerParameterName":
                widget.setProperty(name, value.text)
            elif value.tag == "number":
                setattr(widget, name, _number(value.text))
        setattr(ui, element.get("name"), widget)
    return ui


@pytest.fixture
def real_wrapper(monkeypatch, tmp_path_factory):
    """Module-file loader with Slicer's real parameterNodeWrapper; returns (load, scene, qt, ctk, source)."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    folder, source = _source(tmp_path_factory)
    qt, ctk = _fake_qt_ctk()
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "ctk", ctk)
    monkeypatch.setattr(slicer, "qMRMLNodeComboBox", qMRMLNodeComboBox, raising=False)
    for name in ("qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLRangeWidget", "qSlicerWidget"):
        monkeypatch.setattr(slicer, name, type(name, (Widget,), {}), raising=False)
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    spec = importlib.util.spec_from_file_location("slicer.parameterNodeWrapper", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", package)
    spec.loader.exec_module(package)
    monkeypatch.setattr(slicer, "parameterNodeWrapper", package, raising=False)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from test_slicer_glue import _fake_slicer_modules  # the ScriptedLoadableModule / i18n stand-ins
    finally:
        sys.path.pop(0)
    for key, fake in _fake_slicer_modules().items():
        if key not in ("qt", "slicer.parameterNodeWrapper"):
            monkeypatch.setitem(sys.modules, key, fake)
    for sub in ("MedFMSegment", "MedFMTrain"):
        monkeypatch.syspath_prepend(str(REPO / sub))

    def load(name):
        spec = importlib.util.spec_from_file_location(name, REPO / name / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        return module

    return load, scene, qt, ctk, slicer, source


def _parameter_node(slicer, scene, wrapper_class):
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    return wrapper_class(node)


def test_train_parameter_node_and_gui_with_the_real_wrapper(real_wrapper):
    load, scene, qt, ctk, slicer, source = real_wrapper
    train = load("MedFMTrain")
    p = _parameter_node(slicer, scene, train.MedFMTrainParameterNode)
    assert (p.steps, p.rank, p.sliceView, p.axis) == (120, 8, "Red", "axial")
    p.steps = 7
    assert p.parameterNode.GetParameter("steps") == "7", "the real serializer writes the scripted module node"
    with pytest.raises(ValueError):
        p.steps = 0  # WithinRange(1, 100000) is validated by the wrapper
    with pytest.raises(ValueError):
        p.sliceView = "Purple"

    ui = ui_namespace(REPO / "MedFMTrain" / "Resources" / "UI" / "MedFMTrain.ui", qt, ctk, slicer)
    tag = p.connectGui(ui)
    assert (ui.stepsSpinBox.minimum, ui.stepsSpinBox.maximum) == (1, 100000), f"limits lost ({source})"
    assert (ui.rankSpinBox.minimum, ui.rankSpinBox.maximum) == (1, 256)
    assert ui.stepsSpinBox.value == 7 and ui.sliceViewComboBox.items == train.VIEW_CHOICES
    assert ui.axisComboBox.items == train.AXES
    ui.rankSpinBox.value = 16
    ui.rankSpinBox.valueChanged.emit(16)
    assert p.rank == 16, "a widget change reaches the parameter node"
    ui.sliceViewComboBox.currentIndex = 2
    ui.sliceViewComboBox.currentIndexChanged.emit(2)
    assert p.sliceView == "Green"
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    p.inputVolume = volume
    assert ui.inputVolumeSelector.currentNode() is volume, "a parameter change reaches the widget"
    ui.adaptersFolderButton.directory = "/tmp/adapters"
    ui.adaptersFolderButton.directoryChanged.emit("/tmp/adapters")
    assert p.adaptersFolder == Path("/tmp/adapters")
    p.disconnectGui(tag)


def test_an_unbounded_int_loses_the_ui_limits_in_the_real_connector(real_wrapper):
    """The defect the static check guards against, shown with Slicer's own code."""
    load, scene, qt, ctk, slicer, _ = real_wrapper
    pnw = slicer.parameterNodeWrapper

    @pnw.parameterNodeWrapper
    class Unbounded:
        steps: int = 120

    widget = qt.QSpinBox()
    widget.minimum, widget.maximum = 1, 100000
    widget.setProperty("SlicerParameterName", "steps")
    _parameter_node(slicer, scene, Unbounded).connectGui(types.SimpleNamespace(stepsSpinBox=widget))
    assert (widget.minimum, widget.maximum) == (-(2 ** 31), 2 ** 31 - 1)


def test_segment_parameter_node_and_gui_with_the_real_wrapper(real_wrapper):
    load, scene, qt, ctk, slicer, _ = real_wrapper
    seg = load("MedFMSegment")
    p = _parameter_node(slicer, scene, seg.MedFMSegmentParameterNode)
    ui = ui_namespace(REPO / "MedFMSegment" / "Resources" / "UI" / "MedFMSegment.ui", qt, ctk, slicer)
    p.connectGui(ui)
    assert ui.modelComboBox.items == seg.MODEL_CHOICES and ui.presetComboBox.items == seg.PRESET_CHOICES
