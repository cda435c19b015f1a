"""Atomic, verified output files (stdlib only): the temporary-name / verify / fsync / rename protocol.

:func:`atomic_output` writes under a temporary name beside the output (``.<name>.<random>.tmp<suffix>``),
runs the caller's ``verify`` on it (SimpleITK's writers do not raise when the disk fills), fsyncs, then
renames it over the output; an :class:`OutputGroup` renames several outputs only once all of them are
written and verified (all or nothing). :mod:`MedFMSegmentLib.io` re-exports every name here.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union  # noqa: F401

from .errors import InputError

log = logging.getLogger("MedFMSegmentLib.io")

FAULT_ENV = "MEDFM_FAULT_KILL_AT"


def fault_point(name: str) -> None:
    """Test hook: the process kills itself (SIGKILL) here when ``$MEDFM_FAULT_KILL_AT`` is ``name``.

    Placed before, during and after each write so that the kill-anywhere tests can check that a
    kill at any of them leaves outputs complete or absent. Costs one environment lookup.
    """
    if os.environ.get(FAULT_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _check_output(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give an output file name")
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise InputError(f"{path}: the output folder {path.parent} {what}")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists; pass overwrite=True (--overwrite) to replace it")
    if path.exists() and not path.is_file():
        raise InputError(f"{path}: exists and is not a regular file (a device or pipe?); not replaced")


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_distinct(outputs: Sequence[Tuple[str, Union[str, os.PathLike, None]]],
                   inputs: Sequence[Tuple[str, Union[str, os.PathLike, None]]]) -> None:
    """Refuse an output that is (symlinks and hard links resolved) an input or another output.

    ``outputs`` / ``inputs``: ``(label, path)`` pairs, e.g. ``("--labelmap", "x.nii.gz")``; None
    paths are skipped. Raises :class:`InputError` naming both.
    """
    outs = [(label, Path(p)) for label, p in outputs if p]
    ins = [(label, Path(p)) for label, p in inputs if p]
    for n, (label, out) in enumerate(outs):
        for other_label, other in ins + outs[:n]:
            if _same_file(out, other):
                what = "input" if (other_label, other) in ins else "output"
                raise InputError(f"{label} {out} is the same file as the {what} {other_label} {other}; "
                                 f"refusing to overwrite it: choose another output name")


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY if directory else os.O_RDWR
    try:
        fd = os.open(str(path), flags)
    except OSError:
        if directory:  # some platforms cannot open folders; the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


class WriteVerificationError(OSError):
    """A written file did not read back as written (disk full, a writer that failed silently)."""


def free_space_text(folder: Union[str, os.PathLike]) -> str:
    """'N MB free on FOLDER' (or why it is unknown)."""
    try:
        free = shutil.disk_usage(str(folder)).free
    except OSError as exc:
        return f"free space on {folder} unknown ({exc.strerror})"
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if free >= size:
            return f"{free / size:.3g} {unit} free on {folder}"
    return f"{free} bytes free on {folder}"


def _verification_failed(path: Path, detail: str) -> WriteVerificationError:
    kept = f"the previous {path.name} was kept" if path.exists() else "nothing was written"
    try:
        full = shutil.disk_usage(str(path.parent)).free < (1 << 20)
    except OSError:
        full = False
    return WriteVerificationError(
        errno.ENOSPC if full else errno.EIO,
        f"{path}: the written file does not read back as written ({detail}); {free_space_text(path.parent)}; "
        f"{'the disk is probably full; ' if full else ''}{kept}")


class OutputGroup:
    """Outputs of one command, replaced all together or not at all.

    Writers given ``group=`` write and verify their temporary file but leave the rename to
    :meth:`commit`; use it as a context manager::

        with io.OutputGroup() as group:
            io.write_segmentation(out, masks, m, group=group)
            io.write_labelmap(labels, masks, m, group=group)   # fails: out is not touched either

    On leaving the block without error every output is renamed into place (each rename atomic; if
    a rename fails, outputs this group created are removed again); on an error every temporary
    file is removed and no output changes.
    """

    def __init__(self) -> None:
        self._staged: List[Tuple[Path, Path, bool]] = []

    def __enter__(self) -> "OutputGroup":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.discard()

    def stage(self, tmp: Path, path: Path, overwrite: bool) -> None:
        self._staged.append((tmp, path, overwrite))

    def commit(self) -> None:
        for _, path, overwrite in self._staged:  # check every target before renaming any
            if not overwrite and path.exists():
                raise InputError(f"{path}: was created by someone else while writing; not replaced")
        created: List[Path] = []
        try:
            while self._staged:
                tmp, path, _ = self._staged[0]
                existed = path.exists()
                fault_point("before-rename")
                os.replace(tmp, path)
                fault_point("renamed")
                self._staged.pop(0)
                if not existed:
                    created.append(path)
                _fsync_path(path.parent, directory=True)
        except BaseException:
            for path in created:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise

    def discard(self) -> None:
        for tmp, _, _ in self._staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._staged.clear()


@contextlib.contextmanager
def atomic_output(path: Union[str, os.PathLike], overwrite: bool = False, suffix: str = "",
                  verify: Optional[Callable[[Path], Optional[str]]] = None,
                  group: Optional[OutputGroup] = None) -> Iterator[Path]:
    """Context manager yielding a temporary path to write; on success it replaces ``path``.

    The temporary file is created next to ``path`` (name ``.<name>.<random>.tmp<suffix>``, so a
    writer that chooses its format by extension sees ``suffix``). On exit without error it is
    checked by ``verify(tmp)`` (which returns None when the file is right, else what is wrong: the
    write then fails with a :class:`WriteVerificationError` naming the file and the free space),
    fsynced and renamed over ``path`` with ``os.replace`` (by ``group.commit()`` when a
    :class:`OutputGroup` is given); on any error it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    _check_output(path, overwrite)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp{suffix}"
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
    os.close(fd)
    try:
        yield tmp
        fault_point("temp-written")
        _fsync_path(tmp)
        problem = verify(tmp) if verify is not None else None
        if problem:
            raise _verification_failed(path, problem)
        if group is not None:
            group.stage(tmp, path, overwrite)
            return
        if not overwrite and path.exists():
            raise InputError(f"{path}: was created by someone else while writing; not replaced")
        os.replace(tmp, path)
        fault_point("renamed")
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if exc.filename or str(path) in str(exc):
            raise
        raise OSError(exc.errno, f"{path}: {exc.strerror or exc}; {free_space_text(path.parent)}; "
                      f"{'the previous file was kept' if path.exists() else 'nothing was written'}") from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_path(path.parent, directory=True)


def _same_bytes(data: bytes) -> Callable[[Path], Optional[str]]:
    def verify(tmp: Path) -> Optional[str]:
        size = tmp.stat().st_size
        if size != len(data):
            return f"{size} of {len(data)} bytes on disk"
        if tmp.read_bytes() != data:
            return "its content differs from what was written"
        return None
    return verify


def write_bytes_atomic(path: Union[str, os.PathLike], data: bytes, overwrite: bool = False,
                       group: Optional[OutputGroup] = None) -> None:
    """Write a file atomically and verified (see :func:`atomic_output`)."""
    with atomic_output(path, overwrite, verify=_same_bytes(data), group=group) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def write_text_atomic(path: Union[str, os.PathLike], text: str, overwrite: bool = False) -> None:
    """Write a UTF-8 text file atomically and verified (see :func:`atomic_output`)."""
    write_bytes_atomic(path, text.encode("utf-8"), overwrite)
