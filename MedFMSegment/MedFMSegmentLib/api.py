"""The engine's front door: segment a volume from a prompts file (or ``PromptSet``), no Slicer needed.

```python
from MedFMSegmentLib import api, io
array_kji, ijk_to_ras = io.read_volume("ct.nrrd")
masks = api.segment(array_kji, ijk_to_ras, "prompts.json")          # {segment name: uint8 mask}
io.write_segmentation("out.seg.nrrd", masks, ijk_to_ras)
```

The Slicer Logic, the ``medfm`` CLI and batch mode all call :func:`segment`; it never touches a
file or a node, so callers decide where results go (and a failure leaves their data as it was).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Union

import numpy as np

from . import geometry
from . import prompts as prompts_mod
from .errors import Cancelled, InputError
from .propagate import Progress, ShouldStop, propagate, segment_roi
from .session import PromptSession

log = logging.getLogger(__name__)

AdapterLoader = Callable[[str, object], object]  # (adapter path, model) -> adapter object
# (session, axis, organ, current adapter or None, should_stop=) -> the adapter updated from the corrected slices
Adapt = Callable[[PromptSession, str, str, Optional[object]], Optional[object]]


@dataclass
class SegmentationReport:
    segments: Dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = ""
    model: str = ""
    runtime_info: Dict[str, object] = field(default_factory=dict)  # as ``medfm models`` shows it


def as_prompt_set(prompt_source, ijk_to_ras, shape) -> prompts_mod.PromptSet:
    """A ``PromptSet`` from a ``PromptSet``, a prompts file path, JSON text or a dict, resolved on a volume."""
    if isinstance(prompt_source, prompts_mod.PromptSet):
        return prompt_source
    is_json_text = isinstance(prompt_source, str) and prompt_source.lstrip().startswith("{")
    if isinstance(prompt_source, os.PathLike) or (isinstance(prompt_source, str) and not is_json_text):
        raw = prompts_mod.load_prompts(prompt_source)  # a missing file is named as such
        return prompts_mod.resolve(raw, ijk_to_ras, shape, source=str(prompt_source))
    if isinstance(prompt_source, (str, bytes, dict)):
        return prompts_mod.resolve(prompt_source, ijk_to_ras, shape)
    raise InputError(f"prompts must be a PromptSet, a dict, JSON text or an existing file, got {prompt_source!r}")


def _add_prompts(session: PromptSession, seg: prompts_mod.SegmentPrompts, info: dict) -> None:
    """The segment's boxes, points and corrected slices into the session (corrections last: they win)."""
    for box in seg.boxes:
        session.add_box(box.axis, box.index, box.box_xy)
    for p in seg.points:
        session.add_point(axis=p.axis, index=p.index, xy_slice=p.xy_slice, positive=p.positive)
    corr = seg.corrections
    if corr is not None:
        prompted, warnings = set(session.prompted_slices()), list(corr.warnings)
        for c in corr.slices:
            if (c.axis, c.index) in prompted:  # a correction is the user's last word on its slice
                warnings.append(f"segment {seg.name!r}: {c.axis} slice {c.index} is corrected and also has "
                                f"a box or points; the correction replaces them")
                log.warning(warnings[-1])
            session.set_slice_mask(c.axis, c.index, c.mask)
        info["corrections"] = corr.report()
        if warnings:
            info["warnings"] = warnings


