"""The "MedFM" Segment Editor effect: boxes and clicks in the slice views, propagation, slice corrections.

Wiring only. What a click, drag, key or undo means is decided by ``MedFMSegmentLib.interaction``
(plain Python, unit-tested); markers, segment tags and slice writes by ``MedFMSegmentLib.mrml_prompts``
(tested on slicer-core); model work by ``MedFMSegment.MedFMSegmentLogic`` (its worker and GIL-releasing
wait: ``MedFMSegmentLib.worker``). Registered by the MedFM Segment module at ``startupCompleted()``.
"""
import logging
import os

import qt
import slicer
import vtk
from slicer.i18n import tr as _

from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from MedFMSegmentLib import mrml, mrml_prompts
from MedFMSegmentLib.errors import Cancelled
from MedFMSegmentLib.interaction import Interaction, view_axis_and_index

log = logging.getLogger("MedFMSegment")

DRAG_PIXELS = 5  # a press-move-release shorter than this is a click
# (key, action, tooltip); shown in the help text and on the buttons.
KEYS = (
    ("P", "propagate", "Propagate the prompted slices through the volume (3D)"),
    ("R", "repropagate", "Re-propagate from the slice under the mouse, keeping the rest of the segment"),
    ("A", "accept", "Accept the slice under the mouse as corrected (after editing it with any effect)"),
    ("N", "next", "Jump to the next slice to review (least confident first)"),
    ("T", "polarity", "Toggle the polarity of plain clicks (include / exclude)"),
    ("C", "clear", "Clear the prompts of the selected segment"),
    ("Escape", "cancel", "Cancel the running MedFM job"),
)


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Left click = include point, Shift + left click = exclude point, left drag = box; see KEYS."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "MedFM"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.interaction = Interaction()
        self.logic = None
        self.markers = None
        self._press = None  # (xy, shift, viewWidget) of a left-button press
        self._view = None  # the slice widget last under the mouse
        self._shortcuts = []
        self._sceneObservation = None
        self._segmentationObservation = None  # (vtkSegmentation, tag)
        self._writing = False
        self._job = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        keys = "".join(f"<li><b>{key}</b>: {_(tip)}</li>" for key, _action, tip in KEYS)
        return (_("<p>Segment the selected segment with a medical foundation model (MedFM).</p>"
                  "<ul><li><b>Left drag</b>: box around the structure</li>"
                  "<li><b>Left click</b>: include point; <b>Shift + left click</b>: exclude point</li>")
                + keys + _("<li><b>Ctrl+Z / Ctrl+Y</b>: the Segment Editor's undo / redo (prompts follow)</li></ul>"
                           "<p>The view you click in decides the slicing axis. Model, device and adapters: "
                           "MedFM Segment module.</p>"))

    # ------------------------------------------------------------------ options
    def setupOptionsFrame(self):
        self.statusLabel = qt.QLabel(_("Drag a box or click in a slice view."))
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self.buttons = {}
        grid = qt.QGridLayout()
        for n, (key, action, tip) in enumerate(KEYS):
            button = qt.QPushButton(f"{_(action.capitalize())} ({key})")
            button.objectName = f"MedFM{action.capitalize()}Button"
            button.toolTip = _("{tip} [key {key}]").format(tip=_(tip), key=key)
            button.connect("clicked(bool)", lambda checked=False, action=action: self.onAction(action))
            grid.addWidget(button, n // 3, n % 3)
            self.buttons[action] = button
        self.scriptedEffect.addOptionsWidget(grid)
        self.progressBar = qt.QProgressBar()
        self.progressBar.visible = False
        self.scriptedEffect.addOptionsWidget(self.progressBar)

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor

    def setMRMLDefaults(self):
        pass

    def updateGUIFromMRML(self):
        self._selectSegment()

    def updateMRMLFromGUI(self):
        pass

    # ------------------------------------------------------------ activation
    def activate(self):
        import MedFMSegment

        self.logic = MedFMSegment.MedFMSegmentLogic()
        self.logic.configureFromParameterNode()
        for key, action, _tip in KEYS:
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.connect("activated()", lambda action=action: self.onAction(action))
            self._shortcuts.append(shortcut)
        scene = slicer.mrmlScene
        self._sceneObservation = scene.AddObserver(scene.StartCloseEvent, self._onSceneClose)
        self._selectSegment()

    def deactivate(self):
        self._cancel()
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
            shortcut.deleteLater()
        self._shortcuts = []
        self._unobserve()
        if self.markers is not None:
            self.markers.remove()
            self.markers = None
        if self.logic is not None:
            self.logic.shutdown()
            self.logic = None

    def cleanup(self):
        self.deactivate()

    def _unobserve(self):
        if self._sceneObservation is not None:
            slicer.mrmlScene.RemoveObserver(self._sceneObservation)
            self._sceneObservation = None
        self._observeSegmentation(None)

    def _observeSegmentation(self, segmentationNode):
        segmentation = segmentationNode.GetSegmentation() if segmentationNode is not None else None
        if self._segmentationObservation is not None:
            if self._segmentationObservation[0] is segmentation:
                return
            self._segmentationObservation[0].RemoveObserver(self._segmentationObservation[1])
            self._segmentationObservation = None
        if segmentation is not None:
            tag = segmentation.AddObserver(slicer.vtkSegmentation.SegmentModified, self._onSegmentModified)
            self._segmentationObservation = (segmentation, tag)

    # ------------------------------------------------------ nodes and segment
    def _nodes(self):
        editor = self.scriptedEffect.parameterSetNode()
        if editor is None:
            return None, None, None, None
        getter = getattr(editor, "GetSourceVolumeNode", None) or editor.GetMasterVolumeNode
        return editor, getter(), editor.GetSegmentationNode(), editor.GetSelectedSegmentID()

    def _selectSegment(self):
        """Follow the editor's selected segment: its prompt list and markers."""
        if self.logic is None:
            return
        editor, volume, segmentation, segmentId = self._nodes()
        if segmentation is None or volume is None or not segmentId:
            self.interaction.select(None)
            self._observeSegmentation(None)
            return
        self._observeSegmentation(segmentation)
        if segmentId != self.interaction.segment_id:
            self.interaction.select(segmentId)
            self.interaction.load(segmentId, mrml_prompts.stored_prompts(segmentation, segmentId))
        ijk_to_ras, _shape = mrml.volume_geometry(volume)
        if self.markers is None or not (self.markers.ijk_to_ras == ijk_to_ras).all():
            if self.markers is not None:
                self.markers.remove()
            self.markers = mrml_prompts.PromptMarkers(slicer.mrmlScene, ijk_to_ras, on_moved=self._onMoved,
                                                      on_removed=self._onRemoved)
        self.markers.show(self.interaction.prompts())

    def _onSegmentModified(self, caller=None, event=None):
        """Undo / redo (or a scene load) changed the segment: its stored prompt list is the truth."""
        if self._writing or self.interaction.segment_id is None:
            return
        _editor, _volume, segmentation, segmentId = self._nodes()
        if segmentation is None or segmentId != self.interaction.segment_id:
            return
        try:
            if self.interaction.load(segmentId, mrml_prompts.stored_prompts(segmentation, segmentId)):
                self.markers.show(self.interaction.prompts())
        except Exception as exc:  # a hand-edited tag: say so, keep going
            log.warning("MedFM: %s", exc)

    def _onMoved(self, promptId, point_ijk):
        self._change(lambda: self.interaction.move(promptId, point_ijk))

    def _onRemoved(self, promptId):
        self._change(lambda: self.interaction.remove(promptId))

    def _onSceneClose(self, caller=None, event=None):
        self._cancel()
        self.interaction.forget()
        if self.markers is not None:
            self.markers.remove()
            self.markers = None

    # ------------------------------------------------------------ interaction
    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        self._view = viewWidget
        if eventId == vtk.vtkCommand.LeftButtonPressEvent and self.markers is not None and self.markers.hovered():
            return False  # on a marker: the markups widget drags or deletes it, PromptMarkers reports it
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            self._press = (tuple(callerInteractor.GetEventPosition()), bool(callerInteractor.GetShiftKey()), viewWidget)
            return True
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent and self._press is not None:
            (x0, y0), shift, pressView = self._press
            self._press = None
            x1, y1 = callerInteractor.GetEventPosition()
            if pressView is viewWidget:
                if max(abs(x1 - x0), abs(y1 - y0)) >= DRAG_PIXELS:
                    self._change(lambda: self._addBox((x0, y0), (x1, y1), viewWidget))
                else:
                    self._change(lambda: self._addClick((x1, y1), shift, viewWidget))
            return True
        return False

    def _viewSlice(self, viewWidget):
        """(axis, index, ijk_to_ras) of the volume slice a view shows (oblique: the nearest IJK axis)."""
        if viewWidget is None:
            raise ValueError(_("move the mouse over a slice view first"))
        _editor, volume, _seg, _sid = self._nodes()
        ijk_to_ras, shape = mrml.volume_geometry(volume)
        sliceNode = viewWidget.sliceLogic().GetSliceNode()
        axis, index = view_axis_and_index(slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS()), ijk_to_ras,
                                          shape, sliceNode.GetName())
        return axis, index, ijk_to_ras

    def _ijk(self, xy, viewWidget, ijk_to_ras):
        from MedFMSegmentLib import geometry

        return geometry.ras_to_ijk(self.xyToRas(xy, viewWidget), ijk_to_ras)

    def _addClick(self, xy, shift, viewWidget):
        axis, _index, ijk_to_ras = self._viewSlice(viewWidget)
        self.interaction.click(self._ijk(xy, viewWidget, ijk_to_ras), axis, shift=shift)

    def _addBox(self, xy0, xy1, viewWidget):
        axis, index, ijk_to_ras = self._viewSlice(viewWidget)
        self.interaction.box(self._ijk(xy0, viewWidget, ijk_to_ras), self._ijk(xy1, viewWidget, ijk_to_ras), axis,
                             index)

    def _change(self, change):
        """Change the prompt list, show it, and ask for the work (queued while a job runs)."""
        try:
            change()
        except Exception as exc:
            self.statusLabel.text = str(exc)
            return
        if self.markers is not None:
            self.markers.show(self.interaction.prompts())
        self._request("segment")

    # ---------------------------------------------------------------- actions
    def onAction(self, action):
        if action == "polarity":
            positive = self.interaction.toggle_polarity()
            self.statusLabel.text = _("Plain clicks include") if positive else _("Plain clicks exclude")
        elif action == "clear":  # the prompts go, the segment's voxels stay (the stored list is emptied)
            self._change(lambda: (self.interaction.clear(), self.interaction.mark_written()))
        elif action == "cancel":
            self._cancel()
        elif action == "next":
            self._jumpToNextReview()
        else:
            self._request(action)

    def _request(self, what):
        if self.interaction.request(what):
            qt.QTimer.singleShot(0, lambda: self._run(what))  # leave the VTK / shortcut handler first
        else:
            self.statusLabel.text = _("Queued: {what}").format(what=_(what))

    def _run(self, what):
        """Run requests until the queue is empty; every error is shown once, none escapes the timer slot."""
        while what is not None:
            try:
                self._runOne(what)
            except Cancelled:
                self.statusLabel.text = _("Cancelled: the segment is unchanged")
                self.interaction.cancel_queue()
                return
            except Exception as exc:
                log.exception("MedFM %s failed", what)
                self.statusLabel.text = _("{what} failed").format(what=_(what))
                slicer.util.errorDisplay(_("MedFM: {what} failed:\n{error}").format(what=_(what), error=exc))
            what = self.interaction.finished()

    def _runOne(self, what):
        editor, volume, segmentation, segmentId = self._nodes()
        if volume is None or segmentation is None or not segmentId:
            raise ValueError(_("choose a source volume and select a segment first"))
        segmentName = segmentation.GetSegmentation().GetSegment(segmentId).GetName()
        if what == "segment":
            job = self.logic.applyPrompts(volume, segmentation, segmentId, self.interaction, editor,
                                          beforeWrite=self._beforeWrite, wait=False)
        elif what in ("propagate", "repropagate"):
            fromIndex = None
            axis = self._lastAxis()
            if what == "repropagate":
                axis, fromIndex, _m = self._viewSlice(self._view)
            job = self.logic.propagate(volume, segmentation, segmentName, axis=axis, fromIndex=fromIndex,
                                       editorNode=editor, beforeWrite=self._beforeWrite, wait=False)
        elif what == "accept":
            axis, index, _m = self._viewSlice(self._view)
            job = self.logic.acceptSlice(volume, segmentation, segmentId, axis, index, wait=False)
        else:
            raise ValueError(what)
        self._job = job
        self.progressBar.visible = True
        self.statusLabel.text = job.description + "..."
        try:
            self.logic.waitForJob(job, pump=self._pump)
            job.finish()
        finally:
            self._job = None
            self._writing = False
            self.progressBar.visible = False
        self.statusLabel.text = job.description + ": " + _("done")

    def _pump(self):
        job = self._job
        if job is not None:
            self.progressBar.value = int(round(100 * job.fraction))
        slicer.app.processEvents()

    def _beforeWrite(self):
        """Right before MedFM writes: one undo state for the editor's Ctrl+Z (prompt list included)."""
        self.scriptedEffect.saveStateForUndo()
        self._writing = True

    def _lastAxis(self):
        prompts = self.interaction.prompts()
        return prompts[-1].axis if prompts else None

    def _cancel(self):
        self.interaction.cancel_queue()
        if self._job is not None:
            self._job.cancel()

    def _jumpToNextReview(self):
        editor, volume, segmentation, segmentId = self._nodes()
        target = self.logic.nextReviewSlice(volume) if volume is not None else None
        if target is None:
            self.statusLabel.text = _("Nothing to review: propagate first")
            return
        axis, index, confidence = target
        from MedFMSegmentLib import geometry

        ijk_to_ras, shape = mrml.volume_geometry(volume)
        centre = [(s - 1) / 2 for s in shape[::-1]]  # i, j, k
        centre[{"sagittal": 0, "coronal": 1, "axial": 2}[axis]] = index
        ras = geometry.ijk_to_ras(centre, ijk_to_ras)
        slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, *ras, slicer.vtkMRMLSliceNode.OffsetJumpSlice)
        self.statusLabel.text = _("Review {axis} slice {index} (confidence {confidence:.2f}): correct it, then A").format(
            axis=axis, index=index, confidence=confidence)
