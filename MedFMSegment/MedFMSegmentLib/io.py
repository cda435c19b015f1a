"""Volume and segmentation files, read and written with SimpleITK (no Slicer needed).

Geometry: ITK images live in LPS; every function here takes or returns a 4x4 ``ijk_to_ras`` matrix
and ``[k, j, i]`` arrays, converted with :mod:`MedFMSegmentLib.geometry` only.

Reading
  - :func:`read_volume` reads any 3D scalar image SimpleITK reads (.nrrd, .nhdr, .nii, .nii.gz,
    .mha, .mhd, ...). 2D, 4D (more than one frame), vector/RGB and complex images are rejected with
    an :class:`InputError` naming the file and the problem; a 4D file with a single frame is read as 3D.
  - :func:`read_segmentation` reads a Slicer ``.seg.nrrd`` (single or multi-layer, written by Slicer
    or by :func:`write_segmentation`) into ``{name: mask}``; a plain labelmap (no segment metadata)
    gives one mask per non-zero label value, named by the value or by ``label_names``.

Writing
  - :func:`write_segmentation` writes a Slicer ``.seg.nrrd``: the labelmap NRRD plus Slicer's
    segmentation fields (``Segment{N}_ID/_Name/_Color/_LabelValue/_Layer/_Extent/...``) on exactly
    the grid of the input volume (same origin, spacing and directions, no cropping,
    ``Segmentation_ReferenceImageExtentOffset=0 0 0``). Segment ``n`` (0-based) always has label
    value ``n + 1``. When no two segments overlap there is one layer (a 3D file); when some overlap,
    each segment goes to the first layer where it overlaps nothing, and the file is 4D with the
    layer axis first (``sizes: L I J K``; SimpleITK marks that axis ``kinds: vector`` where Slicer
    writes ``list``: Slicer reads both). Segment IDs are the segment names.
  - :func:`write_labelmap` writes one label image (.nii.gz, .nii, .nrrd, .mha): label ``n + 1`` for
    the ``n``-th segment; where segments overlap, the later segment wins (its label is kept).
  - Every write is atomic: the file is written under a temporary name in the output folder,
    **verified** (re-read in full and compared with what was meant to be written: SimpleITK's
    NIfTI writer does not raise when the disk fills, it prints ``NWAD: wrote only N of M bytes``),
    fsynced, then renamed over the output with ``os.replace``. A failure leaves neither partial
    output nor the temporary file, and an existing output is untouched. An existing output without
    ``overwrite=True`` is an :class:`InputError`; a file-system failure (disk full, permissions, a
    written file that does not read back) is an ``OSError`` naming the output and the free space.
    Only single-file formats are written (not .nhdr / .mhd, whose two files could not be replaced
    atomically together).

Truncation
  A NIfTI file (.nii, .nii.gz) shorter than its header promises, or a gzip stream that ends early or
  fails its CRC, is refused with an :class:`InputError` (SimpleITK reads a cut-off NIfTI silently,
  the missing voxels as zeros); NRRD short reads are reported by SimpleITK itself.
"""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from . import geometry
from .errors import InputError
from .truncation import truncation_problem  # noqa: F401  (re-exported)
from .atomic import (  # noqa: F401  (re-exported: io is where callers find them)
    FAULT_ENV,
    fault_point,
    _check_output,
    _same_file,
    check_distinct,
    _fsync_path,
    WriteVerificationError,
    free_space_text,
    _verification_failed,
    OutputGroup,
    atomic_output,
    _same_bytes,
    write_bytes_atomic,
    write_text_atomic)

log = logging.getLogger(__name__)

MaskInput = Union[Mapping[str, np.ndarray], Sequence[Tuple[str, np.ndarray]]]
ColorInput = Union[Mapping[str, Sequence[float]], Sequence[Sequence[float]], None]

