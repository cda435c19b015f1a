"""LoRA settings of an adapter (rank, alpha, targets), without torch: ``medfm tune`` checks them before
torch loads. :mod:`adapters` re-exports every name here (see its docstring for the targets).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict

import numpy as np

from MedFMSegmentLib.errors import InputError

_ATTN = r"transformer\..*(q_proj|k_proj|v_proj|out_proj)"
_MLP = r"transformer\..*(lin1|lin2)"
TARGET_PRESETS: Dict[str, str] = {
    "attn": _ATTN,
    "attn_mlp": f"({_ATTN}|{_MLP})",
    "decoder": rf"({_ATTN}|{_MLP}|output_hypernetworks_mlps\.0\.layers\.\d+|iou_prediction_head\.layers\.\d+)",
}


@dataclass(frozen=True)
class LoraSettings:
    """LoRA rank, scaling (``alpha / rank``) and target modules of the mask decoder."""

    rank: int = 8
    alpha: float = 16.0
    targets: str = "decoder"

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= 256:
            raise InputError(f"LoRA rank must be an integer from 1 to 256, got {self.rank!r}")
        if not np.isfinite(float(self.alpha)) or float(self.alpha) <= 0:
            raise InputError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise InputError(f"LoRA targets {self.targets!r} is neither a preset ({', '.join(TARGET_PRESETS)}) "
                             f"nor a valid regular expression: {exc}") from None

    @property
    def pattern(self) -> str:
        return TARGET_PRESETS.get(self.targets, self.targets)

    def to_dict(self) -> Dict:
        return {"rank": self.rank, "alpha": float(self.alpha), "targets": self.targets, "pattern": self.pattern}

    @classmethod
    def from_dict(cls, d: Dict) -> "LoraSettings":
        try:
            return cls(int(d["rank"]), float(d["alpha"]), str(d["targets"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"bad LoRA settings {d!r}: {exc}") from None
