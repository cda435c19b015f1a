"""Shared pytest setup for MedFM.

- Puts ``<repo>/MedFMSegment`` and ``<repo>/MedFMTrain`` on ``sys.path`` so the engine and the trainer
  import without installing the package.
- Limits torch to 2 threads (the CI and developer machines have 2 cores shared with other work), 1
  when the machine is already busy (see ``_test_threads``).
- Fixtures: ``shared_data`` (the read-only real data folder, skipped when absent), ``litemedsam``
  (the embedded LiteMedSAM on the CPU, loaded once per test run and shared by every test), the real
  volumes (``colin27``, ``colin27_aal``, ``cranium_ct``, ``cranium_head``) and ``colin27_session``
  (one prompt session on Colin27 whose cached embeddings every test module reuses).
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


def _test_threads() -> int:
    """2 torch threads, or 1 when the machine is already busy ($MEDFM_TEST_THREADS overrides).

    Measured on the 2-core machine at load average ~5.5: test_session.py took 43 s with 1 thread and
    82 s with 2 (OpenMP threads waiting for a descheduled peer: a decoder call went from 0.2 s to 2 s).
    """
    if os.environ.get("MEDFM_TEST_THREADS"):
        return max(int(os.environ["MEDFM_TEST_THREADS"]), 1)
    cores = os.cpu_count() or 2
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > cores - 0.5
    return 1 if busy else min(2, cores)


torch.set_num_threads(_test_threads())


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


@pytest.fixture(scope="session", autouse=True)
def medfm_cache_dir(tmp_path_factory):
    """One temporary model-export cache for the test run (``$MEDFM_CACHE_DIR``, inherited by CLI
    subprocesses): the OpenVINO export of the default model happens at most once per run and never
    touches the user's own cache."""
    path = tmp_path_factory.mktemp("medfm-cache")
    old = os.environ.get("MEDFM_CACHE_DIR")
    os.environ["MEDFM_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MEDFM_CACHE_DIR", None)
    else:
        os.environ["MEDFM_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def litemedsam():
    """The embedded LiteMedSAM model on the CPU and the torch runtime (the reference-parity tests compare
    torch with the reference), loaded once for the whole test run (do not modify it)."""
    from MedFMSegmentLib import models

    return models.load_model("litemedsam", device="cpu", runtime="torch")


def _read(shared_data: Path, relative: str):
    from MedFMSegmentLib import io

    path = shared_data / relative
    if not path.is_file():
        pytest.skip(f"shared data file not found: {path}")
    return io.read_volume(path)


@pytest.fixture(scope="session")
def colin27(shared_data):
    """Colin27 T1 MRI (181x217x181, 1 mm): (array_kji, ijk_to_ras), read with the engine's reader."""
    return _read(shared_data, "colin27/ch2.nii.gz")


@pytest.fixture(scope="session")
def colin27_aal(shared_data, colin27):
    """The AAL atlas labels on the Colin27 grid (array_kji of label values)."""
    labels, ijk_to_ras = _read(shared_data, "colin27/aal.nii.gz")
    if labels.shape != colin27[0].shape or not (abs(ijk_to_ras - colin27[1]) < 1e-4).all():
        pytest.fail("aal.nii.gz is not on the ch2.nii.gz grid")
    return labels


@pytest.fixture(scope="session")
def cranium_ct(shared_data):
    """The head CT (256x256x108 int16 HU, 0.957x0.957x1.5 mm): (array_kji, ijk_to_ras)."""
    return _read(shared_data, "cranium_ct/cranium_ct.nrrd")


@pytest.fixture(scope="session")
def cranium_head(shared_data):
    """The CT's head mask (HU > -142) as uint8 [k, j, i]."""
    return (_read(shared_data, "cranium_ct/cranium_head_thr-142.nrrd")[0] > 0).astype("uint8")


@pytest.fixture(scope="session")
def colin27_session(litemedsam, colin27):
    """A PromptSession on Colin27, shared by the test modules so their cached embeddings are reused.

    Its model is a copy of ``litemedsam`` (same network) that counts image encodings in
    ``session.model.calls``. Tests reset its prompts before use; they must not change its config.
    """
    import dataclasses

    from MedFMSegmentLib.session import PromptSession

    model = dataclasses.replace(litemedsam)
    model.calls = 0

    def encode(image01):
        model.calls += 1
        return litemedsam.encode(image01)

    model.encode = encode
    session = PromptSession(model)
    session.set_volume(*colin27)
    yield session
    session.close()