#: Default segment colours (RGB 0..1), used in order when ``colors`` does not give one.
DEFAULT_COLORS: Tuple[Tuple[float, float, float], ...] = (
    (0.902, 0.294, 0.208),
    (0.298, 0.686, 0.314),
    (0.255, 0.412, 0.882),
    (0.957, 0.769, 0.188),
    (0.612, 0.345, 0.776),
    (0.129, 0.737, 0.773),
    (0.949, 0.522, 0.141),
    (0.851, 0.380, 0.639),
    (0.502, 0.502, 0.000),
    (0.553, 0.827, 0.780),
    (0.545, 0.271, 0.075),
    (0.600, 0.600, 0.600),
)

SEG_SUFFIX = ".seg.nrrd"
LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
MAX_PLAIN_LABELS = 1000  # more distinct values than this: an intensity image, not a labelmap

_SLICER_REPRESENTATION = "Binary labelmap"


# --------------------------------------------------------------------------- geometry helpers

def _matrix_from_image_info(origin_lps, spacing, direction) -> np.ndarray:
    """ITK origin/spacing/direction (LPS) -> 4x4 IJK-to-RAS."""
    dim = len(spacing)
    d = np.asarray(direction, dtype=np.float64).reshape(dim, dim)[:3, :3]
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = d * np.asarray(spacing[:3], dtype=np.float64)
    ijk_to_lps[:3, 3] = np.asarray(origin_lps[:3], dtype=np.float64)
    return geometry.lps_to_ras_matrix(ijk_to_lps)


def _checked_matrix(ijk_to_ras) -> np.ndarray:
    try:
        return geometry.check_matrix(ijk_to_ras)
    except ValueError as exc:
        raise InputError(f"invalid ijk_to_ras: {exc}") from exc


def _set_image_geometry(image: sitk.Image, ijk_to_ras: np.ndarray) -> None:
    """Give a 3D SimpleITK image the geometry of ``ijk_to_ras`` (converted to LPS)."""
    # The RAS<->LPS flip is its own inverse, so the same function converts back.
    ijk_to_lps = geometry.lps_to_ras_matrix(ijk_to_ras)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    direction = ijk_to_lps[:3, :3] / spacing
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in direction.ravel()])
    image.SetOrigin([float(v) for v in ijk_to_lps[:3, 3]])


def _itk_message(exc: Exception) -> str:
    """The useful last line of a SimpleITK exception."""
    text = str(exc).strip()
    marker = "sitk::ERROR:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


# --------------------------------------------------------------------------- reading

def _open_reader(path: Path) -> sitk.ImageFileReader:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an image file (DICOM series are not supported here)")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot read this file as an image ({_itk_message(exc)})") from exc
    return reader


def _shape_text(size_xyz: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in size_xyz)


def _execute(reader: sitk.ImageFileReader, path: Path) -> sitk.Image:
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{path}: the image data cannot be read, the file may be truncated or corrupt "
                         f"({_itk_message(exc)})") from exc
    problem = truncation_problem(path)
    if problem:
        raise InputError(f"{path}: truncated or corrupt file: {problem}; refusing to read it "
                         f"(the missing voxels would read as zeros)")
    return image


def _check_scalar(reader: sitk.ImageFileReader, path: Path) -> None:
    size = reader.GetSize()
    dim = reader.GetDimension()
    need = "MedFM needs a 3D scalar volume"
    if dim < 3:
        raise InputError(f"{path}: is {dim}D (size {_shape_text(size)}); {need}")
    if dim > 4 or (dim == 4 and size[3] != 1):
        raise InputError(f"{path}: is {dim}D (size {_shape_text(size)}, {int(np.prod(size[3:]))} frames); "
                         f"{need}: extract one frame first")
    ncomp = reader.GetNumberOfComponents()
    if ncomp != 1:
        raise InputError(f"{path}: has {ncomp} components per voxel (an RGB or vector image, "
                         f"size {_shape_text(size)}); {need}")
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    if "complex" in pixel.lower():
        raise InputError(f"{path}: has complex voxels ({pixel}); {need}")


def _drop_single_frame(image: sitk.Image) -> sitk.Image:
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        return sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    return image


