"""Adapter store: one folder per organ adapter, ``adapter.safetensors`` + ``manifest.json``.

    adapters/
      Caudate_L/
        adapter.safetensors   decoder.<module>.lora_{A,B}.weight, localizer.<param> (safetensors)
        manifest.json         organ, base model id + sha256, method + config, training data,
                              metrics, created time, sha256 of adapter.safetensors

No pickle anywhere: tensors in safetensors, everything else JSON. Writes are atomic: the folder is
written under a temporary name next to the target (``.<name>.tmp-<pid>-<random>``), fsynced, then
renamed into place; a previous adapter is moved aside (``.<name>.old-<pid>-<random>``) only at that
last step and deleted after, so an interrupted or failed save leaves it intact. A process killed
between the two renames leaves no folder at the target, only the ``.old-`` one: :func:`load_adapter`
(and the next save) recover it, so at every instant either the old or the new adapter loads.
Loading verifies the file's sha256 (a truncated or altered file is refused), that every tensor is
finite (NaN / Inf weights are refused) and the base model's sha256; saving refuses non-finite
tensors or metrics (a diverged training is never stored).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import torch

from MedFMSegmentLib.errors import InputError
from MedFMSegmentLib.io import fault_point
from MedFMSegmentLib.models import file_sha256

from .adapters import LoraSettings, OrganAdapter
from .localizer import LocalizerState
from .store_files import (  # noqa: F401  (the folder's files without torch; public here)
    ADAPTER_FILE, FORMAT, FORMAT_VERSION, MANIFEST_FILE, PathLike, _leftovers, _pid_alive, check_adapter_files,
    check_output_dir, is_adapter_dir, read_manifest, recover, safe_name, verified_weights_file)

log = logging.getLogger(__name__)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tensors(adapter: OrganAdapter) -> Dict[str, torch.Tensor]:
    out = {f"decoder.{k}": v.detach().cpu().contiguous() for k, v in adapter.tensors.items()}
    if adapter.localizer is not None:
        out.update({f"localizer.{k}": v.detach().cpu().contiguous() for k, v in adapter.localizer.tensors.items()})
    return out


def _write_files(adapter: OrganAdapter, folder: Path) -> None:
    from safetensors.torch import save_file

    weights = folder / ADAPTER_FILE
    save_file(_tensors(adapter), str(weights), metadata={"format": FORMAT, "organ": adapter.organ,
                                                        "base_sha256": adapter.base_sha256})
    _fsync(weights)
    manifest = dict(adapter.manifest)
    manifest.update({"format": FORMAT, "format_version": FORMAT_VERSION, "organ": adapter.organ,
                     "files": {ADAPTER_FILE: {"sha256": file_sha256(weights), "bytes": weights.stat().st_size}}})
    if adapter.localizer is not None:
        manifest["localizer"] = dict(adapter.localizer.config(), metrics=adapter.localizer.metrics)
    try:
        text = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False, default=_json_default)
    except ValueError as exc:  # NaN / Inf in the metrics: training diverged
        raise InputError(f"adapter {adapter.organ!r}: its manifest holds NaN or infinite numbers ({exc}); "
                         f"not saved (did the training diverge? lower --lr)") from None
    (folder / MANIFEST_FILE).write_text(text + "\n", encoding="utf-8")
    _fsync(folder / MANIFEST_FILE)
    _fsync(folder)


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in the manifest")


def _check_finite(tensors: Dict[str, torch.Tensor], where: str) -> None:
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise InputError(f"{where}: tensor {key!r} holds {bad} NaN or infinite values of {t.numel()}; "
                             f"refused (a diverged training or a damaged file)")


def save_adapter(adapter: OrganAdapter, path: PathLike, overwrite: bool = False) -> Path:
    """Write ``adapter`` to folder ``path`` atomically; returns the folder. See the module docstring."""
    recover(path)
    target = check_output_dir(path, overwrite)
    _check_finite(_tensors(adapter), f"adapter {adapter.organ!r} (not saved to {target})")
    parent, token = target.parent, f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = parent / f".{target.name}.tmp-{token}"
    old = parent / f".{target.name}.old-{token}"
    tmp.mkdir()
    moved_aside = False
    try:
        _write_files(adapter, tmp)
        fault_point("adapter-written")
        if target.exists():
            os.rename(target, old)
            moved_aside = True
            fault_point("adapter-moved-aside")
        os.rename(tmp, target)
        fault_point("adapter-renamed")
        _fsync(parent)
    except BaseException:
        if moved_aside and not target.exists():
            os.rename(old, target)
            moved_aside = False
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if moved_aside and old.exists() and is_adapter_dir(target):  # never the only copy left
            shutil.rmtree(old, ignore_errors=True)
    adapter.path = target
    log.info("saved adapter %s to %s", adapter.organ, target)
    return target


def _read_tensors(folder: Path, manifest: Dict) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = verified_weights_file(folder, manifest)
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{file}: corrupt adapter weights: {exc}") from None
    _check_finite(tensors, str(file))
    return tensors


def load_adapter(path: PathLike, model=None) -> OrganAdapter:
    """Load an adapter folder. With ``model``, checks it is the base model (sha256) and attaches it.

    Raises InputError naming the file for a missing / corrupt manifest or weights, and naming both
    sha256s when the adapter was trained on another base model.
    """
    folder = recover(path)
    manifest = read_manifest(folder)
    base = manifest["base_model"]
    if model is not None and model.checkpoint_sha256 != base["sha256"]:
        raise InputError(f"adapter {manifest['organ']!r} ({folder}) was trained on base model {base['id']!r} with "
                         f"sha256 {base['sha256']}, but the loaded model {model.spec.id!r} has sha256 "
                         f"{model.checkpoint_sha256}; retrain the adapter for this model")
    tensors = _read_tensors(folder, manifest)
    decoder = {k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")}
    loc = {k[len("localizer."):]: v for k, v in tensors.items() if k.startswith("localizer.")}
    if not decoder:
        raise InputError(f"{folder / ADAPTER_FILE}: holds no decoder weights")
    settings = LoraSettings.from_dict(manifest["lora"])
    localizer = None
    if loc:
        cfg = manifest.get("localizer") or {}
        try:
            localizer = LocalizerState(loc, int(cfg["in_channels"]), int(cfg["hidden"]), str(cfg["axis"]),
                                       str(cfg["preset"]), float(cfg.get("threshold", 0.5)),
                                       dict(cfg.get("metrics") or {}), float(cfg.get("extent_threshold", 0.25)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{folder / MANIFEST_FILE}: corrupt localizer settings ({exc})") from None
    adapter = OrganAdapter(str(manifest["organ"]), base["id"], base["sha256"], settings, decoder, localizer,
                           manifest, folder)
    if model is not None:
        adapter.attach(model)  # validates every tensor against the model's decoder now
    return adapter


def load_detector(path: PathLike, model, **kwargs):
    """The localizer of an adapter folder as a ``Detector`` (see ``localizer.OrganLocalizer``)."""
    return load_adapter(path, model).detector(model, **kwargs)


def list_adapters(root: PathLike) -> List[Dict]:
    """Adapters under ``root``: ``[{"path", "organ", "base_model", "created", "metrics", "error"}]``.

    A folder whose manifest cannot be read is listed with ``error`` set (not skipped silently).
    """
    base = Path(root)
    if not base.is_dir():
        raise InputError(f"{base}: adapter folder not found")
    out = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not is_adapter_dir(folder):
            continue
        try:
            m = read_manifest(folder)
            out.append({"path": str(folder), "organ": m["organ"], "base_model": m["base_model"],
                        "created": m.get("created"), "metrics": m.get("metrics"), "error": None})
        except InputError as exc:
            out.append({"path": str(folder), "organ": None, "base_model": None, "created": None, "metrics": None,
                        "error": str(exc)})
    return out


def find_adapter(root: PathLike, organ: str) -> Optional[Path]:
    """The adapter folder for ``organ`` under ``root`` (by folder name, then by manifest organ), or None."""
    base = Path(root)
    direct = base / safe_name(organ)
    if is_adapter_dir(direct):
        return direct
    for entry in list_adapters(base):
        if entry["organ"] == organ:
            return Path(entry["path"])
    return None


def delete_adapter(path: PathLike) -> None:
    """Delete an adapter folder (refuses folders that are not adapters). The folder vanishes at once."""
    folder = Path(path)
    if not is_adapter_dir(folder):
        raise InputError(f"{folder}: not an adapter folder (no {MANIFEST_FILE} or {ADAPTER_FILE}); not deleted")
    trash = folder.parent / f".{folder.name}.del-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)
    log.info("deleted adapter %s", folder)
