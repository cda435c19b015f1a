"""Architecture rules of the engine (ARCHITECTURE.md), checked on the source (``ast``) and in a fresh interpreter.

- No engine module imports Slicer, Qt, CTK or VTK, except the MRML layer: the ``mrml*.py`` files of
  ``MedFMSegmentLib`` (``mrml.py`` and any ``mrml_*.py``), which import only slicer, vtk, numpy, the
  standard library and the engine itself.
- ``MedFMSegmentLib`` never imports ``MedFMTrainLib`` (only ``cli.py`` may, lazily, inside a function:
  the CLI is where the two are put together). ``MedFMTrainLib`` uses only public names of
  ``MedFMSegmentLib`` and never its ``cli`` or MRML layer.
- ``detectors/``: imports no private name of ``session`` (nor a ``session._x`` attribute), no ``cli``
  and no MRML; at module level only the standard library, numpy, ``geometry``, ``errors`` and its own
  modules (torch, monai, SimpleITK and ``io`` are imported where used); inside the package a module
  imports only lower layers (base < planning < detector modules, chaining < specs < ``__init__``).
- No import cycle between engine modules (lazy imports included).
- No engine module over ``MAX_LINES`` lines, except the ones listed in ``LONG_MODULES`` with a reason.
- No ``print(`` outside the command-line modules, no ``assert`` statements.
- Every engine package (subpackages too) is listed in ``pyproject.toml``, so ``pip install`` ships it.
- Importing the engine does no work: no checkpoint loaded, no model file opened, no network.
"""
from __future__ import annotations

import ast
import fnmatch
import json
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

REPO = Path(__file__).resolve().parents[2]
SEGMENT_LIB = REPO / "MedFMSegment" / "MedFMSegmentLib"
TRAIN_LIB = REPO / "MedFMTrain" / "MedFMTrainLib"
DETECTORS = SEGMENT_LIB / "detectors"


def _python_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


SEGMENT_FILES = _python_files(SEGMENT_LIB)
ENGINE_FILES = SEGMENT_FILES + _python_files(TRAIN_LIB)
FORBIDDEN = {"slicer", "qt", "ctk", "vtk", "vtkmodules", "PythonQt", "MRMLCorePython"}
MRML_ALLOWED = {"slicer", "vtk", "vtkmodules", "numpy", "MedFMSegmentLib"}
MRML_PATTERN = "mrml*.py"  # the MRML layer: mrml.py and its split mrml_*.py, anywhere in MedFMSegmentLib
CLI_FILES = {"cli.py"}

#: No engine module is longer than this (one room per concern; ~600 lines is where a split is due).
MAX_LINES = 650
#: Modules allowed over MAX_LINES for now: path -> (ceiling, reason). Remove an entry once it is split.
LONG_MODULES: Dict[str, tuple] = {}


def is_mrml(path: Path) -> bool:
    return SEGMENT_LIB in path.parents and fnmatch.fnmatch(path.name, MRML_PATTERN)


def module_name(path: Path) -> str:
    """``MedFMSegmentLib/detectors/base.py`` -> ``MedFMSegmentLib.detectors.base`` (``__init__`` -> the package)."""
    root = SEGMENT_LIB if SEGMENT_LIB in path.parents else TRAIN_LIB
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


ENGINE_MODULES = {module_name(p): p for p in ENGINE_FILES}


@dataclass
class Imported:
    module: str  # absolute dotted name, or "." + name for a relative import
    line: int
    top_level: bool  # False when the import runs inside a function (lazy)
    names: tuple = ()  # the names of a ``from X import a, b``
    alias: str = ""  # the name an ``import X`` / ``import X as y`` binds

    @property
    def root(self) -> str:
        return self.module.split(".")[0]