def read_volume(path: Union[str, os.PathLike]) -> Tuple[np.ndarray, np.ndarray]:
    """Read a 3D scalar volume.

    Returns ``(array_kji, ijk_to_ras)``: the voxels in their stored dtype, indexed ``[k, j, i]``,
    and the 4x4 IJK-to-RAS matrix. Raises :class:`InputError` naming the file when it is missing,
    unreadable, or not a 3D scalar image.
    """
    path = Path(path)
    reader = _open_reader(path)
    _check_scalar(reader, path)
    image = _drop_single_frame(_execute(reader, path))
    array_kji = sitk.GetArrayFromImage(image)
    ijk_to_ras = _matrix_from_image_info(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    log.debug("read %s: shape_kji %s, dtype %s", path, array_kji.shape, array_kji.dtype)
    return array_kji, ijk_to_ras


def _meta(image: sitk.Image, key: str) -> Optional[str]:
    return image.GetMetaData(key) if image.HasMetaDataKey(key) else None


def _segment_indices(image: sitk.Image) -> List[int]:
    indices = []
    while image.HasMetaDataKey(f"Segment{len(indices)}_ID"):
        indices.append(len(indices))
    return indices


def _parse_ints(text: Optional[str], count: int, what: str, path: Path) -> Optional[List[int]]:
    if text is None or not text.strip():
        return None
    try:
        values = [int(v) for v in text.split()]
    except ValueError:
        values = []
    if len(values) != count:
        raise InputError(f"{path}: {what} is {text!r}, expected {count} integers")
    return values


def _unique_name(name: str, segment_id: str, taken: Mapping[str, object]) -> str:
    if name not in taken:
        return name
    alt = f"{name} [{segment_id}]"
    log.warning("segment name %r appears more than once; the segment with ID %r is returned as %r",
                name, segment_id, alt)
    return alt


def _select(names_in_file: Sequence[str], only: Optional[Sequence[str]], path: Path) -> List[bool]:
    """Which of the file's segments to return (all when ``only`` is None)."""
    if only is None:
        return [True] * len(names_in_file)
    missing = [n for n in only if n not in names_in_file]
    if missing:
        shown = ", ".join(repr(n) for n in list(names_in_file)[:30])
        raise InputError(f"{path}: no segment named {', '.join(map(repr, missing))}; the file has {shown}")
    return [n in only for n in names_in_file]


def _read_seg_masks(image: sitk.Image, path: Path, only: Optional[Sequence[str]]) -> Dict[str, np.ndarray]:
    """Masks of the segments described by Slicer's ``Segment{N}_*`` metadata."""
    layers = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() == 1:
        layers = layers[..., np.newaxis]
    masks: Dict[str, np.ndarray] = {}
    names: Dict[str, int] = {}  # returned name -> segment number in the file
    for n in _segment_indices(image):
        seg_id = _meta(image, f"Segment{n}_ID") or f"Segment_{n}"
        name = _unique_name(_meta(image, f"Segment{n}_Name") or seg_id, seg_id, names)
        names[name] = n
    for (name, n), wanted in zip(names.items(), _select(list(names), only, path)):
        if not wanted:
            continue
        layer = (_parse_ints(_meta(image, f"Segment{n}_Layer"), 1, f"Segment{n}_Layer", path) or [n])[0]
        label = (_parse_ints(_meta(image, f"Segment{n}_LabelValue"), 1, f"Segment{n}_LabelValue", path) or [1])[0]
        if not 0 <= layer < layers.shape[-1]:
            raise InputError(f"{path}: segment {name!r} is in layer {layer} but the file has "
                             f"{layers.shape[-1]} layer(s)")
        mask = (layers[..., layer] == label).astype(np.uint8)
        extent = _parse_ints(_meta(image, f"Segment{n}_Extent"), 6, f"Segment{n}_Extent", path)
        if extent is not None:
            mask = _apply_extent(mask, extent)
        masks[name] = mask
    return masks


def _apply_extent(mask_kji: np.ndarray, extent: Sequence[int]) -> np.ndarray:
    """Zero a mask outside its segment's extent ``i0 i1 j0 j1 k0 k1``, in the file's voxel indices.

    (Slicer adds ``Segmentation_ReferenceImageExtentOffset`` to both the file grid and these
    extents, so the offset cancels out here; the file's own geometry places the voxels.)
    """
    i0, i1, j0, j1, k0, k1 = extent
    keep = np.zeros_like(mask_kji)
    if i1 < i0 or j1 < j0 or k1 < k0:
        return keep
    sl = (slice(max(k0, 0), k1 + 1), slice(max(j0, 0), j1 + 1), slice(max(i0, 0), i1 + 1))
    keep[sl] = mask_kji[sl]
    return keep


def _read_plain_labels(image: sitk.Image, path: Path, label_names: Optional[Mapping[int, str]],
                       only: Optional[Sequence[str]]) -> Dict[str, np.ndarray]:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel and no "
                         f"segment metadata; expected a .seg.nrrd or a scalar labelmap")
    labels = sitk.GetArrayFromImage(image)
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise InputError(f"{path}: has non-integer voxel values; a labelmap must hold integer labels")
        labels = labels.astype(np.int64)
    values = np.unique(labels)
    values = values[values != 0]
    if values.size > MAX_PLAIN_LABELS:
        raise InputError(f"{path}: has {values.size} distinct values (more than {MAX_PLAIN_LABELS}); "
                         f"is this an intensity image rather than a labelmap?")
    to_name = dict(label_names or {})
    names = [to_name.get(int(v), str(int(v))) for v in values]
    return {name: (labels == v).astype(np.uint8)
            for name, v, wanted in zip(names, values, _select(names, only, path)) if wanted}


