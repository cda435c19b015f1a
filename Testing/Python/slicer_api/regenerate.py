"""Regenerate the checked-in Slicer / CTK API lists from source checkouts (not run in CI).

    python Testing/Python/slicer_api/regenerate.py SLICER_GIT_DIR CTK_GIT_DIR

Both arguments are git directories (a clone's ``.git`` or a bare mirror); files are read at ``HEAD`` with
``git show``, and the commits are written into the lists. Writes, beside this file:

- ``classes.json``: signals, slots, Q_INVOKABLE methods and Q_PROPERTYs of the Slicer / CTK widget classes
  in ``CLASSES`` (from their headers), with each class' base class;
- ``gui_connectors.json``: which widget class ``slicer.parameterNodeWrapper`` binds to which parameter
  type, and which connectors reset a widget's range when the type has no ``WithinRange`` / ``Minimum``
  + ``Maximum``, need a bound, or need a ``Choice`` (from ``guiConnectors.py``, by reading its code).

The Qt classes' lists (``qt5.json``) are written by hand from the Qt 5.15 documentation (Slicer 5.10 builds
with Qt 5.15): Qt's own headers are not part of these checkouts.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# class -> (repository, header path)
CLASSES = {
    "qMRMLWidget": ("slicer", "Libs/MRML/Widgets/qMRMLWidget.h"),
    "qMRMLNodeComboBox": ("slicer", "Libs/MRML/Widgets/qMRMLNodeComboBox.h"),
    "qMRMLSegmentSelectorWidget": ("slicer", "Libs/MRML/Widgets/qMRMLSegmentSelectorWidget.h"),
    "qMRMLSliderWidget": ("slicer", "Libs/MRML/Widgets/qMRMLSliderWidget.h"),
    "qMRMLSpinBox": ("slicer", "Libs/MRML/Widgets/qMRMLSpinBox.h"),
    "qMRMLRangeWidget": ("slicer", "Libs/MRML/Widgets/qMRMLRangeWidget.h"),
    "qSlicerWidget": ("slicer", "Base/QTGUI/qSlicerWidget.h"),
    "qSlicerApplication": ("slicer", "Base/QTGUI/qSlicerApplication.h"),
    "qSlicerMarkupsPlaceWidget": ("slicer", "Modules/Loadable/Markups/Widgets/qSlicerMarkupsPlaceWidget.h"),
    "qMRMLSegmentEditorWidget": ("slicer", "Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.h"),
    "ctkCollapsibleButton": ("ctk", "Libs/Widgets/ctkCollapsibleButton.h"),
    "ctkDirectoryButton": ("ctk", "Libs/Widgets/ctkDirectoryButton.h"),
    "ctkPathLineEdit": ("ctk", "Libs/Widgets/ctkPathLineEdit.h"),
    "ctkCheckBox": ("ctk", "Libs/Widgets/ctkCheckBox.h"),
    "ctkComboBox": ("ctk", "Libs/Widgets/ctkComboBox.h"),
    "ctkSliderWidget": ("ctk", "Libs/Widgets/ctkSliderWidget.h"),
    "ctkRangeWidget": ("ctk", "Libs/Widgets/ctkRangeWidget.h"),
    "ctkDoubleSpinBox": ("ctk", "Libs/Widgets/ctkDoubleSpinBox.h"),
    "ctkCheckablePushButton": ("ctk", "Libs/Widgets/ctkCheckablePushButton.h"),
    "ctkPushButton": ("ctk", "Libs/Widgets/ctkPushButton.h"),
    "ctkMenuButton": ("ctk", "Libs/Widgets/ctkMenuButton.h"),
    "ctkColorPickerButton": ("ctk", "Libs/Widgets/ctkColorPickerButton.h"),
}
GUI_CONNECTORS = "Base/Python/slicer/parameterNodeWrapper/guiConnectors.py"


def git_show(git_dir: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, "show", f"HEAD:{path}"], check=True, capture_output=True,
                          text=True).stdout


def git_commit(git_dir: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, "log", "-1", "--format=%H %cs"], check=True,
                          capture_output=True, text=True).stdout.strip()


def normalize_signature(name: str, args: str) -> str:
    """Qt's normalized form: argument types only, no const / & / names / defaults."""
    types = []
    depth, current = 0, ""
    for ch in args + ",":
        if ch == "," and depth == 0:
            if current.strip():
                types.append(current.strip())
            current = ""
            continue
        depth += ch in "<(" and 1 or 0
        depth -= ch in ">)" and 1 or 0
        current += ch
    out = []
    for t in types:
        t = t.split("=")[0].strip()
        t = re.sub(r"\bconst\b", "", t).replace("&", " ").strip()
        t = re.sub(r"\s*\*\s*", "* ", t).strip()
        parts = t.split()
        if len(parts) > 1 and not parts[-1].endswith("*") and re.fullmatch(r"[A-Za-z_]\w*", parts[-1]):
            parts = parts[:-1]  # drop the argument name
        out.append(re.sub(r"\s+", "", "".join(p if p.endswith("*") else p + " " for p in parts).strip()
                          .replace(" *", "*")).replace("unsignedint", "unsigned int"))
    return f"{name}({','.join(out)})"


