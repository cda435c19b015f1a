"""The prompt session: one volume, one object, prompts on any slice of any axis, undo.

```python
session = PromptSession()                                  # LiteMedSAM on the best device
session.set_volume(array_kji, ijk_to_ras)                  # returns at once (no encoding yet)
r = session.add_box("axial", 57, (x0, y0, x1, y1))          # -> SliceResult(mask, score)
r = session.add_point(ijk=(i, j, k), positive=False, axis="axial")   # refine the same slice
session.undo(); session.reset()
session.look_ahead("axial", 58, crop)  # a walk through a window: encode the next slices ahead (see propagate)
```

Encoding a slice is the expensive step: embeddings are cached per (volume, axis, index, crop) in an
LRU bounded by bytes, shared between sessions that share a ``EmbeddingCache``; a second prompt on the
same slice runs only the decoder. ``prefetch`` encodes ahead in a background thread (futures that
can be cancelled).

Accuracy choices (measured in Testing/benchmarks/bench_2d.py):

- **Zoom**: the model sees a crop around the prompt, square in millimetres (anisotropic slices are
  resampled to square pixels in the same step), not the whole slice squeezed into 256 px.
- **Clicks on box-trained models** (LiteMedSAM, MedSAM) become boxes: a first positive click tries
  boxes of several sizes around it and keeps the one whose mask fits it best. Corrections are local
  edits of the box's mask: a positive click outside the box grows the box; one outside the mask adds
  the object the model finds under it; a negative click cuts away the part of the mask nearest to it.
"""
from __future__ import annotations

import copy
import itertools
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import geometry, runtimes
from .embedding_cache import EmbeddingCache  # noqa: F401  (public here)
from .errors import InputError
from .masks2d import _components, _cut_at, _point_region, keep_components_touching, remove_pixel  # noqa: F401
from .models import PromptableModel, load_model
from .preprocess import (CT_PER_BOX, CT_PER_BOX_PRIMARY, PRESETS, Crop, box_crop, ct_preset_for_box, full_slice_crop,
                         guess_modality, intensity_range, map_slice, model_to_slice, normalise_volume, resolve_preset,
                         slice_to_model, validate_volume)

log = logging.getLogger(__name__)

SliceKey = Tuple[str, int]
BoxXY = Tuple[float, float, float, float]


@dataclass
class SessionConfig:
    zoom: bool = True  # crop around the prompt instead of the whole slice
    context: float = 2.0  # crop margin on each side, as a fraction of the box's larger side
    min_crop_mm: float = 24.0
    mask_threshold: float = 0.0  # logit threshold
    keep_component_in_box: bool = True  # drop mask islands outside the box
    click_box_sizes_mm: Tuple[float, ...] = (8.0, 12.0, 18.0, 27.0, 40.0, 60.0, 90.0)
    click_margin_mm: float = 2.0
    # First-click box choice: score = predicted IoU - touch * (mask share on the box border)
    # - size * log2(box side / smallest side). Chosen from the candidate masks of a first click on
    # bench_2d's slices (Dice of the chosen candidate): tuned on the left-hemisphere structures
    # (0.527 -> 0.603), checked on the right ones (0.402 -> 0.507); large targets (brain,
    # cerebellum, CT) 0.49 -> 0.46. Full pipeline, all structures: 1 click 0.467 -> 0.535.
    click_touch_penalty: float = 1.0
    click_size_penalty: float = 0.05
    # A slice prompted or propagated through a window offers that window to its neighbours: a
    # neighbour's box that fits it (see window_fits) is encoded through the same window, so the
    # neighbour can be encoded ahead, before its box is known. The windows do not depend on
    # encode_ahead: masks are identical with and without encoding ahead.
    reuse_window: bool = True
    encode_ahead: int = 1  # slices encoded in the background ahead of the walking direction (0: off)
    # Also encode both neighbours of a slice the user prompts (for an interactive viewer; off by
    # default: on 2 cores it competes with the decoder, and scripts rarely move to a neighbour).
    encode_neighbours: bool = False
    # CT with the default preset: each prompt's box chooses its window (soft tissue unless the box is mostly
    # bone or air, then the full range: preprocess.ct_preset_for_box, chosen leave-one-dataset-out); the
    # window travels with the model window to the neighbours (propagation keeps it while the object fits).
    ct_window_per_box: bool = True


