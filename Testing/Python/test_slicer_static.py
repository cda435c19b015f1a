"""Static checks of the Slicer glue against Slicer's, CTK's and Qt's real APIs (no Slicer application needed).

- every ``.ui`` widget bound to the parameter node (``SlicerParameterName``) is checked with the rules of
  Slicer's ``parameterNodeWrapper/guiConnectors.py`` (``slicer_api/gui_connectors.json``): a connector must
  exist for the widget class and the parameter's type; spin boxes whose type has no ``WithinRange`` get
  their .ui limits reset to -2^31..2^31-1; sliders need a bound; combo boxes need a ``Choice``;
- every ``.ui`` ``<connection>``, every ``.ui`` property of a CTK / Slicer widget, every ``connect("signal(...)")``
  string and every method called on a CTK / Slicer widget of the .ui is looked up in the checked-in lists of
  the classes' real signals / slots / Q_INVOKABLEs / Q_PROPERTYs (``slicer_api/classes.json`` from the
  Slicer and CTK headers, ``slicer_api/qt5.json`` for Qt; ``slicer_api/regenerate.py`` rebuilds the first
  two from checkouts; the commits are in the files);
- every file under a module's ``Resources/`` and every glue ``.py`` is in the module's CMake lists, and every
  file the code or the README names there exists; every scripted module a module folder imports is in
  that module's ``parent.dependencies`` (imports guarded by ``except ImportError`` are optional);
- user-visible strings in the glue go through ``_()`` (Slicer i18n);
- the dependency list resolves for Slicer's Python 3.12 on Linux, Windows and macOS-arm64
  (``pip install --dry-run``; needs the package index, skipped with the reason when it cannot be reached).

The checks scan every glue file (module files, effects, ``MedFMSlicerLib``, ``Resources/*.py``) and every
``.ui`` file of both modules, so new files are covered without listing them here.
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
API = Path(__file__).resolve().parent / "slicer_api"
MODULE_FOLDERS = {"MedFMSegment": REPO / "MedFMSegment", "MedFMTrain": REPO / "MedFMTrain"}
ENGINE_DIRS = {"MedFMSegmentLib", "MedFMTrainLib", "__pycache__"}
KNOWN_SCRIPTED_MODULES = {"PyTorchUtils", "SampleData", "SegmentEditor", "Segmentations", "DICOM"}


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# Findings in files another engineer is changing on their branch (issue 11, wip/i11a): reported as xfail, not
# fixed here. Remove an entry once that branch has landed; a finding in any other file fails.
OPEN_ELSEWHERE: dict = {}  # file -> reason, for findings owned by work still open elsewhere (none now)


def check(findings: list) -> None:
    """Fail on the findings; xfail when every finding is in a file listed in OPEN_ELSEWHERE."""
    if not findings:
        return
    owners = {next((why for f, why in OPEN_ELSEWHERE.items() if f in finding), None) for finding in findings}
    if None in owners:
        pytest.fail("\n".join(findings), pytrace=False)
    pytest.xfail("; ".join(sorted(owners)) + ":\n" + "\n".join(findings))


def glue_files(folder: Path) -> list:
    return sorted(p for p in folder.rglob("*.py") if not ENGINE_DIRS & set(p.relative_to(folder).parts))


def ui_files(folder: Path) -> list:
    return sorted(folder.rglob("*.ui"))


ALL_GLUE = [p for f in MODULE_FOLDERS.values() for p in glue_files(f)]
ALL_UI = [p for f in MODULE_FOLDERS.values() for p in ui_files(f)]


def module_folder_of(path: Path) -> Path:
    return next(f for f in MODULE_FOLDERS.values() if f in path.parents)


# ------------------------------------------------------------------------------------------- the API lists

def _load(name):
    return json.loads((API / name).read_text(encoding="utf-8"))


CONNECTORS = _load("gui_connectors.json")["connectors"]
CLASSES = {**_load("qt5.json")["classes"], **_load("classes.json")["classes"]}
CUSTOM = set(_load("classes.json")["classes"])  # Slicer / CTK classes (PythonQt exposes only their slots etc.)


def chain(cls: str) -> list:
    if cls not in CLASSES:
        raise KeyError(f"class {cls} is not in slicer_api/*.json: add it to regenerate.py CLASSES (or qt5.json)")
    out = []
    while cls:
        out.append(cls)
        cls = CLASSES.get(cls, {}).get("inherits")
    return out


def members(cls: str, *kinds) -> set:
    found = set()
    for c in chain(cls):
        for kind in kinds:
            found |= set(CLASSES.get(c, {}).get(kind, []))
    return found


def names(signatures) -> set:
    return {s.split("(")[0] for s in signatures}


def normalize(signature: str) -> str:
    name, _, args = signature.partition("(")
    args = args.rstrip(")")
    types = [re.sub(r"\bconst\b|&", "", a).replace(" ", "") for a in args.split(",") if a.strip()]
    return f"{name.strip()}({','.join(types)})"


def test_api_lists_name_their_sources():
    source = _load("classes.json")["source"]
    assert re.match(r"Slicer/Slicer [0-9a-f]{40}", source["slicer"]) and re.match(r"commontk/CTK [0-9a-f]{40}",
                                                                                    source["ctk"])
    assert "QSliderOrSpinBoxToIntConnector" in CONNECTORS and "timeout()" in members("QTimer", "signals")
    assert "currentSegmentChanged(QString)" in members("qMRMLSegmentSelectorWidget", "signals")


# ------------------------------------------------------------------------------------- parameter node classes

def _dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return getattr(node, "id", "")


def parameter_fields(folder: Path) -> dict:
    """{name: (type, {annotation: args})} of every @parameterNodeWrapper class in the folder's glue files."""
    fields = {}
    for path in glue_files(folder):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for cls in ast.walk(tree):
            if not (isinstance(cls, ast.ClassDef) and any("parameterNodeWrapper" in _dotted(
                    d.func if isinstance(d, ast.Call) else d) for d in cls.decorator_list)):
                continue
            for stmt in cls.body:
                if not isinstance(stmt, ast.AnnAssign):
                    continue
                annotation, extras = stmt.annotation, {}
                if isinstance(annotation, ast.Subscript) and _dotted(annotation.value).endswith("Annotated"):
                    elements = annotation.slice.elts
                    annotation = elements[0]
                    for extra in elements[1:]:
                        if isinstance(extra, ast.Call):
                            try:
                                extras[_dotted(extra.func).split(".")[-1]] = [ast.literal_eval(a) for a in extra.args]
                            except ValueError:
                                extras[_dotted(extra.func).split(".")[-1]] = []
                name = _dotted(annotation)
                if isinstance(annotation, ast.Subscript) and _dotted(annotation.value).split(".")[-1] in ("Union", "Optional"):
                    # guiConnectors.isNodeOrUnionOfNodes: a Union of MRML node classes is a node parameter
                    members_ = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
                    if all(_dotted(m).split(".")[-1].startswith("vtkMRML") for m in members_):
                        name = "vtkMRMLNode"
                full = aliases.get(name, name)
                if full.split(".")[-1].startswith("vtkMRML"):
                    full = "vtkMRMLNode"
                elif full in ("pathlib.Path", "Path"):
                    full = "pathlib.Path"
                fields.setdefault(stmt.target.id, (full, extras, rel(path)))
    return fields


