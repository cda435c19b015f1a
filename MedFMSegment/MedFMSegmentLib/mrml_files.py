"""MRML layer, files: volumes and segmentations read into a scene and written atomically."""
from __future__ import annotations

import logging
import os
import tempfile

import slicer

from .errors import InputError
from .mrml_labelmaps import ensure_segmentation_converters
from .mrml_volumes import _describe

logger = logging.getLogger(__name__)


def _file_name_for(path) -> str:
    name = os.path.basename(os.fspath(path))
    for suffix in (".seg.nrrd", ".seg.nhdr", ".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def _storage_messages(storage_node) -> str:
    messages = storage_node.GetUserMessages() if hasattr(storage_node, "GetUserMessages") else None
    text = messages.GetAllMessagesAsString() if messages is not None else ""
    return f": {text.strip()}" if text and text.strip() else ""


def _read_into(scene, path, data_node, storage_node, kind: str):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{kind} file not found: {path}")
    data_node.SetName(_file_name_for(path))
    scene.AddNode(storage_node)
    scene.AddNode(data_node)
    storage_node.SetFileName(path)
    ok = storage_node.ReadData(data_node)
    if not ok:
        details = _storage_messages(storage_node)
        scene.RemoveNode(data_node)
        scene.RemoveNode(storage_node)
        raise InputError(f"cannot read {kind} file {path}{details}")
    data_node.SetAndObserveStorageNodeID(storage_node.GetID())
    return data_node


def load_volume(scene, path):
    """Read a scalar volume file (.nrrd, .nii.gz, .nii, .mha, ...) into a new vtkMRMLScalarVolumeNode of ``scene``.

    Works without the Slicer GUI (``slicer.mrmlScene`` in the app, any ``vtkMRMLScene`` headless).
    Raises InputError naming the file if it is missing or unreadable (no node is left in the scene).
    """
    node = _read_into(
        scene, path, slicer.vtkMRMLScalarVolumeNode(), slicer.vtkMRMLVolumeArchetypeStorageNode(), "volume"
    )
    try:
        node.CreateDefaultDisplayNodes()
    except Exception:  # display nodes are a convenience for the GUI only
        logger.debug("no display node for %s", path)
    return node


def load_segmentation(scene, path):
    """Read a segmentation file (.seg.nrrd, .nrrd, .nii.gz labelmap, ...) into a new vtkMRMLSegmentationNode.

    Raises InputError naming the file if it is missing or unreadable (no node is left in the scene).
    """
    ensure_segmentation_converters()
    return _read_into(
        scene, path, slicer.vtkMRMLSegmentationNode(), slicer.vtkMRMLSegmentationStorageNode(), "segmentation"
    )


def save_node(node, path) -> None:
    """Write a volume or segmentation node to ``path``; the format follows the extension.

    Volumes: .nrrd, .nii.gz, .nii, .mha...; segmentations: .seg.nrrd (or .nrrd). The file is written to a
    temporary name in the same folder and renamed when complete, so a failure never leaves a partial
    or overwritten file. The node's own storage node (its file name in Slicer) is not changed.
    """
    if node is None or not hasattr(node, "CreateDefaultStorageNode"):
        raise InputError(f"cannot save {_describe(node)}: not a storable node")
    if node.IsA("vtkMRMLSegmentationNode"):
        ensure_segmentation_converters()
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise InputError(f"cannot save {path}: folder {folder} does not exist")
    storage = node.CreateDefaultStorageNode()
    if storage is None:
        raise InputError(f"cannot save {_describe(node)}: it has no storage type")
    if not storage.SupportedFileType(path):
        raise InputError(f"cannot save {_describe(node)} as {path}: unsupported file type")
    fd, temporary = tempfile.mkstemp(prefix=".medfm-", suffix="-" + os.path.basename(path), dir=folder)
    os.close(fd)
    os.remove(temporary)  # the writer creates it; an empty placeholder could be mistaken for success
    try:
        storage.SetFileName(temporary)
        if hasattr(storage, "SetUseCompression"):
            storage.SetUseCompression(1)
        ok = storage.WriteData(node)
        if not ok or not os.path.isfile(temporary) or os.path.getsize(temporary) == 0:
            raise InputError(f"cannot write {_describe(node)} to {path}{_storage_messages(storage)}")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