def _adapt(session: PromptSession, seg: prompts_mod.SegmentPrompts, adapt: Adapt, info: dict,
           should_stop: ShouldStop = None) -> None:
    """Online adaptation from the segment's corrected slices (see :func:`segment_one`); sets ``session.adapter``."""
    corr = seg.corrections
    if not any(c.mask.any() for c in corr.slices):
        info["adaptation"] = {"skipped": "no corrected slice holds the structure"}
        return
    t0 = time.perf_counter()
    try:
        new = adapt(session, corr.axis, seg.name, session.adapter, should_stop=should_stop)
    except Cancelled:
        raise
    except Exception as exc:  # costs the adaptation, never the segmentation: it runs with the adapter it had
        text = f"segment {seg.name!r}: online adaptation failed ({type(exc).__name__}: {exc}); segmented without it"
        log.warning(text)
        info["adaptation"] = {"failed": f"{type(exc).__name__}: {exc}"}
        info.setdefault("warnings", []).append(text)
        return
    if new is None or new is session.adapter:
        info["adaptation"] = {"skipped": getattr(adapt, "reason", None) or "no corrected slice gave a training sample"}
        return
    session.adapter = new
    online = getattr(new, "manifest", {}).get("online", {})
    metrics = online.get("metrics") or {}
    info["adaptation"] = {"slices": online.get("samples"), "seconds": round(time.perf_counter() - t0, 2),
                          "train_dice": [metrics.get("train_dice_base"), metrics.get("train_dice_adapted")]}


def segment_one(session: PromptSession, seg: prompts_mod.SegmentPrompts, progress: Progress = None,
                should_stop: ShouldStop = None, adapt: Optional[Adapt] = None) -> tuple:
    """One segment's 3D mask from its prompts (the session is reset first). Returns (mask, info).

    ``info["review"]``: every non-corrected slice the result touches or borders as ``{"axis", "index",
    "confidence", "expected_wrong"}``, least confident first (propagated slices: ``VolumeResult.review``; ROI
    slices and unpropagated prompted slices: the model's predicted IoU, expected wrong (1 - IoU) x area); sorted
    by ``expected_wrong``, largest first, it is the engine's review order (``VolumeResult.review``: where a
    correction probably helps most); ``info["corrected"]``: the pinned slices.

    ``adapt`` (e.g. ``MedFMTrainLib.online.adapter_updater()``): when the segment's corrections allow it
    (``"adapt"``, default true) and hold the structure on at least one slice, the segment's adapter (its own, or
    none) is updated from them first and the segment is segmented with the result (``session.adapter`` is left
    set to it; ``info["adaptation"]`` says what was done).
    """
    session.reset()
    info: dict = {}
    confidence: Dict[tuple, float] = {}
    wrong: Dict[tuple, float] = {}  # expected wrong pixels (the engine's review order)
    mask = np.zeros(session.shape, np.uint8)
    if seg.roi_ijk is not None:
        r = segment_roi(session, seg.roi_ijk, axis=seg.roi_axis, progress=progress, should_stop=should_stop)
        mask |= r.mask
        info["roi"] = {"slices": len(r.scores), "stopped": r.stopped, "seconds": round(r.seconds, 2)}
        for index, score in r.scores.items():
            area = int(geometry.get_slice(r.mask, seg.roi_axis, index).sum())
            if area:
                confidence[(seg.roi_axis, int(index))] = round(float(score), 4)
                wrong[(seg.roi_axis, int(index))] = (1.0 - float(score)) * area
    corr = seg.corrections
    _add_prompts(session, seg, info)
    if adapt is not None and corr is not None and corr.adapt:
        before = session.adapter
        _adapt(session, seg, adapt, info, should_stop)
        if session.adapter is not before:  # the boxes' and points' slices decoded again, with the new adapter
            session.reset()
            _add_prompts(session, seg, {})
    if seg.boxes or seg.points or corr is not None:
        if seg.propagate:
            for axis in sorted({a for a, _ in session.prompted_slices()}):
                r = propagate(session, axis=axis, progress=progress, should_stop=should_stop)
                mask |= r.mask
                info[f"propagate_{axis}"] = {"slices": int(len(r.scores) + len(r.seeds)), "stopped": r.stopped,
                                             "seconds": round(r.seconds, 2)}
                for item in r.review:
                    key = (item["axis"], int(item["index"]))
                    confidence[key] = min(confidence.get(key, 1.0), float(item["confidence"]))
                    wrong[key] = max(wrong.get(key, 0.0), float(item.get("expected_wrong", 0.0)))
        else:
            mask |= session.mask_volume()
            for axis, index in session.prompted_slices():
                state = session.slice_state(axis, index)
                if not state.pinned and state.mask.any():
                    confidence[(axis, index)] = round(float(state.score), 4)
                    wrong[(axis, index)] = (1.0 - float(state.score)) * int((state.mask > 0).sum())
    pinned = sorted(session.pinned_slices(), key=lambda k: (geometry.AXES.index(k[0]), k[1]))
    for axis, index in pinned:  # corrected slices are exact in the result, whatever else covers them
        geometry.set_slice(mask, axis, index, session.slice_state(axis, index).mask)
        confidence.pop((axis, index), None)
    info["review"] = [{"axis": a, "index": i, "confidence": c, "expected_wrong": round(wrong.get((a, i), 0.0), 1)}
                      for (a, i), c in sorted(confidence.items(), key=lambda kv: (kv[1], kv[0][0], kv[0][1]))]
    info["corrected"] = [{"axis": a, "index": int(i)} for a, i in pinned]
    info["voxels"] = int(mask.sum())
    return mask, info