@dataclass
class SliceState:
    """The prompts on one slice and the result they gave."""

    box_xy: Optional[BoxXY] = None  # the box sent to the model (user's or derived from clicks)
    user_box: bool = False
    points: List[Tuple[Tuple[float, float], bool]] = field(default_factory=list)  # (xy_slice, positive)
    mask: Optional[np.ndarray] = None  # uint8 (H, W) in slice pixels
    score: float = 0.0
    crop: Optional[Crop] = None  # the model window used; kept while later prompts fit in it
    click_regions: Dict[int, np.ndarray] = field(default_factory=dict)  # point number -> local object mask
    pinned: bool = False  # a corrected slice (``set_slice_mask``): its mask is kept exactly, may be empty


@dataclass
class SliceResult:
    axis: str
    index: int
    mask: np.ndarray  # uint8 (H, W): the slice's mask on the volume grid, see geometry.get_slice
    score: float  # the model's predicted IoU, in [0, 1]
    box_xy: Optional[BoxXY] = None

    def paste_into(self, mask_kji: np.ndarray) -> None:
        geometry.set_slice(mask_kji, self.axis, self.index, self.mask)


class PromptSession:
    """Promptable segmentation of one object in one volume (see module docstring)."""

    def __init__(self, model: Union[str, PromptableModel] = "litemedsam", device: Optional[str] = None,
                 cache: Optional[EmbeddingCache] = None, cache_bytes: int = 256 << 20,
                 config: Optional[SessionConfig] = None, **model_kwargs):
        runtimes.limit_heap_fragmentation()  # embeddings freed by the LRU return to the OS
        self.model = model if isinstance(model, PromptableModel) else load_model(model, device=device, **model_kwargs)
        self.cache = cache if cache is not None else EmbeddingCache(cache_bytes, dtype="float16")
        self.config = config or SessionConfig()
        self.adapter = None  # an object with .applied(model) context manager (MedFMTrainLib adapters)
        self._executor: Optional[ThreadPoolExecutor] = None
        self._futures: Dict[tuple, Future] = {}
        self._futures_lock = threading.Lock()
        self._volume_u8: Optional[np.ndarray] = None  # the volume mapped to uint8 (None: mapped per slice from _raw)
        self._shape: Optional[Tuple[int, int, int]] = None
        self._raw: Optional[np.ndarray] = None  # the caller's CT array (a reference) when the window is per box
        self._token = None
        self._states: Dict[SliceKey, SliceState] = {}
        self._history: List[Tuple[SliceKey, Optional[SliceState]]] = []
        self._windows: Dict[SliceKey, Crop] = {}  # window offered to a slice by its neighbour
        self._last_index: Dict[str, int] = {}  # per axis: the slice last prompted or propagated
        self._ahead: set = set()  # keys encoding ahead (cancelled when the user moves away)

    @property
    def runtime_info(self) -> dict:
        """Where the model runs and why (runtime, precision, threads, CPU and ISA flags): for reports."""
        return dict(getattr(self.model, "runtime_info", {}) or {"runtime": "torch", "device": str(self.model.device)})

    # ------------------------------------------------------------------ volume
    _tokens = itertools.count()

    def set_volume(self, array_kji, ijk_to_ras, preset: Optional[str] = None) -> None:
        """Take a volume (``[k, j, i]`` array + 4x4 IJK-to-RAS). Validates, normalises; no encoding.

        A CT with the default preset (None / ``"auto"``) gets its window per box (``preset`` is then
        ``"ct-per-box"``, see ``SessionConfig.ct_window_per_box``); the session keeps a reference to the
        array (no copy) and maps each slice from it when the model needs one (no uint8 copy of the volume:
        the same numbers as ``normalise_volume``, 1 byte per voxel less resident).
        On error the session keeps its previous volume and prompts.
        """
        matrix = geometry.check_matrix(ijk_to_ras)
        raw = None
        if preset in (None, "auto") and self.config.ct_window_per_box:
            checked = validate_volume(array_kji)
            if guess_modality(checked) == "ct":
                raw, preset = checked, CT_PER_BOX_PRIMARY
        if raw is not None:  # every slice mapped on demand from the raw array (see normalised_slice)
            volume_u8, p = None, resolve_preset(preset, raw)
            window, shape = intensity_range(raw, p), raw.shape
        else:
            volume_u8, p, window = normalise_volume(array_kji, preset)
            shape = volume_u8.shape
        self.cancel_prefetch()
        self._volume_u8, self.ijk_to_ras, self.preset, self.window = volume_u8, matrix, p.name, window
        self._raw, self._shape = raw, tuple(int(n) for n in shape)
        if raw is not None:
            self.preset = CT_PER_BOX
        self._token = (next(self._tokens), id(raw if volume_u8 is None else volume_u8))
        self._states.clear()
        self._history.clear()
        self._windows.clear()
        self._last_index.clear()

    @property
    def shape(self) -> Tuple[int, int, int]:
        self._require_volume()
        return self._shape

    def normalised_slice(self, axis: str, index: int, preset: Optional[str] = None) -> np.ndarray:
        """The uint8 slice the model sees (after the intensity preset), on the volume grid.

        ``preset``: a window chosen per box (``Crop.preset``); None: the volume's own mapping.
        """
        self._require_volume()
        if self._volume_u8 is not None and (preset is None or self._raw is None or preset == CT_PER_BOX_PRIMARY):
            return geometry.get_slice(self._volume_u8, axis, index)
        window = self.window if preset is None or preset == CT_PER_BOX_PRIMARY else PRESETS[preset].window
        return map_slice(geometry.get_slice(self._raw, axis, index), window)

    def preset_for(self, axis: str, index: int, box_xy: Optional[BoxXY]) -> Optional[str]:
        """The intensity preset a box on a slice is seen with: None unless the window is per box."""
        if self._raw is None:
            return None
        if box_xy is None:
            return CT_PER_BOX_PRIMARY
        return ct_preset_for_box(geometry.get_slice(self._raw, axis, index), box_xy)

    def _require_volume(self):
        if self._shape is None:
            raise InputError("no volume: call set_volume(array_kji, ijk_to_ras) first")

    # --------------------------------------------------------------- encoding
    def _pixel_spacing(self, axis: str):
        return geometry.slice_pixel_spacing(self.ijk_to_ras, axis)

    def crop_for(self, axis: str, box_xy: Optional[BoxXY], index: Optional[int] = None) -> Crop:
        """The model-input window for a prompt: zoomed on the box, or the whole slice; with the CT window
        per box, the box on slice ``index`` also chooses the window (``Crop.preset``; no index: soft tissue)."""
        shape = geometry.slice_shape(self._shape, axis)
        size = self.model.input_size
        if box_xy is None or not self.config.zoom:
            crop = full_slice_crop(shape, self._pixel_spacing(axis), size)
        else:
            crop = box_crop(box_xy, shape, self._pixel_spacing(axis), size, self.config.context,
                            self.config.min_crop_mm)
        if self._raw is not None:
            crop = replace(crop, preset=self.preset_for(axis, index, box_xy) if index is not None else CT_PER_BOX_PRIMARY)
        return crop

    def window_fits(self, axis: str, crop: Crop, box_xy: BoxXY) -> bool:
        """Can a box on a slice of ``axis`` be seen through ``crop``, a window already used (so its cached
        embedding serves: decoder only)? Yes while the box stays inside it and is not much smaller than
        the box the window was made for. Part of the look-ahead API (see ``look_ahead``)."""
        x0, y0, x1, y1 = crop.box_to_model(box_xy)
        size = crop.size
        side = max(x1 - x0, y1 - y0)
        ideal = size / (1.0 + 2.0 * self.config.context) if self.config.zoom else 0.0
        return min(x0, y0) >= 0 and max(x1, y1) <= size - 1 and side >= 0.5 * ideal

    def _key(self, axis: str, index: int, crop: Crop) -> tuple:
        enc = getattr(self.adapter, "encoder_id", None)
        return (self._token, self.model.spec.id, self.model.precision, enc, axis, index, crop.key)

    def embedding(self, axis: str, index: int, crop: Crop):
        """The image embedding of a slice through ``crop`` (cached; waits for a prefetch in flight): a numpy
        array from an OpenVINO encoder, a torch tensor from torch's (``model.encode``)."""
        key = self._key(axis, index, crop)
        self._cancel_far(axis, index)
        emb = self.cache.get(key)
        if emb is not None:
            return emb
        with self._futures_lock:
            fut = self._futures.get(key)
        if fut is not None and not fut.cancelled():
            try:
                return fut.result()
            except Exception:  # a failed prefetch is retried in the foreground
                log.debug("prefetch of %s failed; encoding now", key, exc_info=True)
        return self._encode(key, axis, index, crop)

    def _encode(self, key, axis, index, crop):
        image = slice_to_model(self.normalised_slice(axis, index, crop.preset), crop)
        return self.cache.put(key, self.model.encode(image))

    def _cancel_far(self, axis: str, index: int) -> None:
        """The user moved: cancel queued encode-ahead work not next to slice ``index`` of ``axis``."""
        reach = max(self.config.encode_ahead, 1)
        with self._futures_lock:
            far = [k for k in self._ahead if k[4] != axis or abs(k[5] - index) > reach]
            futures = [self._futures.get(k) for k in far]
            self._ahead.difference_update(far)
        for fut in futures:
            if fut is not None:
                fut.cancel()

    def _window(self, axis: str, index: int, box_xy: BoxXY) -> Crop:
        """The window for a new slice: the one its neighbour offered if the box fits in it."""
        offered = self._windows.get((axis, index)) if self.config.reuse_window else None
        if offered is not None and self.window_fits(axis, offered, box_xy):
            return offered
        return self.crop_for(axis, box_xy, index)

    def look_ahead(self, axis: str, index: int, crop: Crop, walking: bool = True) -> None:
        """Slice ``index`` of ``axis`` is being segmented through ``crop``: offer that window to its
        neighbours and encode them ahead in the background (``SessionConfig.encode_ahead`` slices).

        ``walking`` (a propagation walking slice by slice): the slice(s) after ``index`` in the direction
        of the walk (from the slice last looked ahead from), else both neighbours (encoded only with
        ``SessionConfig.encode_neighbours``). A neighbour whose box fits the offered window
        (``window_fits``) is then encoded through it, so the work done ahead is the work it needs. Masks
        do not depend on it (the windows are the same with and without encoding ahead); a no-op with
        ``reuse_window=False``. Work queued for slices far from where the user goes is cancelled.
        """
        self._require_volume()
        geometry.check_axis(axis)
        index = geometry.check_index(self._shape, axis, index)
        if not self.config.reuse_window:
            return
        last = self._last_index.get(axis)
        self._last_index[axis] = index
        n = geometry.num_slices(self._shape, axis)
        walking = walking and last is not None and last != index
        steps = [int(np.sign(index - last))] if walking else [-1, 1]
        if len(steps) == 1:
            depth = self.config.encode_ahead
        else:
            depth = min(self.config.encode_ahead, 1) if self.config.encode_neighbours else 0
        for step in steps:
            if 0 <= index + step < n:
                self._windows[(axis, index + step)] = crop
            ahead = [index + step * d for d in range(1, depth + 1) if 0 <= index + step * d < n]
            if ahead:
                self._submit(axis, ahead, crop, ahead=True)

    def prefetch(self, axis: str, indices: Sequence[int], box_xy: Optional[BoxXY] = None) -> List[Future]:
        """Encode slices in the background (one worker thread); returns futures that can be cancelled."""
        self._require_volume()
        geometry.check_axis(axis)
        checked = [geometry.check_index(self._shape, axis, index) for index in indices]  # all, first
        if not checked:
            return []
        crop = self.crop_for(axis, None if box_xy is None else self._check_box(axis, checked[0], box_xy), checked[0])
        return self._submit(axis, checked, crop)

    def _submit(self, axis: str, checked: Sequence[int], crop: Crop, ahead: bool = False) -> List[Future]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medfm-encode")
        futures = []
        for index in checked:
            key = self._key(axis, index, crop)
            with self._futures_lock:
                if key in self.cache or key in self._futures:
                    continue
                fut = self._executor.submit(self._encode, key, axis, index, crop)
                self._futures[key] = fut
                if ahead:
                    self._ahead.add(key)
            fut.add_done_callback(lambda f, k=key: self._forget(k))
            futures.append(fut)
        return futures

    def _forget(self, key):
        with self._futures_lock:
            self._futures.pop(key, None)
            self._ahead.discard(key)

    def wait_prefetch(self, timeout: Optional[float] = None) -> None:
        """Wait until the background encodes queued so far are done (cancelled ones count as done)."""
        with self._futures_lock:
            futures = list(self._futures.values())
        for fut in futures:
            try:
                fut.result(timeout=timeout)
            except Exception:  # cancelled or failed: the foreground encodes it when it is needed
                log.debug("background encode ended without a result", exc_info=True)

    def cancel_prefetch(self) -> None:
        """Cancel queued encodes (one already running finishes and is cached)."""
        with self._futures_lock:  # Future.cancel runs done-callbacks, which take this lock: cancel outside it
            futures = list(self._futures.values())
            self._futures.clear()
            self._ahead.clear()
        for fut in futures:
            fut.cancel()

    def close(self) -> None:
        self.cancel_prefetch()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    # ---------------------------------------------------------------- decoding
    def _check_box(self, axis: str, index: int, box_xy) -> BoxXY:
        try:
            x0, y0, x1, y1 = (float(v) for v in box_xy)
        except (TypeError, ValueError):
            raise InputError(f"box must be (x0, y0, x1, y1), got {box_xy!r}") from None
        if not all(np.isfinite([x0, y0, x1, y1])):
            raise InputError(f"box {box_xy!r} contains NaN or inf")
        if x1 < x0 or y1 < y0:
            raise InputError(f"box {box_xy!r} is inverted: need x0 <= x1 and y0 <= y1")
        h, w = geometry.slice_shape(self._shape, axis)
        if x1 < 0 or y1 < 0 or x0 > w - 1 or y0 > h - 1:
            raise InputError(f"box {box_xy!r} lies outside the {axis} slice {index} (x 0..{w - 1}, y 0..{h - 1})")
        if x0 < 0 or y0 < 0 or x1 > w - 1 or y1 > h - 1:
            log.warning("box %s clipped to the %s slice (%d x %d)", box_xy, axis, w, h)
            x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1)
        return x0, y0, x1, y1

    def predict(self, axis: str, index: int, box_xy: Optional[BoxXY], points=(), mask_input=None,
                crop: Optional[Crop] = None, clear_negatives: bool = True) -> Tuple[np.ndarray, float, np.ndarray]:
        """One model run on a slice: (logits on the slice grid, score, uint8 mask). Records nothing.

        ``clear_negatives``: take the negative clicks' pixels out of the mask (off when the caller
        edits the mask around them itself).
        """
        crop = crop or self.crop_for(axis, box_xy, index)
        emb = self.embedding(axis, index, crop)
        box_model = crop.box_to_model(box_xy) if box_xy is not None else None
        pts = lbl = None
        if points and "points" in self.model.spec.trained_with:
            pts = crop.to_model([p for p, _ in points])
            lbl = [1 if pos else 0 for _, pos in points]
        logits_model, iou = self.model.decode(emb, box_model, pts, lbl, mask_input, fast=True, adapter=self.adapter)
        shape = geometry.slice_shape(self._shape, axis)
        logits = model_to_slice(logits_model[0], crop, shape)
        mask = (logits > self.config.mask_threshold).astype(np.uint8)
        if box_xy is not None and self.config.keep_component_in_box:
            x0, y0, x1, y1 = (int(round(v)) for v in box_xy)
            inside = np.zeros(mask.shape, bool)
            inside[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True
            mask = keep_components_touching(mask, inside)
        for (x, y), positive in points if clear_negatives else ():
            if not positive:  # a negative click is never inside the result
                mask = remove_pixel(mask, x, y)
        return logits, float(np.clip(iou[0], 0, 1)), mask

    def segment_box(self, axis: str, index: int, box_xy) -> SliceResult:
        """Segment a slice from a box without recording it as a prompt (used by propagation)."""
        self._require_volume()
        index = geometry.check_index(self._shape, axis, index)
        box = self._check_box(axis, index, box_xy)
        crop = self._window(axis, index, box)
        self.look_ahead(axis, index, crop, walking=True)
        _, score, mask = self.predict(axis, index, box, crop=crop)
        return SliceResult(axis, index, mask, score, box)

    # ----------------------------------------------------------------- prompts
    def add_box(self, axis: str, index: int, box_xy) -> SliceResult:
        """Prompt a slice with a box (inclusive slice-pixel corners x0, y0, x1, y1); replaces its box."""
        self._require_volume()
        geometry.check_axis(axis)
        index = geometry.check_index(self._shape, axis, index)
        box = self._check_box(axis, index, box_xy)
        key = (axis, index)
        state = self._editable_state(key)
        state.box_xy, state.user_box = box, True
        return self._run(key, state)

    def add_point(self, ijk=None, positive: bool = True, axis: str = "axial", index: Optional[int] = None,
                  xy_slice=None) -> SliceResult:
        """Add a positive or negative click, given as a voxel ``ijk`` or as (``index``, ``xy_slice``)."""
        self._require_volume()
        geometry.check_axis(axis)
        if ijk is not None:
            p = np.asarray(ijk, np.float64).reshape(-1)
            if p.size != 3 or not np.all(np.isfinite(p)):
                raise InputError(f"point ijk must be 3 finite numbers, got {ijk!r}")
            index, xy_slice = geometry.ijk_to_slice(p, axis)
        elif index is None or xy_slice is None:
            raise InputError("add_point needs ijk=(i, j, k) or index= and xy_slice=(x, y)")
        index = geometry.check_index(self._shape, axis, int(index))
        h, w = geometry.slice_shape(self._shape, axis)
        x, y = (float(v) for v in xy_slice)
        if not (-0.5 <= x <= w - 0.5 and -0.5 <= y <= h - 0.5):
            raise InputError(f"point {ijk if ijk is not None else xy_slice} lies outside the {axis} slice "
                             f"{index} (x 0..{w - 1}, y 0..{h - 1})")
        key = (axis, index)
        state = self._editable_state(key)
        state.points.append(((x, y), bool(positive)))
        state.box_xy = self._box_after_click(axis, index, state, (x, y), bool(positive))
        return self._run(key, state)

    def _editable_state(self, key: SliceKey) -> SliceState:
        """A copy of the slice's prompts to add to; a pinned slice's prompts start afresh (the pin goes)."""
        old = self._states.get(key)
        return SliceState() if old is None or old.pinned else copy.deepcopy(old)

    def _run(self, key: SliceKey, state: SliceState) -> SliceResult:
        axis, index = key
        if state.box_xy is None:  # only negative clicks so far: nothing to segment
            mask, score = np.zeros(geometry.slice_shape(self._shape, axis), np.uint8), 0.0
        else:
            if state.crop is None:
                state.crop = self._window(axis, index, state.box_xy)
            elif not self.window_fits(axis, state.crop, state.box_xy):
                state.crop = self.crop_for(axis, state.box_xy, index)
            self.look_ahead(axis, index, state.crop, walking=False)
            edits = bool(state.points) and "points" not in self.model.spec.trained_with
            _, score, mask = self.predict(axis, index, state.box_xy, state.points, crop=state.crop,
                                          clear_negatives=not edits)
            if edits:
                mask = self._apply_click_edits(axis, index, state, mask)
        state.mask, state.score = mask, score
        self._history.append((key, self._states.get(key)))
        self._states[key] = state
        return SliceResult(axis, index, mask, score, state.box_xy)

    def set_slice_mask(self, axis: str, index: int, mask) -> SliceResult:
        """Pin a slice to a user-corrected mask (uint8/bool ``(H, W)`` on the volume grid; may be empty).

        A pinned slice is kept exactly by propagation, never overwritten, seeds it, and an empty one
        says "the object is absent here" (propagation never crosses it). Undoable like any prompt;
        a later box or click on the slice replaces the pin.
        """
        self._require_volume()
        geometry.check_axis(axis)
        index = geometry.check_index(self._shape, axis, index)
        m = np.asarray(mask)
        shape = geometry.slice_shape(self._shape, axis)
        if m.shape != tuple(shape):
            raise InputError(f"mask for {axis} slice {index} has shape {m.shape}, the slice is {tuple(shape)}")
        if not (m.dtype == bool or np.issubdtype(m.dtype, np.integer)):
            raise InputError(f"mask for {axis} slice {index} must be bool or integer, got {m.dtype}")
        key = (axis, index)
        state = SliceState(mask=(m > 0).astype(np.uint8), score=1.0, pinned=True)
        self._history.append((key, self._states.get(key)))
        self._states[key] = state
        return SliceResult(axis, index, state.mask, 1.0, None)

    def pinned_slices(self, axis: Optional[str] = None) -> List[SliceKey]:
        """The corrected (pinned) slices, optionally only those on ``axis``."""
        return [k for k, s in self._states.items() if s.pinned and (axis is None or k[0] == axis)]

    # ---------------------------------------------------------- click strategy
    def _mm_to_px(self, axis: str, mm: float) -> Tuple[float, float]:
        sy, sx = self._pixel_spacing(axis)
        return mm / sx, mm / sy

    def _box_after_click(self, axis, index, state: SliceState, xy, positive: bool) -> Optional[BoxXY]:
        """Turn a click into the box a box-trained model needs (see module docstring)."""
        x, y = xy
        h, w = geometry.slice_shape(self._shape, axis)
        mx, my = self._mm_to_px(axis, self.config.click_margin_mm)
        box, mask = state.box_xy, state.mask
        if box is None:
            if not positive:
                return None
            box, region = self._fit_box_at_click(axis, index, (x, y))
            state.click_regions[len(state.points) - 1] = region
            return box
        x0, y0, x1, y1 = box
        inside_mask = mask is not None and mask[int(round(y)), int(round(x))] > 0
        if positive and not inside_mask and not (x0 <= x <= x1 and y0 <= y <= y1):
            # a positive click outside the box: the box was too small; grow it to reach the click
            x0, y0, x1, y1 = min(x0, x - mx), min(y0, y - my), max(x1, x + mx), max(y1, y + my)
        # other corrections keep the box and edit the mask (see _apply_click_edits)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1)
        if x1 < x0 or y1 < y0:
            return box
        return (x0, y0, x1, y1)

    def _apply_click_edits(self, axis, index, state: SliceState, mask: np.ndarray) -> np.ndarray:
        """Corrective clicks on a box-trained model, applied in order to the box's mask.

        - A positive click outside the mask adds the object under the click: the model segments it
          from the best-fitting box around the click (as for a first click), and that local mask joins.
        - A negative click inside the mask removes the part of the mask nearer to it than to what the
          user wants kept (the positive clicks, or else the mask's deepest point): a local cut that
          never touches the rest of the mask.
        Both edits are local, so a correction cannot undo the mask far away from it.
        """
        mask = mask.copy()
        for number, ((x, y), positive) in enumerate(state.points):
            xi, yi = int(round(x)), int(round(y))
            if positive and not mask[yi, xi]:
                region = state.click_regions.get(number)
                if region is None:
                    region = self._fit_box_at_click(axis, index, (x, y))[1]
                    state.click_regions[number] = region
                mask |= region
                for (nx, ny), pos in state.points[:number]:  # keep earlier negative clicks out
                    if not pos:
                        mask = remove_pixel(mask, nx, ny)
            elif not positive and mask[yi, xi]:
                keep = [(px, py) for (px, py), pos in state.points if pos and mask[int(round(py)), int(round(px))]]
                mask = _cut_at(mask, (xi, yi), keep)
        for (x, y), positive in state.points:  # a negative click is never inside the result
            if not positive:
                mask = remove_pixel(mask, x, y)
        return mask

    def _fit_box_at_click(self, axis, index, xy) -> Tuple[BoxXY, np.ndarray]:
        """A positive click: try square boxes of several sizes centred on it; keep the best fit.

        A box fits when the mask it gives contains the click and lies inside the box without filling
        it to the edges; among those, the model's predicted IoU decides, with a small preference for
        smaller boxes (see ``SessionConfig.click_size_penalty``). Returns the winner tightened
        to its mask plus a margin, and the winner's mask (the component under the click; empty if no
        box fitted).
        """
        x, y = xy
        h, w = geometry.slice_shape(self._shape, axis)
        sizes = self.config.click_box_sizes_mm
        big = max(sizes)
        hx, hy = self._mm_to_px(axis, big / 2)
        crop = self.crop_for(axis, (x - hx, y - hy, x + hx, y + hy), index)
        best, best_score, best_mask = None, -np.inf, np.zeros((h, w), np.uint8)
        for s in sizes:
            rx, ry = self._mm_to_px(axis, s / 2)
            box = (max(x - rx, 0), max(y - ry, 0), min(x + rx, w - 1), min(y + ry, h - 1))
            _, iou, mask = self.predict(axis, index, box, crop=crop)
            xi, yi = int(round(x)), int(round(y))
            if not mask[yi, xi]:
                continue
            mask = keep_components_touching(mask, _point_region(mask.shape, xi, yi))
            tight = geometry.box_from_mask(mask)
            bx0, by0, bx1, by1 = (int(round(v)) for v in box)
            border = np.zeros(mask.shape, bool)
            border[by0:by1 + 1, bx0:bx1 + 1] = True
            border[by0 + 1:by1, bx0 + 1:bx1] = False
            touch = mask[border].mean() if border.any() else 1.0
            fill = mask.sum() / max((bx1 - bx0 + 1) * (by1 - by0 + 1), 1)
            score = (iou - self.config.click_touch_penalty * touch - 0.5 * max(0.0, fill - 0.8)
                     - self.config.click_size_penalty * np.log2(s / min(sizes)))
            if score > best_score:
                best, best_score, best_mask = tight, score, mask
        if best is None:
            rx, ry = self._mm_to_px(axis, sizes[len(sizes) // 2] / 2)
            return (max(x - rx, 0), max(y - ry, 0), min(x + rx, w - 1), min(y + ry, h - 1)), best_mask
        mx, my = self._mm_to_px(axis, self.config.click_margin_mm)
        x0, y0, x1, y1 = best
        return (max(x0 - mx, 0), max(y0 - my, 0), min(x1 + mx, w - 1), min(y1 + my, h - 1)), best_mask

    # --------------------------------------------------------- state and undo
    def undo(self) -> Optional[SliceResult]:
        """Take back the last prompt; returns the slice's result before it (None if it had none)."""
        if not self._history:
            raise InputError("nothing to undo")
        key, previous = self._history.pop()
        if previous is None:
            self._states.pop(key, None)
            return None
        self._states[key] = previous
        return SliceResult(key[0], key[1], previous.mask, previous.score, previous.box_xy)

    def reset(self) -> None:
        """Forget all prompts and results (the volume and cached embeddings stay)."""
        self._states.clear()
        self._history.clear()
        self._windows.clear()
        self._last_index.clear()

    def save_prompts(self) -> tuple:
        """An opaque copy of every prompt, result and the undo history (for ``restore_prompts``)."""
        return dict(self._states), list(self._history)

    def restore_prompts(self, saved: tuple) -> None:
        """Put back what ``save_prompts`` returned (states are replaced, never mutated, so this is exact)."""
        states, history = saved
        self._states, self._history = dict(states), list(history)

    def prompted_slices(self) -> List[SliceKey]:
        return [k for k, s in self._states.items()
                if s.mask is not None and (s.box_xy is not None or s.points or s.pinned)]

    def slice_state(self, axis: str, index: int) -> Optional[SliceState]:
        return self._states.get((axis, index))

    def mask_volume(self) -> np.ndarray:
        """The prompted slices' masks pasted into a uint8 ``[k, j, i]`` volume."""
        self._require_volume()
        out = np.zeros(self._shape, np.uint8)
        for (axis, index), st in self._states.items():
            if st.mask is not None:
                geometry.get_slice(out, axis, index)[st.mask > 0] = 1
        return out
