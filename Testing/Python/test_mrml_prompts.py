"""The effect's MRML adapter (MedFMSegmentLib.mrml_prompts) on slicer-core's real nodes, events and undo history."""
from __future__ import annotations

import numpy as np
import pytest

try:
    import slicer
except ImportError as exc:
    pytest.skip(f"needs slicer-core: {exc}", allow_module_level=True)

from MedFMSegmentLib import geometry, mrml, mrml_prompts
from MedFMSegmentLib.errors import InputError
from MedFMSegmentLib.interaction import PROMPTS_TAG, Interaction

SHAPE = (6, 30, 40)  # k, j, i
IJK_TO_RAS = np.array([[-0.8, 0, 0, 10.0], [0, -0.8, 0, 20.0], [0, 0, 2.0, -5.0], [0, 0, 0, 1]])


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


def _volume(scene):
    from vtk.util import numpy_support
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "vol")
    image = vtk.vtkImageData()
    image.SetDimensions(SHAPE[2], SHAPE[1], SHAPE[0])
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    values = np.arange(np.prod(SHAPE)).reshape(SHAPE) % 50
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = values.ravel()
    node.SetAndObserveImageData(image)
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, IJK_TO_RAS[r, c])
    node.SetIJKToRASMatrix(m)
    return node, values


def _segmentation(scene, volume):
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.CreateDefaultDisplayNodes()
    mask = np.zeros(SHAPE, np.uint8)
    mask[2, 5:15, 5:15] = 1
    sid = mrml.write_mask_to_segment(seg, "Liver", mask, IJK_TO_RAS, volume).segment_id
    return seg, sid, mask


def test_adapter_per_segment_is_a_tag_saved_with_the_segmentation(scene, tmp_path):
    volume, _ = _volume(scene)
    seg, liver, _ = _segmentation(scene, volume)
    other = seg.GetSegmentation().AddEmptySegment("", "Spleen")
    adapter = tmp_path / "adapters" / "liver"
    adapter.mkdir(parents=True)
    mrml_prompts.set_segment_adapter(seg, liver, adapter)
    assert mrml_prompts.segment_adapter(seg, liver) == str(adapter)
    assert mrml_prompts.segment_adapter(seg, other) is None, "the adapter belongs to one segment, not all"
    with pytest.raises(InputError, match="adapter folder not found"):
        mrml_prompts.set_segment_adapter(seg, other, tmp_path / "missing")
    with pytest.raises(InputError, match="no segment ID 'nope'"):
        mrml_prompts.segment_adapter(seg, "nope")
    path = tmp_path / "seg.seg.nrrd"
    mrml.save_node(seg, path)
    loaded = mrml.load_segmentation(scene, path)
    ids = {loaded.GetSegmentation().GetSegment(s).GetName(): s for s in loaded.GetSegmentation().GetSegmentIDs()}
    assert mrml_prompts.segment_adapter(loaded, ids["Liver"]) == str(adapter)
    assert mrml_prompts.segment_adapter(loaded, ids["Spleen"]) is None
    mrml_prompts.set_segment_adapter(seg, liver, None)
    assert mrml_prompts.segment_adapter(seg, liver) is None


def test_editor_undo_and_redo_restore_the_prompt_list_with_the_voxels(scene):
    """vtkSegmentationHistory (what Ctrl+Z / Ctrl+Y run) brings the prompt tag back with the mask."""
    volume, _ = _volume(scene)
    seg, sid, mask = _segmentation(scene, volume)
    it = Interaction()
    it.select(sid)
    it.box((5, 5, 2), (14, 14, 2), "axial")
    mrml_prompts.store_prompts(seg, sid, it.text())
    history = slicer.vtkSegmentationHistory()
    history.SetSegmentation(seg.GetSegmentation())
    history.SaveState()  # saveStateForUndo before the click's write
    click = it.click((20, 10, 2), "axial")
    wider = mask.copy()
    wider[2, 5:15, 5:25] = 1
    mrml_prompts.write_slices(seg, sid, {("axial", 2): wider[2]}, IJK_TO_RAS, volume)
    mrml_prompts.store_prompts(seg, sid, it.text())
    assert history.RestorePreviousState()  # Ctrl+Z
    assert it.load(sid, mrml_prompts.stored_prompts(seg, sid))
    assert click.id not in [p.id for p in it.prompts(sid)], "undo removed the click"
    np.testing.assert_array_equal(mrml.segment_to_mask(seg, "Liver", IJK_TO_RAS, SHAPE), mask)
    assert history.RestoreNextState()  # Ctrl+Y
    it.load(sid, mrml_prompts.stored_prompts(seg, sid))
    assert it.prompts(sid)[-1] == click
    np.testing.assert_array_equal(mrml.segment_to_mask(seg, "Liver", IJK_TO_RAS, SHAPE), wider)
    assert mrml_prompts.segment_tag(seg, sid, PROMPTS_TAG) == it.text(sid)


