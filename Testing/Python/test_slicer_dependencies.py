"""MedFMSlicerLib.dependencies: Slicer version floor, torch from the PyTorch extension, the rest by pip_ensure.

The Slicer application is faked only where the module asks it something (``slicer.app`` versions and
testing mode, ``slicer.util`` dialogs and pip, ``slicer.packaging``, ``PyTorchUtils``); every decision
runs the real code.
"""
from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import pytest

from MedFMSlicerLib import dependencies  # conftest puts MedFMSegment/ on sys.path

REPO = Path(__file__).resolve().parents[2]

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None


class FakeApp:
    def __init__(self, major=5, minor=10, testing=False):
        self.majorVersion, self.minorVersion, self._testing = major, minor, testing

    def testingEnabled(self):
        return self._testing


@pytest.fixture
def fake_slicer(monkeypatch):
    """A stand-in ``slicer`` module recording dialogs and installs; returns (module, calls)."""
    calls = []
    util = types.SimpleNamespace(
        confirmOkCancelDisplay=lambda text, *a, **k: calls.append(("confirm", text)) or True,
        pip_install=lambda requirements: calls.append(("pip_install", list(requirements))))
    module = types.ModuleType("slicer")
    module.util, module.app = util, FakeApp()
    monkeypatch.setitem(sys.modules, "slicer", module)
    monkeypatch.delitem(sys.modules, "slicer.i18n", raising=False)
    return module, calls


def test_minimum_slicer_and_python():
    message = dependencies.unsupportedReason((5, 8), (3, 9))
    assert "Slicer 5.10 or later" in message and "Slicer 5.8 with Python 3.9" in message
    assert dependencies.unsupportedReason((5, 10), (3, 12)) is None
    assert dependencies.unsupportedReason((5, 12), (3, 12)) is None
    assert dependencies.unsupportedReason((6, 0), (3, 13)) is None
    assert "Python 3.11" in dependencies.unsupportedReason((5, 10), (3, 11))


def test_old_slicer_refuses_to_load_with_the_message(fake_slicer, monkeypatch):
    slicer, _ = fake_slicer
    slicer.app = FakeApp(5, 8)
    with pytest.raises(RuntimeError, match="needs 3D Slicer 5.10 or later"):
        dependencies.requireSupportedSlicer()
    slicer.app = FakeApp(5, 10)
    monkeypatch.setattr(dependencies.sys, "version_info", (3, 12, 10))
    dependencies.requireSupportedSlicer()
    del slicer.app  # slicer-core / PythonSlicer without the application: not checked
    dependencies.requireSupportedSlicer()


def test_the_version_check_itself_parses_on_python_3_9():
    """The file that tells a Slicer 5.8 user to upgrade must load there (Python 3.9 grammar)."""
    path = REPO / "MedFMSegment" / "MedFMSlicerLib" / "dependencies.py"
    ast.parse(path.read_text(encoding="utf-8"), feature_version=(3, 9))


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_requirements_file_is_pyproject_without_torch():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    expected = [r for r in project["dependencies"] if dependencies._name(r).lower() not in ("torch", "torchvision")]
    assert dependencies.loadRequirements() == expected


def test_testing_mode_installs_nothing(fake_slicer, monkeypatch):
    slicer, calls = fake_slicer
    slicer.app = FakeApp(testing=True)
    monkeypatch.setattr(dependencies, "loadRequirements", lambda path=None: ["medfm-no-such-package>=1"])
    assert dependencies.ensureDependencies(ask=True) is False
    assert calls == []
    reason = dependencies.skipReason()
    assert "self-test skipped" in reason and "medfm-no-such-package>=1" in reason


def test_an_installed_torch_is_kept(fake_slicer, monkeypatch):
    _, calls = fake_slicer
    installs = []
    fake = types.ModuleType("PyTorchUtils")
    fake.PyTorchUtilsLogic = lambda: types.SimpleNamespace(installTorch=lambda **k: installs.append(k))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", fake)
    monkeypatch.setattr(dependencies, "installedVersion", lambda name: {"torch": "2.0.1", "torchvision": "0.15.2"}.get(name))
    assert dependencies.ensureTorch(ask=True) is True  # older than tested: kept, with a warning
    assert installs == [] and calls == []


def test_torch_comes_from_the_pytorch_extension(fake_slicer, monkeypatch):
    _, calls = fake_slicer
    installs = []
    fake = types.ModuleType("PyTorchUtils")
    fake.PyTorchUtilsLogic = lambda: types.SimpleNamespace(installTorch=lambda **k: installs.append(k) or "torch")
    monkeypatch.setitem(sys.modules, "PyTorchUtils", fake)
    monkeypatch.setattr(dependencies, "installedVersion", lambda name: None)
    assert dependencies.ensureTorch(ask=True) is True
    assert installs == [{"askConfirmation": True, "torchVersionRequirement": dependencies.TORCH_REQUIREMENT,
                         "torchvisionVersionRequirement": dependencies.TORCHVISION_REQUIREMENT}]
    assert calls == [], "no pip install when the PyTorch extension is there"


def _missing_one(monkeypatch):
    """torch installed (pinned by the constraints), one other requirement missing."""
    versions = {"torch": "2.14.1", "torchvision": "0.29.1"}
    monkeypatch.setattr(dependencies, "installedVersion", lambda name: versions.get(name))
    monkeypatch.setattr(dependencies, "loadRequirements", lambda path=None: ["timm"])
    return versions


def test_other_packages_by_pip_ensure_with_torch_pinned(fake_slicer, monkeypatch):
    slicer, calls = fake_slicer
    versions = _missing_one(monkeypatch)
    seen = {}

    def pip_ensure(requirements, constraints=None, prompt_install=True, requester=None):
        seen.update(requirements=requirements, pins=Path(constraints).read_text().split(), prompt=prompt_install,
                    requester=requester)
        versions["timm"] = "1.0"

    slicer.packaging = types.SimpleNamespace(pip_ensure=pip_ensure)
    assert dependencies.ensureDependencies(ask=True) is True
    assert seen == {"requirements": ["timm"], "pins": ["torch==2.14.1", "torchvision==0.29.1"], "prompt": True,
                    "requester": "MedFM"}
    assert calls == [], "pip_ensure asks and installs itself"


def test_other_packages_by_pip_install_on_slicer_5_10(fake_slicer, monkeypatch):
    _, calls = fake_slicer  # no slicer.packaging: Slicer 5.10
    _missing_one(monkeypatch)
    assert dependencies.ensureDependencies(ask=True) is False  # the fake pip installs nothing
    assert [c[0] for c in calls] == ["confirm", "pip_install"]
    args = calls[1][1]
    assert args[0] == "-c" and args[2:] == ["timm"]
    assert not Path(args[1]).exists(), "the constraints file is removed"


def test_declined_install_changes_nothing(fake_slicer, monkeypatch):
    slicer, calls = fake_slicer
    _missing_one(monkeypatch)
    slicer.util.confirmOkCancelDisplay = lambda *a, **k: False
    assert dependencies.ensureDependencies(ask=True) is False
    assert calls == []

    def declined(*a, **k):
        raise RuntimeError("User declined package installation")

    slicer.packaging = types.SimpleNamespace(pip_ensure=declined)
    assert dependencies.ensureDependencies(ask=True) is False
