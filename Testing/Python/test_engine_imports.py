"""Architecture rules of the engine, checked on the source (``ast``) and in a fresh interpreter.

- No engine module imports Slicer, Qt, CTK or VTK, except ``MedFMSegmentLib/mrml.py``, which imports
  only slicer, vtk, numpy, the standard library and the engine itself.
- ``MedFMSegmentLib`` never imports ``MedFMTrainLib`` at module level (``cli.py`` may, lazily, inside
  a function).
- No ``print(`` outside the command-line modules, no ``assert`` statements.
- Importing the engine does no work: no checkpoint loaded, no model file opened, no network.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parents[2]
SEGMENT_LIB = REPO / "MedFMSegment" / "MedFMSegmentLib"
TRAIN_LIB = REPO / "MedFMTrain" / "MedFMTrainLib"
ENGINE_FILES = sorted(SEGMENT_LIB.glob("*.py")) + sorted(TRAIN_LIB.glob("*.py"))
FORBIDDEN = {"slicer", "qt", "ctk", "vtk", "vtkmodules", "PythonQt", "MRMLCorePython"}
MRML_ALLOWED = {"slicer", "vtk", "vtkmodules", "numpy", "MedFMSegmentLib"}
CLI_FILES = {"cli.py"}


@dataclass
class Imported:
    module: str  # absolute dotted name, or "." + name for a relative import
    line: int
    top_level: bool  # False when the import runs inside a function (lazy)

    @property
    def root(self) -> str:
        return self.module.split(".")[0]


class _Visitor(ast.NodeVisitor):
    def __init__(self):
        self.imports: List[Imported] = []
        self.prints: List[int] = []
        self.asserts: List[int] = []
        self._depth = 0

    def _function(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, name: str, node):
        self.imports.append(Imported(name, node.lineno, self._depth == 0))

    def visit_Import(self, node):
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node):
        self._add("." * node.level + (node.module or ""), node)

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


def test_engine_files_are_found():
    names = {p.name for p in ENGINE_FILES}
    assert {"session.py", "models.py", "mrml.py", "cli.py"} <= names


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
    if path.parent == SEGMENT_LIB and path.stem.startswith("mrml"):  # mrml.py and its mrml_*.py rooms
        stdlib = set(sys.stdlib_module_names)
        bad = [i for i in imports if not i.module.startswith(".") and i.root not in MRML_ALLOWED | stdlib]
        assert not bad, f"{rel(path)} may import only slicer, vtk, numpy, the stdlib and the engine: " + \
            ", ".join(f"{i.module} (line {i.line})" for i in bad)
    else:
        bad = [i for i in imports if i.root in FORBIDDEN]
        assert not bad, f"{rel(path)} imports Slicer/GUI modules: " + \
            ", ".join(f"{i.module} (line {i.line})" for i in bad)


@pytest.mark.parametrize("path", sorted(SEGMENT_LIB.glob("*.py")), ids=rel)
def test_segment_lib_does_not_import_the_trainer(path):
    imports = [i for i in scan(path).imports if i.root == "MedFMTrainLib"]
    if path.name in CLI_FILES:
        imports = [i for i in imports if i.top_level]
    assert not imports, f"{rel(path)} imports MedFMTrainLib" + \
        ("" if path.name in CLI_FILES else " (only cli.py may, inside a function)") + ": " + \
        ", ".join(f"{i.module} (line {i.line})" for i in imports)


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
    modules = ["MedFMSegmentLib." + p.stem for p in sorted(SEGMENT_LIB.glob("*.py"))
               if p.stem != "__init__" and not p.stem.startswith("mrml")]
    modules += ["MedFMTrainLib." + p.stem for p in sorted(TRAIN_LIB.glob("*.py")) if p.stem != "__init__"]
    assert "MedFMSegmentLib.session" in modules
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
