"""MedFM's Python dependencies, installed the Slicer way.

- Slicer 5.10 or later is required (it ships Python 3.12; Slicer 5.4-5.8 ship Python 3.9, for which the
  tested torch 2.14 does not exist). ``requireSupportedSlicer()`` is called when the module file loads,
  before the engine is imported, so an older Slicer shows one clear message instead of a traceback.
- torch / torchvision come from the PyTorch extension (``PyTorchUtils.PyTorchUtilsLogic().installTorch``,
  which picks the build for the GPU driver; the extension is in ``EXTENSION_DEPENDS``), as SegmentWithSAM
  does; plain pip only when that extension is missing. A torch that is already installed is never
  replaced or upgraded: it is pinned in a constraints file while the other packages install.
- The other packages are listed in ``Resources/requirements.txt`` and installed with
  ``slicer.packaging.pip_ensure`` (Slicer 5.12 and later), else ``slicer.util.pip_install``.
- Nothing is installed in testing mode (``--testing``); the self-tests skip with ``skipReason()``.

This file must stay parseable by old Pythons (3.9), since it is what tells their users to upgrade.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("MedFM")

MINIMUM_SLICER = (5, 10)
MINIMUM_PYTHON = (3, 12)
# The versions the test suite runs (pyproject.toml / the CI venv); a torch already installed is kept as it is.
TORCH_REQUIREMENT, TORCHVISION_REQUIREMENT = ">=2.14", ">=0.29"
REQUESTER = "MedFM"


def _(text):
    """Slicer's translation (context ``MedFMSlicerLib.dependencies``); the text itself outside Slicer."""
    try:
        from slicer.i18n import translate
    except ImportError:
        return text
    return translate("MedFMSlicerLib.dependencies", text)


def requirementsFile() -> Path:
    return Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"


def loadRequirements(path=None) -> list:
    """Requirement strings of a requirements file (comments, blank lines and pip options skipped)."""
    lines = Path(path or requirementsFile()).read_text(encoding="utf-8").splitlines()
    return [line.split("#")[0].strip() for line in lines
            if line.split("#")[0].strip() and not line.strip().startswith("-")]


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group(0)


def installedVersion(distribution: str):
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _satisfied(requirement: str) -> bool:
    version = installedVersion(_name(requirement))
    if version is None:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:  # no packaging module: presence is all that can be checked
        return True
    return Requirement(requirement).specifier.contains(version, prereleases=True)


def missingRequirements(requirements=None, withTorch=True) -> list:
    """The requirements not satisfied in this Python (torch and torchvision first, with ``withTorch``)."""
    requirements = list(loadRequirements() if requirements is None else requirements)
    if withTorch:
        requirements = ["torch", "torchvision"] + requirements  # any version: an installed torch is kept
    return [r for r in requirements if not _satisfied(r)]


def unsupportedReason(slicerVersion=None, pythonVersion=None):
    """Why this Slicer cannot run MedFM, or None. Versions are (major, minor) tuples; None: not checked."""
    found = []
    if slicerVersion is not None and tuple(slicerVersion)[:2] < MINIMUM_SLICER:
        found.append("Slicer {}.{}".format(*tuple(slicerVersion)[:2]))
    if pythonVersion is not None and tuple(pythonVersion)[:2] < MINIMUM_PYTHON:
        found.append("Python {}.{}".format(*tuple(pythonVersion)[:2]))
    if not found:
        return None
    return _("MedFM needs 3D Slicer {slicer} or later (Python {python}); this is {found}. Slicer 5.4 to 5.8 ship "
             "Python 3.9, for which MedFM's PyTorch version does not exist: please install a current Slicer "
             "release.").format(slicer="%d.%d" % MINIMUM_SLICER, python="%d.%d" % MINIMUM_PYTHON,
                                found=" with ".join(found))


def _app():
    try:
        import slicer
    except ImportError:
        return None
    return getattr(slicer, "app", None)


