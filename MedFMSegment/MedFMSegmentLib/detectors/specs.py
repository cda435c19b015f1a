"""The detector spec registry: ``KIND:PATH[:options]`` strings (the CLI's ``--detector``) -> detectors.

Each detector module that can be named on the command line defines a ``KIND``
(:class:`~MedFMSegmentLib.detectors.base.DetectorKind`: name, factory, options, help); adding one is
one line in :data:`DETECTOR_KINDS`. The registry is a constant tuple, not a mutable global: to try
other kinds, pass ``kinds=`` to :func:`detector_from_spec`.
"""
from __future__ import annotations

import re
from typing import List, Sequence, Tuple

from ..errors import InputError
from . import files, labelmap, retinanet
from .base import Detector, DetectorKind

#: Every detector kind of ``--detector KIND:PATH[:options]``, in the order of the help text.
DETECTOR_KINDS: Tuple[DetectorKind, ...] = (
    labelmap.KIND,
    files.KIND,
    retinanet.KIND,
)


def _spec_help(kinds: Sequence[DetectorKind]) -> str:
    return "Detector specs (--detector SPEC):\n" + "\n".join(kind.help for kind in kinds)


DETECTOR_SPEC_HELP = _spec_help(DETECTOR_KINDS)


def _option_pattern(kinds: Sequence[DetectorKind]) -> "re.Pattern[str]":
    """Any option of any kind (an option of another kind is split off, then refused by name)."""
    patterns = [p for kind in kinds for p in kind.options]
    return re.compile("^(" + "|".join(patterns) + ")$") if patterns else re.compile(r"(?!)")


def _split_spec_options(rest: str, pattern: "re.Pattern[str]") -> Tuple[str, List[str]]:
    """``PATH:opt1:opt2`` -> (PATH, [opt1, opt2]), options recognised from the right."""
    options = []
    while ":" in rest:
        head, tail = rest.rsplit(":", 1)
        if not pattern.match(tail):
            break
        options.insert(0, tail)
        rest = head
    return rest, options


def detector_from_spec(spec: str, *, kinds: Sequence[DetectorKind] = DETECTOR_KINDS) -> Detector:
    """Make a detector from a CLI spec (see :data:`DETECTOR_SPEC_HELP`); bad specs raise InputError."""
    help_text = DETECTOR_SPEC_HELP if kinds is DETECTOR_KINDS else _spec_help(kinds)
    if not isinstance(spec, str) or ":" not in spec:
        raise InputError(f"detector spec {spec!r} must be KIND:PATH[:options]\n{help_text}")
    kind, rest = spec.split(":", 1)
    kind = kind.strip().lower()
    path, options = _split_spec_options(rest, _option_pattern(kinds))
    if not path:
        raise InputError(f"detector spec {spec!r} has no path")
    by_name = {k.name: k for k in kinds}
    if kind not in by_name:
        raise InputError(f"unknown detector kind {kind!r} in {spec!r}; expected one of "
                         f"{', '.join(by_name)}\n{help_text}")
    allowed = by_name[kind].option_names()
    opts = {}
    for opt in options:
        key, _, value = opt.partition("=")
        if key not in allowed:
            raise InputError(f"option {opt!r} does not apply to a {kind} detector (spec {spec!r})")
        opts[key] = value
    return by_name[kind].make(path, opts, spec)
