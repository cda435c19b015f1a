"""What a session needs of the exported mask decoder without torch: the graph's name (in the export cache's
identity) and the numpy step that puts its blocked masks in image order (see decoder_export)."""
from __future__ import annotations

import numpy as np

GRAPH = "folded-3-cf"  # bump when decoder_export's graph changes


def unblock_masks(blocked, pick, grid_hw):
    """numpy: masks in the exported decoder's blocked order (B, 4, 4, M, H*W) -> masks ``pick`` of the first
    batch item in image order, (len(pick), 4H, 4W) float32 (pixel (4y + 2dy + dy2, 4x + 2dx + dx2))."""
    hh, ww = grid_hw
    sel = np.asarray(blocked)[0][:, :, pick]  # (4, 4, k, HW)
    k = sel.shape[2]
    sel = sel.reshape(2, 2, 2, 2, k, hh, ww).transpose(4, 5, 0, 2, 6, 1, 3)  # k, y, dy, dy2, x, dx, dx2
    return np.ascontiguousarray(sel, dtype=np.float32).reshape(k, 4 * hh, 4 * ww)