class _Visitor(ast.NodeVisitor):
    def __init__(self):
        self.imports: List[Imported] = []
        self.prints: List[int] = []
        self.asserts: List[int] = []
        self.private_attributes: List[tuple] = []  # (object name, attribute, line) of ``name._attr``
        self._depth = 0

    def _function(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, name: str, node, names=(), alias=""):
        self.imports.append(Imported(name, node.lineno, self._depth == 0, tuple(names), alias))

    def visit_Import(self, node):
        for alias in node.names:
            self._add(alias.name, node, alias=alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node):
        self._add("." * node.level + (node.module or ""), node, [a.name for a in node.names])

    def visit_Attribute(self, node):
        if isinstance(node.value, ast.Name) and node.attr.startswith("_") and not node.attr.startswith("__"):
            self.private_attributes.append((node.value.id, node.attr, node.lineno))
        self.generic_visit(node)

    def visit_Call(self, node):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                self._add(arg.value, node)
        if isinstance(func, ast.Name) and func.id == "print":
            self.prints.append(node.lineno)
        self.generic_visit(node)

    def visit_Assert(self, node):
        self.asserts.append(node.lineno)
        self.generic_visit(node)


def scan(path: Path) -> _Visitor:
    visitor = _Visitor()
    visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return visitor


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def resolve(path: Path, imported: Imported) -> List[str]:
    """The engine modules an import statement of ``path`` loads (explicit ones; parents are not counted)."""
    name = imported.module
    if name.startswith("."):
        level = len(name) - len(name.lstrip("."))
        package = module_name(path).split(".")
        if path.name != "__init__.py":
            package = package[:-1]
        base = package[: len(package) - (level - 1)]
        name = ".".join(base + ([name.lstrip(".")] if name.lstrip(".") else []))
    out = []
    for sub in imported.names:  # ``from X import m`` loads X.m when m is a module
        if f"{name}.{sub}" in ENGINE_MODULES:
            out.append(f"{name}.{sub}")
    if not out or len(out) < len(imported.names):
        while name and name not in ENGINE_MODULES and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in ENGINE_MODULES:
            out.append(name)
    return out