def _to_reference(masks: Dict[str, np.ndarray], ijk_to_ras: np.ndarray, shape_kji: Sequence[int],
                  ref_ijk_to_ras, path: Path) -> Dict[str, np.ndarray]:
    """Place masks stored on a sub-grid (e.g. a cropped Slicer segmentation) into the reference grid."""
    ref = _checked_matrix(ref_ijk_to_ras)
    file_to_ref = np.linalg.inv(ref) @ ijk_to_ras
    shift = file_to_ref[:3, 3]
    if not (np.allclose(file_to_ref[:3, :3], np.eye(3), atol=1e-4)
            and np.allclose(shift, np.round(shift), atol=1e-3)):
        raise InputError(f"{path}: its voxel grid is not aligned with the reference volume "
                         f"(different spacing, directions or a non-integer offset); resample it first")
    off_i, off_j, off_k = (int(v) for v in np.round(shift))
    out = {}
    for name, mask in masks.items():
        full = np.zeros(tuple(int(s) for s in shape_kji), dtype=np.uint8)
        src, dst = [], []
        for off, n_src, n_dst in zip((off_k, off_j, off_i), mask.shape, full.shape):
            lo, hi = max(off, 0), min(off + n_src, n_dst)
            if hi <= lo:
                break
            dst.append(slice(lo, hi))
            src.append(slice(lo - off, hi - off))
        if len(dst) == 3:
            full[tuple(dst)] = mask[tuple(src)]
        if full.sum() != mask.sum():
            log.warning("%s: segment %r extends outside the reference volume and was clipped", path, name)
        out[name] = full
    return out