def ui_widgets(path: Path) -> dict:
    """{name: (class, {property: value}, element)} of a .ui file."""
    out = {}
    for w in ET.parse(path).getroot().iter("widget"):
        props = {}
        for p in w.findall("property"):
            value = next(iter(p), None)
            props[p.get("name")] = (value.text if value is not None else None, p.get("stdset"))
        out[w.get("name")] = (w.get("class"), props, w)
    return out


def binding_findings(path: Path, fields: dict) -> list:
    findings = []
    for name, (cls, props, _) in ui_widgets(path).items():
        if "SlicerParameterName" not in props:
            continue
        parameter = props["SlicerParameterName"][0]
        where = f"{rel(path)}: {name} ({cls}) -> {parameter}"
        if parameter not in fields:
            findings.append(f"{where}: no parameter node field {parameter!r}")
            continue
        type_, extras, source = fields[parameter]
        connector = next((c for c in CONNECTORS.values() if cls in c["widgets"] and type_ in c["types"]), None)
        if connector is None:
            findings.append(f"{where}: Slicer's parameterNodeWrapper has no connector from {cls} to {type_} "
                            f"({source})")
            continue
        bounded = "WithinRange" in extras or {"Minimum", "Maximum"} <= set(extras)
        ui_range = [props.get(k, (None,))[0] for k in ("minimum", "maximum")]
        if connector["resets_range_when_unbounded"] and not bounded:
            findings.append(f"{where}: {type_} without WithinRange: connectGui resets the .ui limits "
                            f"{ui_range[0]}..{ui_range[1]} to the full range (annotate WithinRange in {source})")
        if bounded and "WithinRange" in extras and all(v is not None for v in ui_range):
            if [float(v) for v in ui_range] != [float(v) for v in extras["WithinRange"]]:
                findings.append(f"{where}: WithinRange{tuple(extras['WithinRange'])} replaces the .ui limits "
                                f"{ui_range[0]}..{ui_range[1]}: make them equal")
        if cls in connector["needs_bound"] and not bounded:
            findings.append(f"{where}: {cls} needs a bounded type (WithinRange)")
        if connector["needs_choice"] and "Choice" not in extras:
            findings.append(f"{where}: a combo box needs Annotated[..., Choice([...])] in {source}")
    return findings


