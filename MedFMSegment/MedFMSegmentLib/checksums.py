"""File checksums shared by the model registry, the export cache and the cohort state (stdlib only).

Kept apart so that ``batch`` and ``runtimes`` can hash files without importing ``models`` (and torch).
"""
from __future__ import annotations

import hashlib


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
