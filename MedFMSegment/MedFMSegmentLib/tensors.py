"""numpy from what the engine passes around, an array or a (CPU or GPU) torch tensor, without importing torch."""
from __future__ import annotations

import numpy as np


def as_float32(x) -> np.ndarray:
    """A float32 numpy array of ``x`` (a view where it already is one; a torch tensor is moved to the CPU)."""
    if hasattr(x, "detach"):  # a torch tensor: torch is loaded already
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, np.float32)