def read_segmentation(path: Union[str, os.PathLike], label_names: Optional[Mapping[int, str]] = None,
                      reference: Optional[Tuple[Sequence[int], np.ndarray]] = None,
                      only: Optional[Sequence[str]] = None,
                      ) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """Read a segmentation into ``({name: uint8 mask_kji}, ijk_to_ras)``.

    ``path`` is a ``.seg.nrrd`` (Slicer's segment metadata, one or several layers) or a plain
    labelmap, which gives one mask per non-zero label, named ``label_names[value]`` or ``str(value)``.
    Masks are in file segment order. Slicer may store a segmentation cropped to its content:
    ``ijk_to_ras`` is the file's own grid; pass ``reference=(shape_kji, ijk_to_ras)`` of the volume
    to get masks on the volume's grid instead (it must be the same grid up to an integer shift).
    ``only``: names of the segments to return (each mask is a full volume: an atlas with a
    hundred labels is hundreds of MB); an unknown name is an :class:`InputError`.
    """
    path = Path(path)
    reader = _open_reader(path)
    if reader.GetDimension() != 3:
        raise InputError(f"{path}: is {reader.GetDimension()}D (size {_shape_text(reader.GetSize())}); "
                         f"a segmentation must be a 3D labelmap (layers as components)")
    image = _execute(reader, path)
    ijk_to_ras = _matrix_from_image_info(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    if _segment_indices(image):
        masks = _read_seg_masks(image, path, only)
    else:
        masks = _read_plain_labels(image, path, label_names, only)
    if reference is not None:
        shape_kji, ref_matrix = reference
        masks = _to_reference(masks, ijk_to_ras, shape_kji, ref_matrix, path)
        ijk_to_ras = _checked_matrix(ref_matrix)
    return masks, ijk_to_ras


# --------------------------------------------------------------------------- atomic output (atomic.py)

#: Output kinds and the file name endings each accepts (checked by :func:`check_output_path`).
OUTPUT_SUFFIXES: Dict[str, Tuple[str, ...]] = {
    "segmentation": (SEG_SUFFIX,),
    "labelmap": LABELMAP_SUFFIXES,
    "overlay": (".png",),
    "text": (".json", ".txt"),
}


def check_output_path(path: Union[str, os.PathLike], kind: str, overwrite: bool = False,
                      option: str = "") -> Path:
    """Check, before any work, that ``path`` can receive an output of ``kind`` (see :data:`OUTPUT_SUFFIXES`).

    The name must end with one of the kind's suffixes (a labelmap must not end with .seg.nrrd),
    the path must not be a folder, its folder must exist and be writable (a probe file is created
    and removed), and an existing file needs ``overwrite``. ``option`` (e.g. ``--labelmap``) is
    named in the messages. Raises :class:`InputError`.
    """
    path = Path(path)
    label = f"{option} {path}" if option else str(path)
    name = path.name.lower()
    allowed = OUTPUT_SUFFIXES[kind]
    if not name.endswith(allowed) or (kind == "labelmap" and name.endswith(SEG_SUFFIX)):
        hint = {"labelmap": f"; for a Slicer segmentation ({SEG_SUFFIX}) use --output",
                "segmentation": "; for a plain labelmap use --labelmap"}.get(kind, "")
        raise InputError(f"{label}: a {kind} file name must end with {' or '.join(allowed)}{hint}")
    _check_output(path, overwrite)
    probe = path.parent / f".{path.name}.{secrets.token_hex(6)}.probe"
    try:
        os.close(os.open(str(probe), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        raise InputError(f"{label}: cannot write in the output folder {path.parent} ({exc.strerror})") from None
    return path


def _image_verifier(image: sitk.Image) -> Callable[[Path], Optional[str]]:
    """Checks that a written image file holds all its bytes and reads back voxel for voxel."""
    expected = sitk.GetArrayViewFromImage(image)

    def verify(tmp: Path) -> Optional[str]:
        problem = truncation_problem(tmp)
        if problem:
            return problem
        try:
            back = sitk.ReadImage(str(tmp))
        except RuntimeError as exc:
            return f"it cannot be read back: {_itk_message(exc)}"
        if back.GetSize() != image.GetSize() or back.GetNumberOfComponentsPerPixel() != \
                image.GetNumberOfComponentsPerPixel():
            return f"it reads back with size {back.GetSize()} instead of {image.GetSize()}"
        if not np.array_equal(sitk.GetArrayViewFromImage(back), expected):
            return "its voxels read back differently"
        return None
    return verify


def _write_image(image: sitk.Image, path: Path, suffix: str, overwrite: bool,
                 group: Optional[OutputGroup] = None) -> None:
    with atomic_output(path, overwrite, suffix, verify=_image_verifier(image), group=group) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), True)
        except RuntimeError as exc:
            raise OSError(f"{path}: could not be written ({_itk_message(exc)}); "
                          f"{free_space_text(path.parent)}") from exc
    log.info("wrote %s", path)


def _output_suffix(path: Path, allowed: Sequence[str], what: str) -> str:
    name = path.name.lower()
    for suffix in allowed:
        if name.endswith(suffix):
            return suffix
    raise InputError(f"{path}: unsupported {what} file type; use one of {', '.join(allowed)}")


# --------------------------------------------------------------------------- mask validation

def _mask_items(masks: MaskInput) -> List[Tuple[str, np.ndarray]]:
    items = list(masks.items()) if isinstance(masks, Mapping) else list(masks)
    if not items:
        raise InputError("no segments to write")
    out: List[Tuple[str, np.ndarray]] = []
    shape = None
    seen = set()
    for n, item in enumerate(items):
        try:
            name, mask = item
        except (TypeError, ValueError):
            raise InputError(f"segment {n}: expected a (name, mask) pair, got {type(item).__name__}") from None
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"segment {n}: the name must be a non-empty string, got {name!r}")
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise InputError(f"segment {n}: the name {name!r} contains control characters (e.g. a newline)")
        if name in seen:
            raise InputError(f"segment {n}: the name {name!r} is used twice; segment names must be unique")
        seen.add(name)
        mask = np.asarray(mask)
        if mask.ndim != 3:
            raise InputError(f"segment {name!r}: the mask must be 3D [k, j, i], got shape {mask.shape}")
        if shape is None:
            shape = mask.shape
        elif mask.shape != shape:
            raise InputError(f"segment {name!r}: mask shape {mask.shape} differs from {shape} "
                             f"of segment {out[0][0]!r}")
        out.append((name, _binary(mask, name)))
    return out