@pytest.mark.parametrize("path", ALL_UI, ids=rel)
def test_ui_bindings_follow_the_gui_connector_rules(path):
    findings = binding_findings(path, parameter_fields(module_folder_of(path)))
    check(findings)


# ------------------------------------------------------------------------- signals, slots, properties

def ui_api_findings(path: Path) -> list:
    widgets, findings = ui_widgets(path), []
    for c in ET.parse(path).getroot().iter("connection"):
        sender, receiver = c.findtext("sender"), c.findtext("receiver")
        signal, slot = normalize(c.findtext("signal")), normalize(c.findtext("slot"))
        if sender not in widgets or receiver not in widgets:
            findings.append(f"{rel(path)}: connection {sender} -> {receiver}: unknown widget")
            continue
        if signal not in members(widgets[sender][0], "signals"):
            findings.append(f"{rel(path)}: {sender} ({widgets[sender][0]}) has no signal {signal}")
        if slot not in members(widgets[receiver][0], "slots", "signals"):
            findings.append(f"{rel(path)}: {receiver} ({widgets[receiver][0]}) has no slot {slot}")
    for name, (cls, props, _) in widgets.items():
        if cls not in CUSTOM:
            continue
        known = members(cls, "properties")
        for prop, (_, stdset) in props.items():
            if stdset != "0" and prop not in known:
                findings.append(f"{rel(path)}: {name} ({cls}) has no property {prop!r}")
    return findings


def _ui_classes(folder: Path) -> dict:
    classes = {}
    for ui in ui_files(folder):
        classes.update({name: cls for name, (cls, _, _) in ui_widgets(ui).items()})
    return classes


# Methods that Qt's own wrappers give every widget (PythonQt wraps all public Qt methods, not only slots).
QWIDGET_METHODS = {"connect", "disconnect", "property", "setProperty", "findChildren", "findChild", "parent",
                   "parentWidget", "layout", "setLayout", "isVisible", "isEnabled", "setToolTip", "toolTip",
                   "setMinimumWidth", "setMaximumWidth", "setFixedWidth", "blockSignals", "objectName",
                   "setObjectName", "width", "height", "size", "resize", "installEventFilter", "setFocus"}


