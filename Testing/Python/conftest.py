"""Shared pytest setup for MedFM.

- Puts ``<repo>/MedFMSegment`` and ``<repo>/MedFMTrain`` on ``sys.path`` so the engine and the trainer
  import without installing the package.
- Limits torch to 2 threads (the CI and developer machines have 2 cores shared with other work).
- Fixtures: ``shared_data`` (the read-only real data folder, skipped when absent) and ``litemedsam``
  (the embedded LiteMedSAM on the CPU, loaded once per test run and shared by every test).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
for _sub in ("MedFMTrain", "MedFMSegment"):  # MedFMSegment ends up first
    _p = str(REPO / _sub)
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402  (after sys.path so a local checkout wins over an installed copy)

torch.set_num_threads(2)


def shared_data_path() -> Path:
    """``$MEDFM_SHARED_DATA`` if set, else ``<repo>/../shared/data``."""
    env = os.environ.get("MEDFM_SHARED_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder (read-only); the test is skipped when it is absent."""
    path = shared_data_path()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set MEDFM_SHARED_DATA or see the shared data README)")
    return path


@pytest.fixture(scope="session")
def litemedsam():
    """The embedded LiteMedSAM model on the CPU, loaded once for the whole test run (do not modify it)."""
    from MedFMSegmentLib import models

    return models.load_model("litemedsam", device="cpu")