def segment(array_kji, ijk_to_ras, prompt_source, session: Optional[PromptSession] = None,
            model: str = "litemedsam", device: Optional[str] = None, preset: Optional[str] = None,
            adapter: Optional[str] = None, adapter_loader: Optional[AdapterLoader] = None,
            progress: Progress = None, should_stop: ShouldStop = None,
            report: Optional[SegmentationReport] = None, adapt: Optional[Adapt] = None) -> Dict[str, np.ndarray]:
    """Segment every segment of a prompt set; returns ``{name: uint8 mask [k, j, i]}`` in file order.

    ``adapter`` applies one adapter directory to every segment; a segment's own ``"adapter"`` wins.
    Adapters need ``adapter_loader`` (``MedFMTrainLib.store.load_adapter``): the engine does not
    import the trainer. ``adapt``: online adaptation for segments with corrected slices (see :func:`segment_one`;
    ``MedFMTrainLib.online.adapter_updater()``); the updated adapter serves that segment only.
    """
    t0 = time.perf_counter()
    if session is None:
        session = PromptSession(model=model, device=device)
    session.set_volume(array_kji, ijk_to_ras, preset=preset)
    prompt_set = as_prompt_set(prompt_source, session.ijk_to_ras, session.shape)
    if not prompt_set.segments:
        raise InputError("the prompts name no segment")
    out: Dict[str, np.ndarray] = {}
    adapters: Dict[str, object] = {}
    n = len(prompt_set.segments)
    for number, seg in enumerate(prompt_set.segments):
        path = seg.adapter or adapter
        session.adapter = None
        if path:
            if adapter_loader is None:
                raise InputError(f"segment {seg.name!r} asks for adapter {path!r} but no adapter loader was given "
                                 "(pass adapter_loader=MedFMTrainLib.store.load_adapter)")
            if path not in adapters:
                adapters[path] = adapter_loader(path, session.model)
            session.adapter = adapters[path]

        def sub_progress(fraction, message, number=number, name=seg.name):
            if progress is not None:
                progress((number + fraction) / n, f"{name}: {message}")

        base = session.adapter
        try:
            mask, info = segment_one(session, seg, sub_progress, should_stop, adapt)
        finally:
            if session.adapter is not base and hasattr(session.adapter, "detach"):
                session.adapter.detach(session.model)  # an online adapter: this segment's only
        out[seg.name] = mask
        if report is not None:
            report.segments[seg.name] = info
    session.adapter = None
    if report is not None:
        report.seconds = time.perf_counter() - t0
        report.device = str(session.model.device)
        report.model = session.model.spec.id
        report.runtime_info = session.runtime_info
    return out