def _receiver_classes(node, parents, ui_classes, attributes):
    """Classes the receiver of a call may have (empty when unknown)."""
    target = node.func.value
    text = _dotted(target)
    if text.startswith("self.ui."):
        return {ui_classes.get(text.split(".")[2], "?" + text.split(".")[2])}
    if text in attributes:
        return {attributes[text]}
    if isinstance(target, ast.Name):  # a loop variable over (self.ui.a, ...), like the button loops
        loop = parents.get(id(node))
        while loop is not None and not (isinstance(loop, ast.For) and target.id in {
                n.id for n in ast.walk(loop.target) if isinstance(n, ast.Name)}):
            loop = parents.get(id(loop))
        if loop is not None:
            return {ui_classes.get(_dotted(n).split(".")[2], "?") for n in ast.walk(loop.iter)
                    if _dotted(n).startswith("self.ui.") and _dotted(n).count(".") == 2} - {"?"}
    return set()


def python_api_findings(path: Path) -> list:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[id(child)] = node
    ui_classes = _ui_classes(module_folder_of(path))
    attributes = {}  # self._timer = qt.QTimer()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            made = _dotted(node.value.func)
            if made.split(".")[0] in ("qt", "ctk", "slicer") and made.split(".")[-1] in CLASSES:
                for t in node.targets:
                    attributes[_dotted(t)] = made.split(".")[-1]
    every_signal = {s for c in CLASSES for s in CLASSES[c].get("signals", [])}
    findings = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        where = f"{rel(path)}:{node.lineno}"
        classes = _receiver_classes(node, parents, ui_classes, attributes)
        unknown = sorted(c for c in classes if c.startswith("?"))
        if unknown:
            findings.append(f"{where}: self.ui.{unknown[0][1:]} is not a widget of the module's .ui files")
            continue
        method = node.func.attr
        if method == "connect" and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and "(" in node.args[0].value:
            signal = normalize(node.args[0].value)
            if not classes and signal not in every_signal:
                findings.append(f"{where}: {signal} is a signal of none of the listed classes")
            for cls in classes:
                if signal not in members(cls, "signals"):
                    findings.append(f"{where}: {cls} has no signal {signal}")
        elif _dotted(node.func.value).startswith("self.ui."):
            for cls in classes & CUSTOM:
                known = names(members(cls, "slots", "invokables", "signals")) | members(cls, "properties")
                if method not in known | QWIDGET_METHODS:
                    findings.append(f"{where}: {cls} has no slot / Q_INVOKABLE {method}() that PythonQt exposes")
    return findings


@pytest.mark.parametrize("path", ALL_UI + ALL_GLUE, ids=rel)
def test_signals_slots_and_properties_exist(path):
    """.ui connections and CTK / Slicer properties; Python connect() strings and calls on CTK / Slicer widgets."""
    check(ui_api_findings(path) if path.suffix == ".ui" else python_api_findings(path))


# ---------------------------------------------------------------------------------------------- packaging

def packaged_files(folder: Path) -> set:
    """Files named by the folder's CMakeLists.txt (explicit paths and GLOB patterns), relative to the folder."""
    text = re.sub(r"#[^\n]*", "", (folder / "CMakeLists.txt").read_text(encoding="utf-8"))
    name = re.search(r"set\s*\(\s*MODULE_NAME\s+(\w+)\s*\)", text).group(1)
    text = text.replace("${MODULE_NAME}", name).replace("${CMAKE_CURRENT_SOURCE_DIR}/", "")
    found = set()
    for token in re.findall(r"[\w/.*-]+\.\w+", text):
        if "*" in token:
            found |= {str(p.relative_to(folder)) for p in folder.glob(token) if p.is_file()}
        elif (folder / token).is_file():
            found.add(token)
    return found