def _binary(mask: np.ndarray, name: str) -> np.ndarray:
    if mask.dtype.kind == "f":
        if not np.all((mask == 0) | (mask == 1)):
            raise InputError(f"segment {name!r}: the float mask has values other than 0 and 1 "
                             f"(probabilities? threshold them first)")
    elif mask.dtype.kind not in "biu":
        raise InputError(f"segment {name!r}: the mask has dtype {mask.dtype}; expected integers or bool")
    return (mask != 0).astype(np.uint8)


def _label_dtype(count: int):
    if count <= np.iinfo(np.uint8).max:
        return np.uint8
    if count <= np.iinfo(np.uint16).max:
        return np.uint16
    raise InputError(f"{count} segments: at most {np.iinfo(np.uint16).max} can be written")


def _colors(colors: ColorInput, names: Sequence[str]) -> List[Tuple[Tuple[float, float, float], bool]]:
    """(rgb, auto_generated) per segment."""
    if colors is None:
        given: Dict[str, Sequence[float]] = {}
    elif isinstance(colors, Mapping):
        unknown = sorted(set(colors) - set(names))
        if unknown:
            raise InputError(f"colors given for unknown segment(s): {', '.join(map(repr, unknown))}")
        given = dict(colors)
    else:
        colors = list(colors)
        if len(colors) != len(names):
            raise InputError(f"{len(colors)} colors given for {len(names)} segments")
        given = dict(zip(names, colors))
    out = []
    for n, name in enumerate(names):
        if name not in given:
            out.append((DEFAULT_COLORS[n % len(DEFAULT_COLORS)], True))
            continue
        rgb = np.asarray(given[name], dtype=np.float64).ravel()
        if rgb.shape != (3,) or not np.all(np.isfinite(rgb)) or np.any(rgb < 0) or np.any(rgb > 1):
            raise InputError(f"segment {name!r}: color must be 3 numbers in 0..1, got {given[name]!r}")
        out.append((tuple(float(c) for c in rgb), False))
    return out


# --------------------------------------------------------------------------- writing

def _assign_layers(items: Sequence[Tuple[str, np.ndarray]], dtype) -> Tuple[List[np.ndarray], List[int]]:
    """Greedy layering: each segment goes to the first layer it does not overlap; label = index + 1."""
    layers: List[np.ndarray] = []
    layer_of: List[int] = []
    for n, (_, mask) in enumerate(items):
        inside = mask.astype(bool)
        for index, layer in enumerate(layers):
            if not np.any(layer[inside]):
                break
        else:
            layers.append(np.zeros(mask.shape, dtype=dtype))
            index = len(layers) - 1
        layers[index][inside] = n + 1
        layer_of.append(index)
    return layers, layer_of


