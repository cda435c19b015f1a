"""Short-read detection for NIfTI files (.nii, .nii.gz): SimpleITK reads a cut-off NIfTI silently, the
missing voxels as zeros. :func:`truncation_problem` compares the bytes the header promises with the bytes
there are (and checks the gzip CRC); :mod:`MedFMSegmentLib.io` refuses such a file.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Optional, Tuple, Union


def _stream_length(fh) -> int:
    """Bytes left in ``fh`` (gzip streams are decompressed, which checks their CRC and length)."""
    total = 0
    while True:
        block = fh.read(1 << 22)
        if not block:
            return total
        total += len(block)


def _nifti_promise(head: bytes) -> Optional[Tuple[int, int]]:
    """(data offset, data bytes) promised by a NIfTI-1/2 header, or None if ``head`` is not one."""
    for endian in "<>":
        if len(head) < 348:
            return None
        size = struct.unpack(endian + "i", head[:4])[0]
        if size == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            magic = head[344:348]
            break
        if size == 540 and len(head) >= 540:
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = struct.unpack(endian + "q", head[168:176])[0]
            magic = b"n+2\0"
            break
    else:
        return None
    if magic[:3] != b"n+1" and magic[:3] != b"n+2":  # .hdr/.img pair: data in another file
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    count = 1
    for d in dims[1:ndim + 1]:
        count *= max(int(d), 1)
    return max(offset, size + 4 if size == 348 else size), count * bitpix // 8


def truncation_problem(path: Union[str, os.PathLike]) -> Optional[str]:
    """Why a NIfTI / gzip file is incomplete (a text naming the numbers), or None if it looks whole.

    Checks a gzip stream's end marker and CRC, and that a NIfTI file holds the bytes its header
    promises (offset + voxels x bits per voxel). Other formats return None (SimpleITK reports
    short NRRD / MetaImage reads itself).
    """
    path = Path(path)
    name = path.name.lower()
    gz = name.endswith(".gz")
    nifti = name.endswith((".nii", ".nii.gz"))
    if not (gz or nifti):
        return None
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            head = fh.read(544)
            total = len(head) + _stream_length(fh)
    except EOFError:
        return "the compressed (gzip) data ends before its end marker"
    except (gzip.BadGzipFile, zlib.error) as exc:
        return f"the compressed (gzip) data is damaged ({exc})"
    if not nifti:
        return None
    promise = _nifti_promise(head)
    if promise is None:
        return None
    offset, data_bytes = promise
    if total < offset + data_bytes:
        return (f"the NIfTI header promises {offset + data_bytes} bytes ({data_bytes} of voxel data at "
                f"offset {offset}) but the {'decompressed ' if gz else ''}file holds {total}")
    return None