@pytest.mark.parametrize("name", sorted(MODULE_FOLDERS))
def test_every_resource_and_glue_file_is_packaged(name):
    folder = MODULE_FOLDERS[name]
    packaged = packaged_files(folder)
    wanted = {str(p.relative_to(folder)) for p in (folder / "Resources").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    wanted |= {str(p.relative_to(folder)) for p in glue_files(folder)}
    check([f"{name}/CMakeLists.txt does not package {name}/{m} (MODULE_PYTHON_SCRIPTS / RESOURCES)"
           for m in sorted(wanted - packaged)])


def referenced_resources() -> list:
    """(referring file, module folder, path inside it) for resource paths named in the glue and the README."""
    refs = []
    for path in ALL_GLUE:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"resourcePath\(\s*[\"']([^\"']+)[\"']", text):
            refs.append((rel(path), module_folder_of(path), "Resources/" + match.group(1)))
    for path in [REPO / "README.md"] + ALL_GLUE:
        for match in re.finditer(r"\b(MedFMSegment|MedFMTrain)/(Resources/[\w./-]*\w)", path.read_text(encoding="utf-8")):
            refs.append((rel(path), MODULE_FOLDERS[match.group(1)], match.group(2)))
    return refs


def test_referenced_resources_exist_and_are_packaged():
    refs = referenced_resources()
    assert any(r[2] == "Resources/UI/MedFMTrain.ui" for r in refs)
    findings = []
    for source, folder, path in refs:
        if not (folder / path).is_file():
            findings.append(f"{source} names {folder.name}/{path}, which does not exist")
        elif path not in packaged_files(folder):
            findings.append(f"{source} names {folder.name}/{path}, which {folder.name}/CMakeLists.txt does not package")
    check(sorted(set(findings)))


def _guarded(node, parents) -> bool:
    """True when the import sits in a ``try`` whose handlers catch ImportError (an optional module)."""
    parent = parents.get(id(node))
    while parent is not None:
        if isinstance(parent, ast.Try) and any(
                h.type is not None and {"ImportError", "ModuleNotFoundError"} & {_dotted(n) for n in ast.walk(h.type)}
                for h in parent.handlers):
            return True
        parent = parents.get(id(parent))
    return False


