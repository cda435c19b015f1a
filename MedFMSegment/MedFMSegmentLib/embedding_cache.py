"""The session's LRU of image embeddings, bounded in bytes (optionally stored as fp16)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional

import numpy as np


def _nbytes(emb) -> int:
    return int(emb.nbytes) if isinstance(emb, np.ndarray) else emb.element_size() * emb.nelement()


def _as_dtype(emb, dtype: str):
    """``emb`` (a numpy array or a torch tensor) as ``dtype`` ("float16" / "float32"), same kind of array."""
    if isinstance(emb, np.ndarray):
        return emb if emb.dtype == dtype else emb.astype(dtype)
    import torch  # a tensor came in: torch is loaded already

    return emb.to(getattr(torch, dtype))


class EmbeddingCache:
    """Thread-safe LRU of image embeddings, bounded in bytes.

    ``dtype="float16"`` stores embeddings at half the size (``get`` returns float32 again; masks
    from fp16-stored embeddings agree with fp32 at Dice >= 0.999, see Testing/benchmarks/bench_latency.py);
    None stores them as given. Embeddings are numpy arrays (an OpenVINO encoder's) or torch tensors
    (torch's), returned as the kind they came in (a torch dtype is accepted for ``dtype`` too). The float32
    copy last returned is kept (4 MB for LiteMedSAM, not counted in ``nbytes``): a second prompt on the same
    slice skips the conversion (2 ms CPU). Treat what ``get`` returns as read-only.
    """

    def __init__(self, max_bytes: int = 2 << 30, dtype=None):
        self.max_bytes = int(max_bytes)
        self.dtype = None if dtype is None else str(dtype).replace("torch.", "")
        self._items: "OrderedDict[tuple, object]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self._hot: Optional[tuple] = None  # (key, the float32 embedding get returned last)

    def _out(self, emb):
        return _as_dtype(emb, "float32") if self.dtype is not None else emb

    def get(self, key):
        with self._lock:
            emb = self._items.get(key)
            if emb is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            hot = self._hot
        if hot is not None and hot[0] == key:
            return hot[1]
        out = self._out(emb)
        if out is not emb:
            with self._lock:
                if key in self._items:  # not evicted meanwhile
                    self._hot = (key, out)
        return out

    def put(self, key, emb):
        """Store ``emb``; returns the embedding exactly as ``get`` will return it."""
        stored = _as_dtype(emb, self.dtype) if self.dtype is not None else emb
        size = _nbytes(stored)
        with self._lock:
            if key in self._items:
                return self._out(self._items[key])
            self._items[key] = stored
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._items) > 1:
                gone, old = self._items.popitem(last=False)
                self._bytes -= _nbytes(old)
                if self._hot is not None and self._hot[0] == gone:
                    self._hot = None
        return self._out(stored)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
            self._hot = None
