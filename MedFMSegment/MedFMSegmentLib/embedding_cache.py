"""The session's LRU of image embeddings, bounded in bytes (optionally stored as fp16)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional

import torch


class EmbeddingCache:
    """Thread-safe LRU of image embeddings, bounded in bytes.

    ``dtype=torch.float16`` stores embeddings at half the size (``get`` returns float32 again; masks
    from fp16-stored embeddings agree with fp32 at Dice >= 0.999, see Testing/benchmarks/bench_latency.py);
    None stores them as given.
    """

    def __init__(self, max_bytes: int = 2 << 30, dtype: Optional[torch.dtype] = None):
        self.max_bytes = int(max_bytes)
        self.dtype = dtype
        self._items: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def _out(self, emb: torch.Tensor) -> torch.Tensor:
        return emb.float() if self.dtype is not None else emb

    def get(self, key) -> Optional[torch.Tensor]:
        with self._lock:
            emb = self._items.get(key)
            if emb is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
        return self._out(emb)

    def put(self, key, emb: torch.Tensor) -> torch.Tensor:
        """Store ``emb``; returns the embedding exactly as ``get`` will return it."""
        stored = emb.to(self.dtype) if self.dtype is not None else emb
        size = stored.element_size() * stored.nelement()
        with self._lock:
            if key in self._items:
                return self._out(self._items[key])
            self._items[key] = stored
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.element_size() * old.nelement()
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