def declared_dependencies(folder: Path, name: str) -> list:
    tree = ast.parse((folder / f"{name}.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and _dotted(node.targets[0]).endswith("parent.dependencies"):
            return ast.literal_eval(node.value)
    return []


@pytest.mark.parametrize("name", sorted(MODULE_FOLDERS))
def test_imported_scripted_modules_are_declared_dependencies(name):
    folder = MODULE_FOLDERS[name]
    scripted = (set(MODULE_FOLDERS) | KNOWN_SCRIPTED_MODULES) - {name}
    imported = {}
    for path in glue_files(folder):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = {id(c): n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
        for node in ast.walk(tree):
            roots = [a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import) else \
                [node.module.split(".")[0]] if isinstance(node, ast.ImportFrom) and node.module and not node.level \
                else []
            for root in roots:
                if root in scripted and not _guarded(node, parents):
                    imported.setdefault(root, f"{rel(path)}:{node.lineno}")
    missing = {m: where for m, where in imported.items() if m not in declared_dependencies(folder, name)}
    assert not missing, f"{name}.py parent.dependencies lacks the scripted modules it imports: {missing}"


# ------------------------------------------------------------------------------------------------ i18n

USER_TEXT_CALLS = {"errorDisplay", "warningDisplay", "infoDisplay", "messageBox", "confirmOkCancelDisplay",
                   "confirmYesNoDisplay", "confirmRetryCloseDisplay", "tryWithErrorDisplay"}
USER_TEXT_ATTRIBUTES = {"title", "helpText", "acknowledgementText", "text", "toolTip", "placeholderText"}


def _plain_text(node) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str)
                                               and bool(node.value.strip()))


def i18n_findings(path: Path) -> list:
    findings = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and _dotted(node.func).split(".")[-1] in USER_TEXT_CALLS and node.args \
                and _plain_text(node.args[0]):
            findings.append(f"{rel(path)}:{node.lineno}: {_dotted(node.func)}() text without _()")
        if isinstance(node, ast.Assign) and _plain_text(node.value) and any(
                isinstance(t, ast.Attribute) and t.attr in USER_TEXT_ATTRIBUTES for t in node.targets):
            findings.append(f"{rel(path)}:{node.lineno}: {_dotted(node.targets[0])} = text without _()")
    return findings


@pytest.mark.parametrize("path", ALL_GLUE, ids=rel)
def test_user_visible_text_goes_through_translation(path):
    check(i18n_findings(path))


# -------------------------------------------------------------------------- dependency list for Slicer

PLATFORMS = {  # wheel tags, and the environment markers of that platform
    # Slicer's Linux build needs glibc 2.28: every manylinux tag up to 2_28 (pip does not expand them itself)
    "linux": ([f"manylinux_2_{minor}_x86_64" for minor in range(28, 16, -1)]
              + ["manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64", "linux_x86_64"],
              {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64"}),
    "windows": (["win_amd64"],
                {"sys_platform": "win32", "platform_system": "Windows", "os_name": "nt", "platform_machine": "AMD64"}),
    "macos-arm64": (["macosx_14_0_arm64", "macosx_13_0_arm64", "macosx_12_0_arm64", "macosx_11_0_arm64"],
                    {"sys_platform": "darwin", "platform_system": "Darwin", "os_name": "posix",
                     "platform_machine": "arm64"}),
}
SLICER_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.10", "implementation_version": "3.12.10"}
# pip's --platform / --python-version choose wheels but evaluate environment markers for THIS machine (a
# Linux-only "nvidia-* ; platform_system == 'Linux'" dependency of torch is then required on Windows too):
# run pip with the target's markers.
PIP_WITH_MARKERS = """
import json, runpy, sys
import pip._vendor.packaging.markers as markers
_environment, _target = markers.default_environment, json.loads(sys.argv[1])
markers.default_environment = lambda: {**_environment(), **_target}
sys.argv = ["pip"] + sys.argv[2:]
runpy.run_module("pip", run_name="__main__")
"""


def _pip_env() -> dict:
    """This machine's pip settings without its config files (a local constraints file must not decide)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_CONSTRAINT", "PIP_REQUIRE_VIRTUALENV")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def _index_reachable() -> str:
    """'' when the package index answers, else the reason."""
    probe = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", os.devnull,
                            "pip==0.0.0"], capture_output=True, text=True, timeout=60, env=_pip_env())
    text = probe.stdout + probe.stderr
    if "from versions:" in text:  # the index listed pip's versions: reachable
        return ""
    return "the package index cannot be reached: " + (text.strip().splitlines() or ["no answer"])[-1][:200]


@pytest.mark.slow  # network; .ci/run runs it on its own line
@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_dependencies_resolve_for_slicer_python(platform, tmp_path):
    """requirements.txt plus the torch the PyTorch extension installs resolve as wheels for Python 3.12."""
    reason = _index_reachable()
    if reason:
        pytest.skip(reason)
    from MedFMSlicerLib import dependencies

    requirements = ["torch" + dependencies.TORCH_REQUIREMENT, "torchvision" + dependencies.TORCHVISION_REQUIREMENT]
    requirements += dependencies.loadRequirements()
    tags, markers = PLATFORMS[platform]
    command = [sys.executable, "-c", PIP_WITH_MARKERS, json.dumps({**markers, **SLICER_PYTHON}), "install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
               "--abi", "none", "--report", str(tmp_path / "report.json"), "--quiet"]
    for tag in tags:
        command += ["--platform", tag]
    t0 = time.monotonic()
    result = subprocess.run(command + requirements, capture_output=True, text=True, timeout=900, env=_pip_env())
    seconds = time.monotonic() - t0
    assert result.returncode == 0, f"{platform}: the dependencies do not resolve for Python 3.12:\n" \
                                   f"{result.stderr[-3000:]}"
    installed = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                 for i in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert "torch" in installed and "segment-anything" in installed and "monai" in installed
    print(json.dumps({"platform": platform, "seconds": round(seconds, 1), "torch": installed["torch"],
                      "packages": len(installed)}))