def import_graph(top_level_only: bool = False) -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {m: set() for m in ENGINE_MODULES}
    for module, path in ENGINE_MODULES.items():
        for imported in scan(path).imports:
            if top_level_only and not imported.top_level:
                continue
            graph[module].update(t for t in resolve(path, imported) if t != module)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    state: Dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: List[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_engine_files_are_found():
    names = {p.name for p in ENGINE_FILES}
    assert {"session.py", "models.py", "mrml.py", "cli.py"} <= names
    assert {"MedFMSegmentLib.detectors", "MedFMSegmentLib.detectors.base", "MedFMSegmentLib.chain",
            "MedFMTrainLib.tune"} <= set(ENGINE_MODULES)
    assert is_mrml(SEGMENT_LIB / "mrml.py") and is_mrml(SEGMENT_LIB / "mrml_volumes.py")
    assert not is_mrml(TRAIN_LIB / "mrml.py") and not is_mrml(SEGMENT_LIB / "session.py")


def test_scanner_sees_every_import_form():
    src = textwrap.dedent("""
        import vtk.util
        from qt import QWidget
        import importlib
        def f():
            import slicer
            return importlib.import_module("ctk")
        print(1)
        assert True
    """)
    v = _Visitor()
    v.visit(ast.parse(src))
    found = {(i.root, i.top_level) for i in v.imports}
    assert {("vtk", True), ("qt", True), ("slicer", False), ("ctk", False)} <= found
    assert v.prints == [8] and v.asserts == [9]


@pytest.mark.parametrize("path", ENGINE_FILES, ids=rel)
def test_no_gui_or_slicer_imports(path):
    imports = scan(path).imports
    if is_mrml(path):
        stdlib = set(sys.stdlib_module_names)
        bad = [i for i in imports if not i.module.startswith(".") and i.root not in MRML_ALLOWED | stdlib]
        assert not bad, f"{rel(path)} may import only slicer, vtk, numpy, the stdlib and the engine: " + \
            ", ".join(f"{i.module} (line {i.line})" for i in bad)
    else:
        bad = [i for i in imports if i.root in FORBIDDEN]
        assert not bad, f"{rel(path)} imports Slicer/GUI modules: " + \
            ", ".join(f"{i.module} (line {i.line})" for i in bad)


@pytest.mark.parametrize("path", SEGMENT_FILES, ids=rel)
def test_segment_lib_does_not_import_the_trainer(path):
    imports = [i for i in scan(path).imports if i.root == "MedFMTrainLib"]
    if path.name in CLI_FILES:
        imports = [i for i in imports if i.top_level]
    assert not imports, f"{rel(path)} imports MedFMTrainLib" + \
        ("" if path.name in CLI_FILES else " (only cli.py may, inside a function)") + ": " + \
        ", ".join(f"{i.module} (line {i.line})" for i in imports)


@pytest.mark.parametrize("path", _python_files(TRAIN_LIB), ids=rel)
def test_trainer_uses_only_public_engine_names(path):
    bad = []
    for imported in scan(path).imports:
        targets = [t for t in resolve(path, imported) if t.startswith("MedFMSegmentLib")]
        if any(t == "MedFMSegmentLib.cli" or is_mrml(ENGINE_MODULES[t]) for t in targets):
            bad.append(f"{imported.module} (line {imported.line}): the CLI / MRML layer is not a library")
        if targets:
            bad += [f"{imported.module}.{n} (line {imported.line}): private" for n in imported.names
                    if n.startswith("_")]
    assert not bad, f"{rel(path)} reaches into MedFMSegmentLib: " + "; ".join(bad)


DETECTOR_LAYERS = {"base": 0, "planning": 1, "chaining": 2, "specs": 3, "__init__": 4}
DETECTOR_MODULE_LAYER = 2  # files, roi, labelmap, retinanet and every new detector: base and planning only
DETECTOR_TOP_LEVEL_ENGINE = {"MedFMSegmentLib.geometry", "MedFMSegmentLib.errors"}


@pytest.mark.parametrize("path", _python_files(DETECTORS), ids=rel)
def test_detectors_package_boundaries(path):
    v = scan(path)
    stdlib = set(sys.stdlib_module_names)
    layer = DETECTOR_LAYERS.get(path.stem, DETECTOR_MODULE_LAYER)
    session_aliases = {"session"}  # a session object passed in counts as much as the module
    bad = []
    for imported in v.imports:
        targets = resolve(path, imported)
        where = f"{imported.module} (line {imported.line})"
        if "MedFMSegmentLib.session" in targets:
            session_aliases.add(imported.alias or "session")
            bad += [f"{where}: imports session internal {n}" for n in imported.names if n.startswith("_")]
        for t in targets:
            if t.endswith(".cli") or is_mrml(ENGINE_MODULES[t]) or t.startswith("MedFMTrainLib"):
                bad.append(f"{where}: detectors/ may not import {t}")
            if t.startswith("MedFMSegmentLib.detectors"):
                sibling = t.rsplit(".", 1)[-1] if t != "MedFMSegmentLib.detectors" else "__init__"
                their = DETECTOR_LAYERS.get(sibling, DETECTOR_MODULE_LAYER)
                if their >= layer:
                    bad.append(f"{where}: {path.stem} (layer {layer}) may import only lower layers of "
                               f"detectors/, not {sibling} (layer {their})")
            elif imported.top_level and t not in DETECTOR_TOP_LEVEL_ENGINE:
                bad.append(f"{where}: import {t} inside the function that needs it")
        if imported.top_level and not targets and imported.root not in stdlib | {"numpy"}:
            bad.append(f"{where}: heavy or third-party import at module level (import it where used)")
    bad += [f"{obj}.{attr} (line {line}): session internals" for obj, attr, line in v.private_attributes
            if obj in session_aliases]
    assert not bad, f"{rel(path)} crosses the detectors/ boundary: " + "; ".join(bad)


def test_boundary_scanner_resolves_relative_imports():
    spec = DETECTORS / "specs.py"
    assert resolve(spec, Imported(".", 1, True, ("files", "labelmap"))) == [
        "MedFMSegmentLib.detectors.files", "MedFMSegmentLib.detectors.labelmap"]
    assert resolve(spec, Imported("..errors", 1, True, ("InputError",))) == ["MedFMSegmentLib.errors"]
    assert resolve(spec, Imported("..", 1, True, ("geometry",))) == ["MedFMSegmentLib.geometry"]
    assert resolve(DETECTORS / "__init__.py", Imported(".base", 1, True, ("Detection",))) == [
        "MedFMSegmentLib.detectors.base"]
    assert resolve(TRAIN_LIB / "localizer.py", Imported("MedFMSegmentLib.detectors", 1, False, ("Detection",))) == [
        "MedFMSegmentLib.detectors"]
    assert resolve(SEGMENT_LIB / "api.py", Imported("numpy", 1, True, ())) == []
    v = _Visitor()
    v.visit(ast.parse("from ..session import _cache\nsession._state = 1\n"))
    assert v.imports[0].names == ("_cache",) and v.private_attributes == [("session", "_state", 2)]


def test_no_import_cycles_between_engine_modules():
    graph = import_graph()
    assert "MedFMSegmentLib.detectors.planning" in graph["MedFMSegmentLib.detectors.chaining"]
    assert "MedFMSegmentLib.session" in graph["MedFMSegmentLib.propagate"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between engine modules: " + " -> ".join(cycle)


@pytest.mark.parametrize("path", ENGINE_FILES, ids=rel)
def test_engine_modules_stay_short(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    ceiling, reason = LONG_MODULES.get(rel(path), (MAX_LINES, ""))
    assert lines <= ceiling, (f"{rel(path)} has {lines} lines (limit {ceiling}): split it by concern "
                              f"(see ARCHITECTURE.md)" + (f"; listed as long because {reason}" if reason else ""))
    if reason and lines <= MAX_LINES:
        warnings.warn(f"{rel(path)} has {lines} lines now: remove it from LONG_MODULES")


def test_long_module_exceptions_name_real_files():
    for path, (ceiling, reason) in LONG_MODULES.items():
        assert reason and ceiling > MAX_LINES, path
        if not (REPO / path).exists():
            warnings.warn(f"{path} is gone: remove it from LONG_MODULES")


def test_pyproject_packages_every_engine_package():
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    packages = {module_name(p) for p in ENGINE_FILES if p.name == "__init__.py"}
    assert "MedFMSegmentLib.detectors" in packages
    missing = sorted(packages - set(config["packages"]))
    assert not missing, f"pyproject.toml [tool.setuptools] packages misses {missing}: pip would not install them"


@pytest.mark.parametrize("path", ENGINE_FILES, ids=rel)
def test_no_print_no_assert(path):
    v = scan(path)
    if path.name not in CLI_FILES:
        assert not v.prints, f"{rel(path)} calls print() (use logging) at lines {v.prints}"
    assert not v.asserts, f"{rel(path)} uses assert (raise InputError instead) at lines {v.asserts}"


IMPORT_PROBE = r"""
import builtins, io, json, socket, sys, time
sys.path[:0] = [{segment!r}, {train!r}]
t0 = time.perf_counter()
import numpy, torch, SimpleITK  # third-party libraries: not the engine's cost
t_libs = time.perf_counter() - t0
events = []
MODEL_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors", ".bin", ".onnx")
real_open = builtins.open
def spy_open(file, *a, **k):
    if str(file).endswith(MODEL_SUFFIXES):
        events.append("open " + str(file))
    return real_open(file, *a, **k)
builtins.open = io.open = spy_open
def refuse(name):
    def f(*a, **k):
        events.append(name)
        raise RuntimeError(name + " called at import time")
    return f
torch.load = refuse("torch.load")
torch.jit.load = refuse("torch.jit.load")
socket.socket.connect = refuse("socket.connect")
t0 = time.perf_counter()
import importlib
for name in {modules!r}:
    importlib.import_module(name)
t_engine = time.perf_counter() - t0
import threading
print(json.dumps({{"libs": t_libs, "engine": t_engine, "events": events,
                  "threads": threading.active_count()}}))
"""


def test_importing_the_engine_does_no_work():
    modules = [m for m, p in ENGINE_MODULES.items() if not is_mrml(p)]
    assert "MedFMSegmentLib.session" in modules and "MedFMSegmentLib.detectors.retinanet" in modules
    script = IMPORT_PROBE.format(segment=str(REPO / "MedFMSegment"), train=str(REPO / "MedFMTrain"),
                                 modules=modules)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                          cwd=str(REPO))
    assert proc.returncode == 0, f"importing the engine failed:\n{proc.stderr[-3000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["events"] == [], f"importing the engine loaded or opened model files: {out['events']}"
    assert out["threads"] == 1, "importing the engine started threads"
    # torch/numpy/SimpleITK are already imported: the engine's own import is only definitions
    assert out["engine"] < 3.0, f"importing the engine took {out['engine']:.1f} s (libraries {out['libs']:.1f} s)"
