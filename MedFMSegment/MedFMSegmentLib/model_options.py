"""Checks of the model options that need no model: ``--model``, ``--device``, ``--checkpoint``.

Shared by ``medfm segment`` / ``detect-segment`` / ``batch`` and by the trainer's ``medfm tune``, so that a
bad option fails in seconds, before torch loads any weights (the trainer must not import ``cli``).
"""
from __future__ import annotations

import os
from typing import Optional


KNOWN_DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device_name(device: Optional[str]) -> None:
    """``--device`` is cpu, cuda, cuda:N or mps (checked without importing torch)."""
    from .errors import InputError

    if device is None:
        return
    kind, _, index = device.strip().lower().partition(":")
    if kind not in KNOWN_DEVICE_TYPES or (index and not index.isdigit()) or (index and kind != "cuda"):
        raise InputError(f"--device {device!r}: unknown or unsupported device; use cpu, cuda, cuda:N or mps")


def check_device(device: Optional[str]) -> None:
    """``--device`` names a device MedFM can run on and that this machine has (before the model loads)."""
    if device is None:
        return
    check_device_name(device)
    if device.strip().lower() == "cpu":
        return  # every machine has one: no torch import to find that out
    from .models import choose_device

    choose_device(device)  # availability (CUDA / MPS present)


def check_model_options(args) -> None:
    """Every model option that can be checked without loading the model: --model, --device, --checkpoint."""
    from .errors import InputError
    from .model_registry import get_spec  # the registry without torch

    get_spec(args.model)
    check_device(args.device)
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint and not os.path.isfile(checkpoint):
        raise InputError(f"--checkpoint {checkpoint}: {'is not a file' if os.path.exists(checkpoint) else 'not found'}")