def requireSupportedSlicer() -> None:
    """Raise RuntimeError (the module then does not load, with this message) on a Slicer older than 5.10.

    Outside the Slicer application (slicer-core in tests, the CLI) nothing is checked: the engine's own
    floor is pyproject's ``requires-python``.
    """
    app = _app()
    if app is None or not hasattr(app, "majorVersion"):
        return
    reason = unsupportedReason((app.majorVersion, app.minorVersion), sys.version_info[:2])
    if reason:
        raise RuntimeError(reason)


def testingMode() -> bool:
    app = _app()
    return bool(app is not None and hasattr(app, "testingEnabled") and app.testingEnabled())


def skipReason():
    """The message a self-test shows when it skips because engine packages are missing, or None."""
    missing = missingRequirements()
    if not missing:
        return None
    return _("MedFM self-test skipped: these Python packages are not installed in this Slicer: {missing} (testing "
             "mode installs nothing; open MedFM Segment once to install them)").format(missing=", ".join(missing))


def ensureTorch(ask=True) -> bool:
    """torch and torchvision importable; installed from the PyTorch extension if missing. Never upgrades."""
    if installedVersion("torch") is not None and installedVersion("torchvision") is not None:
        if not _satisfied("torch" + TORCH_REQUIREMENT):
            log.warning("torch %s is older than the tested %s: MedFM keeps it (install a newer one with the "
                        "PyTorch Utils module if MedFM fails)", installedVersion("torch"), TORCH_REQUIREMENT)
        return True
    try:
        import PyTorchUtils  # the PyTorch extension (EXTENSION_DEPENDS); optional, hence no parent.dependencies
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=ask, torchVersionRequirement=TORCH_REQUIREMENT,
            torchvisionVersionRequirement=TORCHVISION_REQUIREMENT)
        return torch is not None
    import slicer
    if ask and not slicer.util.confirmOkCancelDisplay(
            _("MedFM needs PyTorch. The PyTorch extension is not installed, so the default PyTorch build is "
              "installed with pip (for a GPU build, install the PyTorch extension first). Continue?")):
        return False
    slicer.util.pip_install(["torch" + TORCH_REQUIREMENT, "torchvision" + TORCHVISION_REQUIREMENT])
    return installedVersion("torch") is not None


def _constraintsFile() -> str:
    """A pip constraints file pinning the installed torch / torchvision, so no other package upgrades them."""
    pins = ["%s==%s" % (name, installedVersion(name)) for name in ("torch", "torchvision")
            if installedVersion(name) is not None]
    handle, path = tempfile.mkstemp(prefix="medfm-constraints-", suffix=".txt")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write("\n".join(pins) + "\n")
    return path


def ensureDependencies(ask=True) -> bool:
    """Install what is missing (asks first); True when every engine package is there. Testing mode: no install."""
    if not missingRequirements():
        return True
    if testingMode():
        log.info("testing mode: MedFM installs nothing (missing: %s)", ", ".join(missingRequirements()))
        return False
    import slicer
    if not ensureTorch(ask):
        return False
    requirements = missingRequirements(withTorch=False)
    if not requirements:
        return True
    constraints = _constraintsFile()
    try:
        packaging = getattr(slicer, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer 5.12 and later
            try:
                packaging.pip_ensure(requirements, constraints=constraints, prompt_install=ask, requester=REQUESTER)
            except RuntimeError as exc:  # declined by the user
                log.info("MedFM packages not installed: %s", exc)
                return False
        else:  # Slicer 5.10
            if ask and not slicer.util.confirmOkCancelDisplay(
                    _("MedFM needs these Python packages, which are not installed in Slicer yet:\n{packages}\n\n"
                      "Install them now? (a few minutes; needs internet)").format(packages="\n".join(requirements))):
                return False
            slicer.util.pip_install(["-c", constraints] + requirements)
    finally:
        os.remove(constraints)
    return not missingRequirements()