def parse_header(text: str, cls: str) -> dict:
    text = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)
    base = re.search(rf"class\s+(?:\w+\s+)?{cls}\s*:\s*public\s+(\w+)", text)
    body = text[text.index("{", base.end()) if base else 0:]
    result = {"inherits": base.group(1) if base else None, "signals": [], "slots": [], "invokables": [],
              "properties": sorted(set(re.findall(r"Q_PROPERTY\(\s*[\w:<>, *]+?\s+\*?(\w+)\s+READ", body)))}
    section = None
    for line in re.split(r"(?<=;)|(?<=:)\n|\n", body):
        stripped = line.strip()
        label = re.match(r"(public|protected|private)?\s*(slots|Q_SLOTS|signals|Q_SIGNALS)?\s*:$", stripped)
        if label and stripped not in (":",) and (label.group(1) or label.group(2)):
            kind = label.group(2) or ""
            section = "slots" if "SLOTS" in kind.upper() else "signals" if "SIGNALS" in kind.upper() else None
            continue
        method = re.search(r"(?:virtual\s+|Q_INVOKABLE\s+)*[\w:<>*&\s]+?\b(\w+)\s*\(([^()]*(?:\([^()]*\)[^()]*)*)\)"
                           r"\s*(?:const)?\s*(?:override)?\s*(?:=\s*0)?\s*;", stripped)
        if not method or method.group(1) in (cls, f"~{cls}"):
            continue
        signature = normalize_signature(method.group(1), method.group(2))
        if section:
            result[section].append(signature)
        if "Q_INVOKABLE" in stripped:
            result["invokables"].append(signature)
    for key in ("signals", "slots", "invokables"):
        result[key] = sorted(set(result[key]))
    return result


def _names(node) -> set:
    """Dotted names (qt.QSpinBox, int, pathlib.Path) used in an expression."""
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
            found.add(f"{n.value.id}.{n.attr}")
        elif isinstance(n, ast.Name):
            found.add(n.id)
    return found


def parse_gui_connectors(source: str) -> dict:
    """Per connector class: widget classes, parameter types, and the range / Choice rules of its code."""
    connectors = {}
    for cls in ast.parse(source).body:
        if not (isinstance(cls, ast.ClassDef) and any(getattr(d, "id", "") == "parameterNodeGuiConnector"
                                                      for d in cls.decorator_list)):
            continue
        methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
        names = set().union(*(_names(statement) for statement in methods["canRepresent"].body))  # not "-> bool"
        widgets = sorted(n.split(".")[1] for n in names if "." in n and n.split(".")[0] in ("qt", "ctk", "slicer")
                         and n.split(".")[1][:1] in "Qcq" and n.split(".")[1] not in ("QColor",))
        types = sorted(n for n in names if n in ("int", "float", "str", "bool", "FloatRange", "qt.QColor")
                       or n.startswith("pathlib."))
        if "enum.Enum" in names:
            types.append("enum")
        if "isNodeOrUnionOfNodes" in names:
            types.append("vtkMRMLNode")
        if "isParameterPack" in {getattr(n, "attr", "") for n in ast.walk(methods["canRepresent"])}:
            types.append("parameterPack")
        init = ast.unparse(methods.get("__init__", ast.Pass())) + ast.unparse(methods.get("create", ast.Pass()))
        bounded = []
        for node in ast.walk(methods.get("__init__", ast.Pass())):
            if isinstance(node, ast.If) and "isBounded" in ast.unparse(node.test):
                bounded += [n.split(".")[1] for n in _names(node.test)
                            if "." in n and n.split(".")[0] in ("qt", "ctk", "slicer")]
        connectors[cls.name] = {
            "widgets": widgets, "types": sorted(set(types)),
            "range_from_annotations": "WithinRange" in init,
            "resets_range_when_unbounded": "2 ** 31" in init or "'-inf'" in init or '"-inf"' in init,
            "needs_bound": sorted(set(bounded)),
            "needs_choice": "Choice" in init and "raise" in init,
            "needs_range_bounds": "RangeBounds" in init and "raise" in init,
        }
    return connectors


def main(argv) -> int:
    slicer_git, ctk_git = argv[1], argv[2]
    roots = {"slicer": slicer_git, "ctk": ctk_git}
    source = {"slicer": "Slicer/Slicer " + git_commit(slicer_git), "ctk": "commontk/CTK " + git_commit(ctk_git)}
    classes = {name: parse_header(git_show(roots[repo], path), name) for name, (repo, path) in CLASSES.items()}
    (HERE / "classes.json").write_text(json.dumps({"source": source, "classes": classes}, indent=1,
                                                  sort_keys=True) + "\n", encoding="utf-8")
    connectors = parse_gui_connectors(git_show(slicer_git, GUI_CONNECTORS))
    (HERE / "gui_connectors.json").write_text(json.dumps({"source": source["slicer"] + " " + GUI_CONNECTORS,
                                                          "connectors": connectors}, indent=1, sort_keys=True) + "\n",
                                              encoding="utf-8")
    print(f"{len(classes)} classes, {len(connectors)} connectors written to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
