"""Interaction bookkeeping of the MedFM Segment Editor effect, in plain Python (no Slicer, no torch).

The effect in Slicer is wiring only; what a click, a drag, a key or an undo means is decided here:

- **Prompts belong to a segment.** :class:`Interaction` keeps one ordered prompt list per segment ID;
  selecting another segment switches lists, nothing of the previous segment is sent again.
- **Undo is the Segment Editor's.** The prompt list of a segment is stored in the segment itself, as the
  tag :data:`PROMPTS_TAG` (text from :meth:`Interaction.text`), written together with the mask after
  ``saveStateForUndo``. The editor's undo / redo restores segment tags with the voxels, so after an undo
  :meth:`Interaction.load` gets the restored list back: the prompt's marker goes away and the prompt
  session is rebuilt from the remaining prompts (:meth:`Interaction.session_plan`). MedFM keeps no
  private undo that could overwrite later manual edits.
- **Moved and deleted points** (markers dragged or deleted in the views) update the list
  (:meth:`Interaction.move`, :meth:`Interaction.remove`); the slices whose prompts changed are the ones
  to recompute and write (:meth:`Interaction.dirty_slices`).
- **The clicked view decides the axis**: :func:`view_axis_and_index` (the IJK axis nearest the view
  normal, also for oblique views).
- **A click during a job is queued, never lost**: prompts are added to the list at once (their marker
  shows), the work is requested with :meth:`Interaction.request`, which queues it while a job runs;
  :meth:`Interaction.finished` returns the next queued request.

Coordinates: points and boxes are continuous voxel indices ``_ijk`` of the source volume.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np

from . import geometry
from .errors import InputError

#: Segment tag holding a segment's prompt list (JSON, see :meth:`Interaction.text`).
PROMPTS_TAG = "MedFM.Prompts"
#: Requests the effect can queue; "segment" (apply pending prompts) is coalesced.
REQUESTS = ("segment", "propagate", "repropagate", "accept")
_FORMAT = 1

SliceKey = Tuple[str, int]


@dataclass(frozen=True)
class Prompt:
    """One prompt on one slice: a point (``point_ijk``, ``positive``) or a box (``box_ijk`` = two corners)."""

    id: int
    kind: str
    axis: str
    index: int
    positive: bool = True
    point_ijk: Optional[Tuple[float, float, float]] = None
    box_ijk: Optional[Tuple[Tuple[float, float, float], Tuple[float, float, float]]] = None

    @property
    def slice(self) -> SliceKey:
        return self.axis, self.index

    def to_dict(self) -> dict:
        out = {"id": self.id, "kind": self.kind, "axis": self.axis, "index": self.index}
        if self.kind == "point":
            out.update(positive=self.positive, ijk=list(self.point_ijk))
        else:
            out.update(corners_ijk=[list(c) for c in self.box_ijk])
        return out

    @classmethod
    def from_dict(cls, d) -> "Prompt":
        try:
            kind, axis, index, pid = d["kind"], geometry.check_axis(d["axis"]), int(d["index"]), int(d["id"])
            if kind == "point":
                return cls(pid, kind, axis, index, bool(d.get("positive", True)), point_ijk=_vec3(d["ijk"]))
            if kind == "box":
                c0, c1 = d["corners_ijk"]
                return cls(pid, kind, axis, index, box_ijk=(_vec3(c0), _vec3(c1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"bad prompt in segment tag {PROMPTS_TAG!r}: {d!r} ({exc})") from exc
        raise InputError(f"bad prompt kind {kind!r} in segment tag {PROMPTS_TAG!r}: expected 'point' or 'box'")

    def box_xy(self) -> Tuple[float, float, float, float]:
        """The box in slice pixels ``(x0, y0, x1, y1)`` on its slice."""
        _, box = geometry.box_ijk_to_slice(np.array(self.box_ijk[0]), np.array(self.box_ijk[1]), self.axis)
        return box

    def apply(self, session):
        """Send this prompt to a ``PromptSession``; returns its ``SliceResult``."""
        if self.kind == "point":
            return session.add_point(ijk=np.array(self.point_ijk), positive=self.positive, axis=self.axis)
        return session.add_box(self.axis, self.index, self.box_xy())


def _vec3(values) -> Tuple[float, float, float]:
    v = tuple(float(x) for x in values)
    if len(v) != 3 or not all(np.isfinite(v)):
        raise ValueError(f"expected 3 finite numbers, got {values!r}")
    return v


def view_axis_and_index(slice_to_ras, ijk_to_ras, shape_kji: Sequence[int], view_name: str = "view") -> SliceKey:
    """``(axis, slice index)`` of the volume closest to a slice view (4x4 ``slice_to_ras``: normal and centre).

    Oblique views take the IJK axis nearest to the view normal. Raises InputError when the view shows a
    slice outside the volume.
    """
    slice_to_ras = np.asarray(slice_to_ras, dtype=float)
    axis = geometry.closest_axis(slice_to_ras[:3, 2], ijk_to_ras)
    index, _ = geometry.ijk_to_slice(geometry.ras_to_ijk(slice_to_ras[:3, 3], ijk_to_ras), axis)
    count = geometry.num_slices(shape_kji, axis)
    if not 0 <= index < count:
        raise InputError(f"the {view_name} view shows {axis} slice {index}, outside the volume (0..{count - 1})")
    return axis, int(index)


class Interaction:
    """Prompt lists per segment, polarity, the prompts the session and the segment hold, queued requests."""

    def __init__(self):
        self.segment_id: Optional[str] = None
        self.positive = True
        self._prompts: Dict[str, List[Prompt]] = {}
        self._written: Dict[str, Tuple[Prompt, ...]] = {}  # prompts whose result is in the segment
        self._applied: Tuple[Optional[str], Tuple[Prompt, ...]] = (None, ())  # what the prompt session holds
        self._next_id = 1
        self.busy = False
        self._queue: Deque[str] = deque()

    # ----------------------------------------------------------------- segments
    def select(self, segment_id: Optional[str]) -> None:
        """Make ``segment_id`` the segment that new prompts go to (None: no segment selected)."""
        self.segment_id = segment_id

    def _current(self) -> List[Prompt]:
        if not self.segment_id:
            raise InputError("select a segment first (Segment Editor: segment list)")
        return self._prompts.setdefault(self.segment_id, [])

    def prompts(self, segment_id: Optional[str] = None) -> List[Prompt]:
        return list(self._prompts.get(segment_id or self.segment_id, []))

    def forget(self, segment_id: Optional[str] = None) -> None:
        """Drop everything known about a segment (None: every segment), e.g. when its node is removed."""
        keys = list(self._prompts) if segment_id is None else [segment_id]
        for key in keys:
            self._prompts.pop(key, None)
            self._written.pop(key, None)
        if segment_id is None or self._applied[0] == segment_id:
            self._applied = (None, ())

    # ------------------------------------------------------------------ prompts
    def toggle_polarity(self) -> bool:
        """Switch between include and exclude points for plain clicks; returns the new polarity."""
        self.positive = not self.positive
        return self.positive

    def _new_id(self) -> int:
        used = {p.id for prompts in self._prompts.values() for p in prompts}
        while self._next_id in used:
            self._next_id += 1
        self._next_id += 1
        return self._next_id - 1

    def click(self, point_ijk, axis: str, shift: bool = False) -> Prompt:
        """A point at ``point_ijk`` on its ``axis`` slice: include, or exclude with Shift (inverted by the polarity)."""
        current = self._current()
        axis = geometry.check_axis(axis)
        point = _vec3(point_ijk)
        index, _ = geometry.ijk_to_slice(np.array(point), axis)
        prompt = Prompt(self._new_id(), "point", axis, int(index), positive=self.positive != bool(shift),
                        point_ijk=point)
        current.append(prompt)
        return prompt

    def box(self, corner0_ijk, corner1_ijk, axis: str, index: Optional[int] = None) -> Prompt:
        """A box from a drag: two corners in IJK on the ``axis`` slice ``index`` (default: the corners' slice)."""
        current = self._current()
        axis = geometry.check_axis(axis)
        c0, c1 = np.array(_vec3(corner0_ijk)), np.array(_vec3(corner1_ijk))
        box_index, (x0, y0, x1, y1) = geometry.box_ijk_to_slice(c0, c1, axis)
        if x1 - x0 < 1 or y1 - y0 < 1:
            raise InputError(f"the box is too small ({x1 - x0:.1f} x {y1 - y0:.1f} pixels): drag a larger box")
        index = box_index if index is None else int(index)
        a = geometry.array_axis(axis)  # put both corners on the slice
        ijk_axis = 2 - a
        c0[ijk_axis] = c1[ijk_axis] = index
        prompt = Prompt(self._new_id(), "box", axis, index, box_ijk=(tuple(c0), tuple(c1)))
        # A slice has one box: a new box replaces the old one (the engine does the same).
        current[:] = [p for p in current if not (p.kind == "box" and p.slice == prompt.slice)]
        current.append(prompt)
        return prompt

    def _find(self, prompt_id: int) -> Tuple[str, int]:
        for segment_id, prompts in self._prompts.items():
            for n, p in enumerate(prompts):
                if p.id == prompt_id:
                    return segment_id, n
        raise InputError(f"no prompt {prompt_id} (it was undone or removed)")

    def move(self, prompt_id: int, point_ijk) -> Optional[Prompt]:
        """A point marker was dragged to ``point_ijk``: the point moves (its slice follows on its axis).

        Returns the moved prompt, or None when it did not move (less than 1e-3 voxel).
        """
        segment_id, n = self._find(prompt_id)
        old = self._prompts[segment_id][n]
        if old.kind != "point":
            raise InputError(f"prompt {prompt_id} is a box, not a point")
        point = _vec3(point_ijk)
        if np.allclose(point, old.point_ijk, atol=1e-3):
            return None
        index, _ = geometry.ijk_to_slice(np.array(point), old.axis)
        new = Prompt(old.id, "point", old.axis, int(index), old.positive, point_ijk=point)
        self._prompts[segment_id][n] = new
        return new

    def remove(self, prompt_id: int) -> Prompt:
        """A marker was deleted: its prompt goes."""
        segment_id, n = self._find(prompt_id)
        return self._prompts[segment_id].pop(n)

    def clear(self) -> List[Prompt]:
        """Remove every prompt of the selected segment; returns them."""
        current = self._current()
        removed, current[:] = list(current), []
        return removed

    # ------------------------------------------------- the segment's stored copy
    def text(self, segment_id: Optional[str] = None) -> str:
        """The prompt list of a segment as the text of its :data:`PROMPTS_TAG` tag."""
        prompts = self._prompts.get(segment_id or self.segment_id, [])
        return json.dumps({"format": _FORMAT, "prompts": [p.to_dict() for p in prompts]}, separators=(",", ":"))

    def load(self, segment_id: str, text: Optional[str]) -> bool:
        """Take a segment's prompt list from its tag (after undo / redo / scene load). Returns True if it changed.

        The loaded prompts are what the segment holds (nothing to write); the session is rebuilt lazily.
        """
        prompts = parse_prompts(text)
        changed = prompts != self._prompts.get(segment_id, [])
        self._prompts[segment_id] = prompts
        self._written[segment_id] = tuple(prompts)
        return changed

    def dirty_slices(self, segment_id: Optional[str] = None) -> Set[SliceKey]:
        """Slices whose prompts differ from the ones the segment's content came from (to recompute and write)."""
        segment_id = segment_id or self.segment_id
        now, written = self._by_slice(self._prompts.get(segment_id, [])), self._by_slice(self._written.get(segment_id, ()))
        return {key for key in set(now) | set(written) if now.get(key) != written.get(key)}

    def mark_written(self, segment_id: Optional[str] = None, slices: Optional[Iterable[SliceKey]] = None) -> None:
        """The segment now holds the results of its prompts (on ``slices``; default: all)."""
        segment_id = segment_id or self.segment_id
        if slices is None:
            self._written[segment_id] = tuple(self._prompts.get(segment_id, []))
            return
        slices = set(slices)
        keep = [p for p in self._written.get(segment_id, ()) if p.slice not in slices]
        self._written[segment_id] = tuple(keep + [p for p in self._prompts.get(segment_id, []) if p.slice in slices])

    @staticmethod
    def _by_slice(prompts) -> Dict[SliceKey, Tuple[Prompt, ...]]:
        out: Dict[SliceKey, List[Prompt]] = {}
        for p in prompts:
            out.setdefault(p.slice, []).append(p)
        return {k: tuple(v) for k, v in out.items()}

    # ---------------------------------------------------------- prompt session
    def session_plan(self, segment_id: Optional[str] = None) -> Tuple[bool, List[Prompt]]:
        """``(reset, prompts)``: how to bring the prompt session to the segment's prompt list.

        Appending is cheap (only the new prompts); any other change (another segment, an undo, a moved or
        deleted point) resets the session and replays the list in order (decoder calls on cached embeddings).
        """
        segment_id = segment_id or self.segment_id
        now = tuple(self._prompts.get(segment_id, []))
        applied_segment, applied = self._applied
        if applied_segment == segment_id and now[:len(applied)] == applied:
            return False, list(now[len(applied):])
        return True, list(now)

    def mark_applied(self, segment_id: Optional[str], prompts: Sequence[Prompt]) -> None:
        """The session now holds exactly ``prompts`` of ``segment_id`` (call after a successful plan)."""
        self._applied = (segment_id, tuple(prompts))

    def replay(self, session, segment_id: str, reset: bool, prompts: Sequence[Prompt], dirty: Iterable[SliceKey],
               shape_kji: Sequence[int]) -> Dict[SliceKey, np.ndarray]:
        """Run a :meth:`session_plan` on a ``PromptSession``; returns the masks (H, W) of the ``dirty`` slices.

        A dirty slice without prompts any more (its last point was deleted) gets an empty mask. If a prompt
        fails, the session is marked lost (the next plan replays everything) and the error propagates.
        """
        self.session_lost()
        if reset:
            session.reset()
        results = {}
        for prompt in prompts:
            results[prompt.slice] = prompt.apply(session)
        self.mark_applied(segment_id, self.prompts(segment_id))
        return {(axis, index): results[(axis, index)].mask if (axis, index) in results
                else np.zeros(geometry.slice_shape(shape_kji, axis), np.uint8) for axis, index in dirty}

    def session_lost(self) -> None:
        """The session was reset or failed midway: the next plan replays everything."""
        self._applied = (None, ())

    # ------------------------------------------------------------------- queue
    def request(self, what: str) -> bool:
        """Ask for work; True = run it now, False = queued behind the running job (never dropped)."""
        if what not in REQUESTS:
            raise InputError(f"unknown request {what!r}: expected one of {', '.join(REQUESTS)}")
        if not self.busy:
            self.busy = True
            return True
        if not (what == "segment" and "segment" in self._queue):
            self._queue.append(what)
        return False

    def finished(self) -> Optional[str]:
        """The running job ended: the next queued request (now running), or None (idle)."""
        if self._queue:
            return self._queue.popleft()
        self.busy = False
        return None

    def cancel_queue(self) -> List[str]:
        """Drop queued requests (scene closed, effect deactivated); returns them."""
        dropped = list(self._queue)
        self._queue.clear()
        self.busy = False
        return dropped

    @property
    def queued(self) -> List[str]:
        return list(self._queue)


def parse_prompts(text: Optional[str]) -> List[Prompt]:
    """Prompts from a :data:`PROMPTS_TAG` text ("" or None: none). Raises InputError naming the bad value."""
    if not text:
        return []
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InputError(f"segment tag {PROMPTS_TAG!r} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("prompts"), list):
        raise InputError(f"segment tag {PROMPTS_TAG!r} is not a MedFM prompt list (format {_FORMAT})")
    prompts = [Prompt.from_dict(d) for d in data["prompts"]]
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise InputError(f"segment tag {PROMPTS_TAG!r} repeats prompt ids: {ids}")
    return prompts
