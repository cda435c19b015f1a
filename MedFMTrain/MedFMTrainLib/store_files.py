"""The files of an adapter folder, without torch: names, the manifest, recovery of an interrupted save,
and the checks a command runs on ``--adapter`` / ``--adapter-dir`` before torch or the model loads
(:func:`check_adapter_files`). :mod:`store` re-exports every name here and adds the tensors.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Tuple, Union

from MedFMSegmentLib.checksums import file_sha256
from MedFMSegmentLib.errors import InputError

log = logging.getLogger("MedFMTrainLib.store")  # recovery messages keep the store's logger name

ADAPTER_FILE = "adapter.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "medfm-adapter"
FORMAT_VERSION = 1
PathLike = Union[str, os.PathLike]


def safe_name(organ: str) -> str:
    """A folder name for an organ: letters, digits, ``._-``; anything else becomes ``_``."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", organ.strip()).strip("._")
    if not name:
        raise InputError(f"organ name {organ!r} gives an empty folder name")
    return name


def check_organ(organ: str) -> str:
    if not isinstance(organ, str) or not organ.strip():
        raise InputError(f"organ name {organ!r} is empty")
    return organ.strip()


def is_adapter_dir(path: PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / MANIFEST_FILE).is_file() or (p / ADAPTER_FILE).is_file())


def check_output_dir(path: PathLike, overwrite: bool) -> Path:
    """Raise InputError unless ``path`` can receive an adapter (parent exists; no clobbering)."""
    p = Path(path)
    if not p.parent.is_dir():
        raise InputError(f"{p}: the parent folder {p.parent} does not exist")
    if p.exists():
        if not p.is_dir():
            raise InputError(f"{p}: exists and is not a folder")
        if not is_adapter_dir(p) and any(p.iterdir()):
            raise InputError(f"{p}: exists and is not an adapter folder (no {MANIFEST_FILE}); refusing to replace it")
        if is_adapter_dir(p) and not overwrite:
            raise InputError(f"{p}: an adapter already exists there; pass overwrite=True (--overwrite) to replace it")
    return p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _leftovers(target: Path, kind: str) -> List[Tuple[Path, int]]:
    """``(.<name>.<kind>-<pid>-<random> folder, pid)`` next to ``target``, newest first."""
    out = []
    for p in target.parent.glob(f".{glob.escape(target.name)}.{kind}-*"):
        m = re.fullmatch(rf"\.{re.escape(target.name)}\.{kind}-(\d+)-[0-9a-f]+", p.name)
        try:
            if m and p.is_dir():
                out.append((p, int(m.group(1)), p.stat().st_mtime))
        except OSError:  # removed meanwhile
            continue
    return [(p, pid) for p, pid, _ in sorted(out, key=lambda item: item[2], reverse=True)]


def recover(path: PathLike) -> Path:
    """The folder to load for adapter ``path``, repairing a save that was killed between its renames.

    When ``path`` is missing but a previous adapter was moved aside (``.<name>.old-<pid>-...``) by a
    process that is gone, it is renamed back and ``path`` returned; when that process is still
    running (inside its rename window), the moved-aside folder itself is returned, read-only. With
    ``path`` present, moved-aside and temporary folders of dead processes are removed.
    """
    target = Path(path)
    if not target.parent.is_dir():
        return target
    if not target.exists():
        for old, pid in _leftovers(target, "old"):
            if not is_adapter_dir(old):
                continue
            if _pid_alive(pid) and pid != os.getpid():
                return old
            try:
                os.rename(old, target)
                log.warning("recovered adapter %s from %s (a save was interrupted)", target, old.name)
            except OSError:
                return old if old.exists() else target  # someone else recovered it first
            break
    if target.exists():
        for kind in ("old", "tmp"):
            for left, pid in _leftovers(target, kind):
                if not _pid_alive(pid):
                    shutil.rmtree(left, ignore_errors=True)
    return target


def read_manifest(path: PathLike) -> Dict:
    """The manifest of adapter folder ``path`` (validated); InputError naming the file when it is bad."""
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"{folder}: adapter folder not found")
    file = folder / MANIFEST_FILE
    if not file.is_file():
        raise InputError(f"{file}: missing; {folder} is not an adapter folder")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{file}: corrupt manifest (not valid JSON: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{file}: not a MedFM adapter manifest (format is "
                         f"{manifest.get('format') if isinstance(manifest, dict) else type(manifest).__name__!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(f"{file}: adapter format version {version!r} is not supported (this MedFM reads up to "
                         f"{FORMAT_VERSION})")
    for key in ("organ", "base_model", "lora", "files"):
        if key not in manifest:
            raise InputError(f"{file}: corrupt manifest, key {key!r} is missing")
    base = manifest["base_model"]
    if not isinstance(base, dict) or not isinstance(base.get("sha256"), str) or not isinstance(base.get("id"), str):
        raise InputError(f"{file}: corrupt manifest, base_model must hold id and sha256")
    return manifest


def check_adapter_files(path) -> Path:
    """Everything about adapter folder ``path`` that needs no torch: the folder (an interrupted save
    recovered), its manifest, the weights file against the manifest's sha256 and every float tensor
    finite (read with numpy). Raises InputError naming the file, as :func:`store.load_adapter` would;
    returns the folder. Tensors of a dtype numpy cannot hold are left to the loader."""
    folder = recover(path)
    manifest = read_manifest(folder)
    file = verified_weights_file(folder, manifest)
    _check_finite_numpy(file)
    return folder


def _check_finite_numpy(file: Path) -> None:
    import numpy as np

    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - a dependency of the trainer
        return
    try:
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():
                try:
                    t = f.get_tensor(key)
                except (TypeError, ValueError):  # e.g. bf16: numpy has no such dtype; the loader checks it
                    continue
                if t.dtype.kind == "f" and not np.isfinite(t).all():
                    raise InputError(f"{file}: tensor {key!r} holds {int((~np.isfinite(t)).sum())} NaN or infinite "
                                     f"values of {t.size}; refused (a diverged training or a damaged file)")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable: the loader reports it with torch's words
        log.debug("numpy pre-check of %s skipped: %s", file, exc)


def verified_weights_file(folder: Path, manifest: Dict) -> Path:
    """The adapter's weights file in ``folder``, present and matching the manifest's sha256 (InputError
    naming the file otherwise)."""
    file = folder / ADAPTER_FILE
    if not file.is_file():
        raise InputError(f"{file}: missing (the adapter folder is incomplete)")
    files = manifest["files"] if isinstance(manifest["files"], dict) else {}
    expected = (files.get(ADAPTER_FILE) or {}).get("sha256")
    actual = file_sha256(file)
    if expected != actual:
        raise InputError(f"{file}: corrupt or truncated adapter weights: sha256 {actual}, the manifest records "
                         f"{expected}")
    return file
