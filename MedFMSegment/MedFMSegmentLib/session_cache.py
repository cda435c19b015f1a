"""What the Slicer Logic keeps per (volume, model): one prompt session and what it holds. Plain Python.

The Logic (``MedFMSegment.py``) reads volumes from MRML on the main thread; :meth:`SessionEntry.ready`
runs on the worker thread and brings the session to the volume and the target segment.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple


class SessionEntry:
    """The prompt session of one (volume, model) and what the Logic knows about it."""

    def __init__(self):
        self.session = None
        self.stamp = None  # (image MTime, geometry, preset) of the volume the session holds
        self.target = None  # (segmentation node ID, segment name) the prompts belong to
        self.generation = 0  # bumped when the session's prompts are reset
        self.propagated = False
        self.review: List[dict] = []  # last propagation: [{"axis", "index", "confidence"}], least confident first
        self.accepted: set = set()  # (axis, index) the user accepted as corrected slices (the effect's A key)
        self.online = None  # (key, base adapter, online adapter): the last online adaptation (adapt_online)

    def ready(self, new_session: Callable, stamp, volume, target, preset=None, adapter=None):
        """The session, holding ``volume`` ((array_kji, ijk_to_ras), or None if unchanged) and only ``target``'s prompts."""
        if self.session is None:
            self.session = new_session()
        if volume is not None:
            self.session.set_volume(*volume, preset=preset)
            self.stamp, self.target = stamp, None
        if self.target != target:
            self.session.reset()
            self.target, self.generation = target, self.generation + 1
            self.propagated, self.review, self.accepted = False, [], set()
        self.session.adapter = adapter
        return self.session

    def repin(self, masks: Dict[Tuple[str, int], object]) -> List[Tuple[str, int]]:
        """Pin the accepted slices to ``masks`` (their segment's current content, read on the main thread).

        A replayed prompt list (``Interaction.session_plan`` resets the session) drops the session's pins,
        and the user may have edited an accepted slice since: propagation takes the accepted slices as
        they are now. Returns the slices (re)pinned.
        """
        import numpy as np

        done = []
        for (axis, index), mask in sorted(masks.items()):
            state = self.session.slice_state(axis, index)
            if state is None or not state.pinned or not np.array_equal(state.mask > 0, np.asarray(mask) > 0):
                self.session.set_slice_mask(axis, index, mask)
                done.append((axis, index))
        return done

    def adapt_online(self, update: Optional[Callable], axis: Optional[str], organ: str,
                     should_stop: Optional[Callable] = None) -> Optional[object]:
        """Before a propagation: the session's adapter updated from its corrected slices of ``axis``
        (``update(session, axis, organ, base)``, e.g. ``MedFMTrainLib.online.adapter_updater()``), set as
        ``session.adapter``; returns it (None: nothing done, the adapter stays the segment's own).

        ``base`` is the segment's own adapter (the one ``ready`` set), never a previous online one; the same
        corrected slices and base reuse the last result instead of training again. ``axis`` None: the one axis
        the corrected slices lie on (none or several: nothing done)."""
        import numpy as np

        pinned = self.session.pinned_slices()
        if update is None or not pinned:
            return None
        if axis is None:
            axes = {a for a, _ in pinned}
            if len(axes) != 1:
                return None
            axis = axes.pop()
        masks = [(i, self.session.slice_state(a, i).mask) for a, i in sorted(pinned) if a == axis]
        if not any(np.asarray(m).any() for _, m in masks):
            return None
        base = self.session.adapter
        if self.online is not None and base is self.online[2]:
            base = self.online[1]  # propagating again: train from the segment's own adapter
        key = (self.generation, axis, organ, tuple((i, hash(np.asarray(m > 0).tobytes())) for i, m in masks))
        if self.online is not None and self.online[0] == key and self.online[1] is base:
            adapter = self.online[2]
        else:
            adapter = update(self.session, axis, organ, base, should_stop=should_stop)
            if adapter is None:
                return None
            previous = self.online[2] if self.online is not None and self.online[2] is not self.online[1] else None
            if previous is not None and previous is not adapter and hasattr(previous, "detach"):
                previous.detach(self.session.model)  # its layers would stay in the shared decoder
            self.online = (key, base, adapter)
        self.session.adapter = adapter
        return adapter

    def next_review(self, visited=()) -> Optional[Tuple[str, int, float]]:
        """(axis, index, confidence) of the least confident slice of the last propagation not in ``visited``."""
        visited = set(visited)
        for item in self.review:
            key = (item["axis"], int(item["index"]))
            if key not in visited:
                return key[0], key[1], float(item.get("confidence", 0.0))
        return None