def test_markers_report_moved_and_deleted_points_and_boxes(scene):
    it = Interaction()
    it.select("S")
    a = it.click((10, 12, 3), "axial")
    b = it.click((20, 5, 3), "axial", shift=True)
    box = it.box((2, 2, 3), (30, 25, 3), "axial")
    moved, removed = [], []
    markers = mrml_prompts.PromptMarkers(scene, IJK_TO_RAS, on_moved=lambda pid, ijk: moved.append((pid, ijk)),
                                         on_removed=removed.append)
    markers.show(it.prompts())
    include, exclude = (scene.GetFirstNodeByName("MedFM include"), scene.GetFirstNodeByName("MedFM exclude"))
    assert (include.GetNumberOfControlPoints(), exclude.GetNumberOfControlPoints()) == (1, 1)
    assert include.GetDisplayNode().GetSelectedColor() != exclude.GetDisplayNode().GetSelectedColor()
    assert exclude.GetNthControlPointLabel(0).startswith("-")
    ras = [0.0] * 3
    include.GetNthControlPointPositionWorld(0, ras)
    np.testing.assert_allclose(geometry.ras_to_ijk(np.array(ras), IJK_TO_RAS), a.point_ijk, atol=1e-6)
    assert moved == [] and removed == [], "showing the markers reports nothing"
    assert not markers.hovered()
    include.GetDisplayNode().SetActiveComponent(include.GetDisplayNode().ComponentControlPoint, 0)  # mouse on it
    assert markers.hovered(), "the effect leaves a press on a marker to the markups widget"
    include.GetDisplayNode().SetActiveComponent(include.GetDisplayNode().ComponentNone, -1)

    target = geometry.ijk_to_ras(np.array([11.0, 13.0, 4.0]), IJK_TO_RAS)
    include.SetNthControlPointPositionWorld(0, target.tolist())  # the user drags the include point
    assert len(moved) == 1 and moved[0][0] == a.id
    np.testing.assert_allclose(moved[0][1], (11, 13, 4), atol=1e-6)
    assert it.move(*moved[0]).slice == ("axial", 4)

    exclude.RemoveNthControlPoint(0)  # the user deletes the exclude point
    scene.RemoveNode(scene.GetFirstNodeByName(f"MedFM box {box.id}"))  # and the box
    assert removed == [b.id, box.id]
    for pid in removed:
        it.remove(pid)
    assert [p.id for p in it.prompts()] == [a.id]

    markers.show(it.prompts())  # e.g. after an undo: markers follow the list, again silently
    assert include.GetNumberOfControlPoints() == 1 and exclude.GetNumberOfControlPoints() == 0
    assert removed == [b.id, box.id]
    markers.remove()
    assert scene.GetFirstNodeByName("MedFM include") is None


def test_write_slices_honours_the_editor_masking_and_reads_back(scene):
    volume, values = _volume(scene)
    seg, sid, mask = _segmentation(scene, volume)
    other = np.zeros(SHAPE, np.uint8)
    other[:, 20:30, 0:40] = 1
    mrml.write_mask_to_segment(seg, "Other", other, IJK_TO_RAS, volume)
    editor = slicer.vtkMRMLSegmentEditorNode()  # not registered in a bare scene: added by hand, as test_mrml does
    scene.AddNode(editor)
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    editor.SetOverwriteMode(editor.OverwriteNone)
    editor.SourceVolumeIntensityMaskOn()
    editor.SetSourceVolumeIntensityMaskRange(0, 40)
    new = np.zeros(SHAPE[1:], np.uint8)
    new[10:28, 10:30] = 1  # overlaps Other (rows 20..27)
    state = mrml_prompts.write_slices(seg, sid, {("axial", 3): new}, IJK_TO_RAS, volume, editor, values)
    assert state is not None and state.changed_voxels > 0
    got = mrml_prompts.slice_mask_from_segment(seg, sid, IJK_TO_RAS, SHAPE, "axial", 3)
    expected = new.astype(bool) & (other[3] == 0) & (values[3] <= 40)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(mrml.segment_to_mask(seg, "Other", IJK_TO_RAS, SHAPE), other)
    np.testing.assert_array_equal(mrml_prompts.slice_mask_from_segment(seg, sid, IJK_TO_RAS, SHAPE, "axial", 2),
                                  mask[2]), "other slices stay as they are"
    sagittal = mrml_prompts.slice_mask_from_segment(seg, sid, IJK_TO_RAS, SHAPE, "sagittal", 12)
    np.testing.assert_array_equal(sagittal, geometry.get_slice(mrml.segment_to_mask(seg, "Liver", IJK_TO_RAS, SHAPE),
                                                               "sagittal", 12))
    with pytest.raises(InputError, match="shape"):
        mrml_prompts.write_slices(seg, sid, {("axial", 3): new[:5]}, IJK_TO_RAS, volume)