def _seg_metadata(items, layer_of, colors, shape_kji) -> Dict[str, str]:
    k, j, i = shape_kji
    extent = f"0 {i - 1} 0 {j - 1} 0 {k - 1}"
    meta = {
        "Segmentation_MasterRepresentation": _SLICER_REPRESENTATION,
        "Segmentation_ContainedRepresentationNames": _SLICER_REPRESENTATION + "|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
        "Segmentation_ConversionParameters": "",
    }
    for n, ((name, _), layer, (rgb, auto)) in enumerate(zip(items, layer_of, colors)):
        prefix = f"Segment{n}_"
        meta.update({
            prefix + "ID": name,
            prefix + "Name": name,
            prefix + "NameAutoGenerated": "0",
            prefix + "Color": " ".join(f"{c:.6g}" for c in rgb),
            prefix + "ColorAutoGenerated": "1" if auto else "0",
            prefix + "LabelValue": str(n + 1),
            prefix + "Layer": str(layer),
            prefix + "Extent": extent,
            prefix + "Tags": "",
        })
    return meta


def write_segmentation(path: Union[str, os.PathLike], masks: MaskInput, ijk_to_ras,
                       colors: ColorInput = None, overwrite: bool = False,
                       group: Optional[OutputGroup] = None) -> None:
    """Write masks as a Slicer ``.seg.nrrd`` on the grid given by ``ijk_to_ras``.

    ``masks``: ``{name: mask_kji}`` or ``[(name, mask_kji), ...]`` (order kept), all the same 3D
    shape; non-zero voxels are inside. ``colors``: ``{name: (r, g, b)}`` or a list aligned with
    the segments, values 0..1; missing colours come from :data:`DEFAULT_COLORS`. Overlapping
    segments go to separate layers (see the module docstring).
    """
    path = Path(path)
    if not path.name.lower().endswith(SEG_SUFFIX):
        raise InputError(f"{path}: a segmentation file name must end with {SEG_SUFFIX} "
                         f"(use write_labelmap for a plain labelmap)")
    _check_output(path, overwrite)
    matrix = _checked_matrix(ijk_to_ras)
    items = _mask_items(masks)
    color_list = _colors(colors, [name for name, _ in items])
    layers, layer_of = _assign_layers(items, _label_dtype(len(items)))
    if len(layers) == 1:
        image = sitk.GetImageFromArray(layers[0])
    else:
        log.info("%s: overlapping segments, writing %d layers", path, len(layers))
        image = sitk.GetImageFromArray(np.stack(layers, axis=-1), isVector=True)
    _set_image_geometry(image, matrix)
    for key, value in _seg_metadata(items, layer_of, color_list, items[0][1].shape).items():
        image.SetMetaData(key, value)
    _write_image(image, path, ".nrrd", overwrite, group)


def write_labelmap(path: Union[str, os.PathLike], masks: MaskInput, ijk_to_ras,
                   overwrite: bool = False, group: Optional[OutputGroup] = None) -> None:
    """Write masks as one labelmap (.nii.gz, .nii, .nrrd, .mha): label ``n + 1`` for segment ``n``.

    Where segments overlap the later segment wins. Segment names are not stored.
    """
    path = Path(path)
    if path.name.lower().endswith(SEG_SUFFIX):
        raise InputError(f"{path}: use write_segmentation for {SEG_SUFFIX} files")
    suffix = _output_suffix(path, LABELMAP_SUFFIXES, "labelmap")
    _check_output(path, overwrite)
    matrix = _checked_matrix(ijk_to_ras)
    items = _mask_items(masks)
    labels = np.zeros(items[0][1].shape, dtype=_label_dtype(len(items)))
    for n, (_, mask) in enumerate(items):
        labels[mask.astype(bool)] = n + 1
    image = sitk.GetImageFromArray(labels)
    _set_image_geometry(image, matrix)
    _write_image(image, path, suffix, overwrite, group)
