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

    def next_review(self, visited=()) -> Optional[Tuple[str, int, float]]:
        """(axis, index, confidence) of the least confident slice of the last propagation not in ``visited``."""
        visited = set(visited)
        for item in self.review:
            key = (item["axis"], int(item["index"]))
            if key not in visited:
                return key[0], key[1], float(item.get("confidence", 0.0))
        return None
