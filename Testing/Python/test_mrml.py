"""Tests of the MRML layer (MedFMSegmentLib.mrml) on real vtkMRMLScene scenes (slicer-core, headless)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

try:
    import slicer
    import vtk
    from vtk.util import numpy_support
except ImportError as exc:  # not only ModuleNotFoundError: a broken install must skip too
    pytest.skip(f"MRML layer tests need slicer-core or the Slicer app: {exc}", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "MedFMSegment") not in sys.path:  # until the shared conftest sets the path
    sys.path.insert(0, str(REPO / "MedFMSegment"))

from MedFMSegmentLib import geometry, mrml  # noqa: E402
from MedFMSegmentLib.errors import InputError  # noqa: E402

DATA = REPO / ".." / "shared" / "data"


# ----------------------------------------------------------------------------------------------------
# helpers


def rotation(axis, angle) -> np.ndarray:
    axis = np.asarray(axis, dtype=float)
    axis = axis / np.linalg.norm(axis)
    x, y, z = axis
    c, s = np.cos(angle), np.sin(angle)
    return np.array([
        [c + x * x * (1 - c), x * y * (1 - c) - z * s, x * z * (1 - c) + y * s],
        [y * x * (1 - c) + z * s, c + y * y * (1 - c), y * z * (1 - c) - x * s],
        [z * x * (1 - c) - y * s, z * y * (1 - c) + x * s, c + z * z * (1 - c)],
    ])


def matrix(linear, origin) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = origin
    return m


GRIDS = {
    "oblique": matrix(rotation((1, 2, 3), 0.4) @ np.diag([0.7, 1.3, 2.5]), (-20.0, 35.0, 12.5)),
    "flipped": matrix(np.diag([-0.9, -0.8, 1.6]), (100.0, 120.0, -40.0)),
    "anisotropic": matrix(np.diag([0.5, 0.5, 3.0]), (-30.0, -25.0, 10.0)),
}
SHAPE = (9, 14, 17)  # k, j, i


def to_vtk(m) -> "vtk.vtkMatrix4x4":
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r][c]))
    return out


def from_vtk(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def make_volume(scene, array_kji, ijk_to_ras, name="vol", node_class=None):
    node = (node_class or slicer.vtkMRMLScalarVolumeNode)()
    node.SetName(name)
    scene.AddNode(node)
    image = vtk.vtkImageData()
    nk, nj, ni = array_kji.shape[:3]
    image.SetDimensions(ni, nj, nk)
    flat = array_kji.reshape(nk * nj * ni, -1) if array_kji.ndim == 4 else array_kji.ravel()
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(flat), deep=True))
    node.SetIJKToRASMatrix(to_vtk(ijk_to_ras))
    node.SetAndObserveImageData(image)
    return node


def make_transform(scene, m):
    node = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(node)
    node.SetMatrixTransformToParent(to_vtk(m))
    return node


def new_segmentation(scene, name="seg"):
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(name)
    scene.AddNode(node)
    return node


def ellipsoid(shape, center_kji, radii_kji) -> np.ndarray:
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    d = sum(((g - c) / r) ** 2 for g, c, r in zip((k, j, i), center_kji, radii_kji))
    return (d <= 1.0).astype(np.uint8)


def snapshot(seg_node, ijk_to_ras, shape):
    segmentation = seg_node.GetSegmentation()
    names = {sid: segmentation.GetSegment(sid).GetName() for sid in segmentation.GetSegmentIDs()}
    return {sid: (name, mrml.segment_to_mask(seg_node, name, ijk_to_ras, shape)) for sid, name in names.items()}


def assert_same_snapshot(a, b):
    assert list(a) == list(b)
    for sid in a:
        assert a[sid][0] == b[sid][0]
        np.testing.assert_array_equal(a[sid][1], b[sid][1])


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture(params=sorted(GRIDS))
def grid(request):
    return request.param, GRIDS[request.param]


# ----------------------------------------------------------------------------------------------------
# volumes


@pytest.mark.parametrize("extension", [".nrrd", ".nii.gz"])
def test_volume_round_trip_through_file_keeps_voxels_and_geometry(scene, grid, tmp_path, extension):
    name, ijk_to_ras = grid
    data = np.random.default_rng(1).integers(-1000, 2000, size=SHAPE).astype(np.int16)
    node = make_volume(scene, data, ijk_to_ras)
    path = tmp_path / f"{name}{extension}"
    mrml.save_node(node, path)
    assert path.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".medfm-")]
    loaded = mrml.load_volume(scene, path)
    array_kji, loaded_ijk_to_ras = mrml.volume_to_array(loaded)
    assert array_kji.dtype == np.int16 and array_kji.shape == SHAPE
    np.testing.assert_array_equal(array_kji, data)
    np.testing.assert_allclose(loaded_ijk_to_ras, ijk_to_ras, atol=1e-4)


def test_volume_to_array_is_a_copy_and_matches_the_node_matrix(scene, grid):
    _, ijk_to_ras = grid
    data = np.zeros(SHAPE, dtype=np.float32)
    voxel_ijk = (11, 3, 6)
    data[voxel_ijk[2], voxel_ijk[1], voxel_ijk[0]] = 7.0
    node = make_volume(scene, data, ijk_to_ras)
    array_kji, got = mrml.volume_to_array(node)
    assert array_kji[voxel_ijk[::-1]] == 7.0
    array_kji[...] = 0
    assert mrml.volume_to_array(node)[0][voxel_ijk[::-1]] == 7.0  # the node's voxels were not touched
    # The voxel's RAS position computed independently from the node's own matrix maps back to it.
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ras = m.MultiplyPoint((*voxel_ijk, 1.0))[:3]
    np.testing.assert_allclose(geometry.ras_to_ijk(ras, got), voxel_ijk, atol=1e-6)


def test_points_and_volume_under_parent_transforms_meet_at_the_right_voxel(scene, grid):
    _, ijk_to_ras = grid
    node = make_volume(scene, np.zeros(SHAPE, np.int16), ijk_to_ras)
    volume_transform = make_transform(scene, matrix(rotation((0, 1, 1), -0.7), (5.0, -8.0, 13.0)))
    node.SetAndObserveTransformNodeID(volume_transform.GetID())
    voxel_ijk = (2, 12, 7)
    local = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(local)
    world = [0.0, 0.0, 0.0]
    node.TransformPointToWorld(local.MultiplyPoint((*voxel_ijk, 1.0))[:3], world)

    points = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(points)
    points_transform = make_transform(scene, matrix(rotation((1, 0, 0), 0.3), (-3.0, 2.0, 1.0)))
    points.SetAndObserveTransformNodeID(points_transform.GetID())
    points.AddControlPointWorld(vtk.vtkVector3d(*world), "p")

    _, got_ijk_to_ras = mrml.volume_to_array(node)
    [(position_ras, positive)] = mrml.markups_to_points_ras(points)
    assert positive
    np.testing.assert_allclose(position_ras, world, atol=1e-6)
    np.testing.assert_allclose(geometry.ras_to_ijk(position_ras, got_ijk_to_ras), voxel_ijk, atol=1e-6)
    # Without the transform the same world point is elsewhere: the transform really was applied.
    assert not np.allclose(geometry.ras_to_ijk(position_ras, ijk_to_ras), voxel_ijk, atol=0.5)


def test_non_linear_parent_transform_is_refused(scene):
    node = make_volume(scene, np.zeros(SHAPE, np.int16), GRIDS["oblique"])
    grid_transform = slicer.vtkMRMLGridTransformNode()
    scene.AddNode(grid_transform)
    node.SetAndObserveTransformNodeID(grid_transform.GetID())
    with pytest.raises(InputError, match="non-linear"):
        mrml.volume_to_array(node)


def test_vector_volume_is_refused(scene):
    rgb = np.zeros(SHAPE + (3,), dtype=np.uint8)
    node = make_volume(scene, rgb, GRIDS["anisotropic"], node_class=slicer.vtkMRMLVectorVolumeNode)
    with pytest.raises(InputError, match="Vector"):
        mrml.volume_to_array(node)
    # A multi-component image hidden in a scalar volume node is refused too.
    scalar_node = make_volume(scene, rgb, GRIDS["anisotropic"])
    with pytest.raises(InputError, match="3 components"):
        mrml.volume_to_array(scalar_node)


# ----------------------------------------------------------------------------------------------------
# markups


def test_markups_sign_convention(scene):
    include = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(include)
    include.AddControlPoint(vtk.vtkVector3d(1, 2, 3), "F-1")
    include.AddControlPoint(vtk.vtkVector3d(4, 5, 6), "-background")
    include.AddControlPoint(vtk.vtkVector3d(7, 8, 9), "+lesion")
    include.AddControlPoint(vtk.vtkVector3d(0, 0, 0), "unplaced")
    include.UnsetNthControlPointPosition(3)
    include.AddControlPoint(vtk.vtkVector3d(0, 0, 0), "skipped")
    include.SetNthControlPointPositionMissing(4)
    got = mrml.markups_to_points_ras(include)
    assert [p for _, p in got] == [True, False, True]
    np.testing.assert_allclose([x for x, _ in got], [[1, 2, 3], [4, 5, 6], [7, 8, 9]])

    exclude = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(exclude)
    exclude.SetAttribute(mrml.POSITIVE_ATTRIBUTE, "false")
    exclude.AddControlPoint(vtk.vtkVector3d(1, 1, 1), "E-1")
    exclude.AddControlPoint(vtk.vtkVector3d(2, 2, 2), "+keep")
    assert [p for _, p in mrml.markups_to_points_ras(exclude)] == [False, True]
    with pytest.raises(InputError, match="markups"):
        mrml.markups_to_points_ras(make_volume(scene, np.zeros(SHAPE, np.int16), GRIDS["flipped"]))


def test_roi_under_parent_transform_gives_world_corners(scene):
    roi = slicer.vtkMRMLMarkupsROINode()
    scene.AddNode(roi)
    roi.SetCenter(10.0, 20.0, 30.0)
    roi.SetSize(4.0, 6.0, 8.0)
    # 90 degrees about S then a shift: (x, y, z) -> (-y, x, z) + t, so the world box is known exactly.
    transform = make_transform(scene, matrix([[0, -1, 0], [1, 0, 0], [0, 0, 1]], (1.0, 2.0, 3.0)))
    roi.SetAndObserveTransformNodeID(transform.GetID())
    corner0, corner1 = mrml.roi_to_corners_ras(roi)
    np.testing.assert_allclose(corner0, [-23 + 1, 8 + 2, 26 + 3], atol=1e-9)
    np.testing.assert_allclose(corner1, [-17 + 1, 12 + 2, 34 + 3], atol=1e-9)
    # The same box on a flipped volume grid, in IJK, contains exactly the mapped corners.
    ijk_to_ras = GRIDS["flipped"]
    c0_ijk, c1_ijk = mrml.roi_to_box_ijk(roi, ijk_to_ras)
    expected = geometry.ras_to_ijk(np.array([corner0, corner1]), ijk_to_ras)
    np.testing.assert_allclose(c0_ijk, expected.min(axis=0), atol=1e-9)
    np.testing.assert_allclose(c1_ijk, expected.max(axis=0), atol=1e-9)

    unplaced = slicer.vtkMRMLMarkupsROINode()
    scene.AddNode(unplaced)
    with pytest.raises(InputError, match="not placed"):
        mrml.roi_to_corners_ras(unplaced)


# ----------------------------------------------------------------------------------------------------
# segments


def test_write_creates_segment_on_oblique_grid_and_reads_back(scene, grid, tmp_path):
    name, ijk_to_ras = grid
    volume = make_volume(scene, np.zeros(SHAPE, np.int16), ijk_to_ras)
    seg = new_segmentation(scene)
    mask = ellipsoid(SHAPE, (4, 6, 9), (3, 4, 5))
    state = mrml.write_mask_to_segment(seg, "tumor", mask, ijk_to_ras, reference_volume_node=volume, color=(1, 0, 0))
    assert state.created and state.changed_voxels == int(mask.sum())
    assert state.extent_kji == geometry.bbox_kji(mask)
    np.testing.assert_array_equal(mrml.segment_to_mask(seg, "tumor", ijk_to_ras, SHAPE), mask)
    segment = seg.GetSegmentation().GetSegment(state.segment_id)
    assert segment.GetName() == "tumor" and segment.GetColor() == (1.0, 0.0, 0.0)
    # The empty segmentation took the volume's geometry as its reference geometry.
    reference = slicer.vtkOrientedImageData()
    geometry_string = seg.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry_string, reference, False)
    m = vtk.vtkMatrix4x4()
    reference.GetImageToWorldMatrix(m)
    np.testing.assert_allclose(from_vtk(m), ijk_to_ras, atol=1e-6)
    assert reference.GetExtent() == (0, SHAPE[2] - 1, 0, SHAPE[1] - 1, 0, SHAPE[0] - 1)

    # .seg.nrrd round trip keeps voxels and geometry.
    path = tmp_path / f"{name}.seg.nrrd"
    mrml.save_node(seg, path)
    loaded = mrml.load_segmentation(scene, path)
    np.testing.assert_array_equal(mrml.segment_to_mask(loaded, "tumor", ijk_to_ras, SHAPE), mask)
    labelmap = loaded.GetSegmentation().GetSegment(state.segment_id).GetRepresentation("Binary labelmap")
    labelmap.GetImageToWorldMatrix(m)
    np.testing.assert_allclose(from_vtk(m)[:3, :3], ijk_to_ras[:3, :3], atol=1e-6)

    # Undo removes the created segment.
    mrml.restore_segment(seg, state)
    assert seg.GetSegmentation().GetNumberOfSegments() == 0


def test_modes_editable_mask_and_exact_restore(scene):
    ijk_to_ras = GRIDS["oblique"]
    seg = new_segmentation(scene)
    first = ellipsoid(SHAPE, (4, 6, 8), (3, 4, 4))
    second = ellipsoid(SHAPE, (5, 8, 10), (3, 4, 5))
    s1 = mrml.write_mask_to_segment(seg, "organ", first, ijk_to_ras)
    read = lambda: mrml.segment_to_mask(seg, "organ", ijk_to_ras, SHAPE)  # noqa: E731

    s2 = mrml.write_mask_to_segment(seg, "organ", second, ijk_to_ras, mode="union")
    np.testing.assert_array_equal(read(), first | second)
    assert not s2.created and s2.changed_voxels == int((second & ~first).sum())
    s3 = mrml.write_mask_to_segment(seg, "organ", first, ijk_to_ras, mode="subtract")
    np.testing.assert_array_equal(read(), second & ~first)
    editable = np.zeros(SHAPE, np.uint8)
    editable[:, :, :9] = 1
    s4 = mrml.write_mask_to_segment(seg, "organ", first, ijk_to_ras, mode="replace", editable_mask=editable)
    expected = np.where(editable > 0, first, second & ~first)
    np.testing.assert_array_equal(read(), expected)
    assert s4.extent_kji[1][2] <= 8  # nothing changed outside the editable columns

    mrml.restore_segment(seg, s4)
    np.testing.assert_array_equal(read(), second & ~first)
    mrml.restore_segment(seg, s3)
    np.testing.assert_array_equal(read(), first | second)
    mrml.restore_segment(seg, s2)
    np.testing.assert_array_equal(read(), first)
    mrml.restore_segment(seg, s1)
    assert seg.GetSegmentation().GetNumberOfSegments() == 0


@pytest.mark.parametrize("overwrite", [False, True])
def test_overwrite_others_and_restore(scene, overwrite):
    ijk_to_ras = GRIDS["flipped"]
    seg = new_segmentation(scene)
    a = ellipsoid(SHAPE, (4, 5, 5), (3, 3, 4))
    b = ellipsoid(SHAPE, (4, 9, 12), (3, 3, 4))
    far = np.zeros(SHAPE, np.uint8)
    far[0:2, 0:2, 14:17] = 1
    for name, mask in (("A", a), ("B", b), ("far", far)):
        mrml.write_mask_to_segment(seg, name, mask, ijk_to_ras)
    assert seg.GetSegmentation().GetNumberOfLayers() == 1  # non-overlapping segments share one labelmap
    before = snapshot(seg, ijk_to_ras, SHAPE)
    grown = ellipsoid(SHAPE, (4, 7, 8), (3, 4, 6))  # overlaps B
    assert (grown & b).any()
    state = mrml.write_mask_to_segment(seg, "A", grown, ijk_to_ras, overwrite_others=overwrite)
    np.testing.assert_array_equal(mrml.segment_to_mask(seg, "A", ijk_to_ras, SHAPE), grown)
    expected_b = b & ~grown if overwrite else b
    np.testing.assert_array_equal(mrml.segment_to_mask(seg, "B", ijk_to_ras, SHAPE), expected_b)
    np.testing.assert_array_equal(mrml.segment_to_mask(seg, "far", ijk_to_ras, SHAPE), far)
    assert state.overwritten == (["B"] if overwrite else [])
    mrml.restore_segment(seg, state)
    assert_same_snapshot(before, snapshot(seg, ijk_to_ras, SHAPE))


def test_overwrite_restricted_to_named_segments(scene):
    ijk_to_ras = GRIDS["anisotropic"]
    seg = new_segmentation(scene)
    b = ellipsoid(SHAPE, (4, 7, 4), (2, 2, 3))
    c = ellipsoid(SHAPE, (4, 7, 12), (2, 2, 3))
    mrml.write_mask_to_segment(seg, "B", b, ijk_to_ras)
    mrml.write_mask_to_segment(seg, "C", c, ijk_to_ras)
    band = np.zeros(SHAPE, np.uint8)
    band[3:6, 6:9, :] = 1
    mrml.write_mask_to_segment(seg, "A", band, ijk_to_ras, overwrite_others=["C"])
    np.testing.assert_array_equal(mrml.segment_to_mask(seg, "B", ijk_to_ras, SHAPE), b)
    np.testing.assert_array_equal(mrml.segment_to_mask(seg, "C", ijk_to_ras, SHAPE), c & ~band)
    with pytest.raises(InputError, match="unknown segment"):
        mrml.write_mask_to_segment(seg, "A", band, ijk_to_ras, overwrite_others=["nope"])


def test_editor_settings_follow_segment_editor_rules(scene):
    ijk_to_ras = GRIDS["anisotropic"]
    seg = new_segmentation(scene)
    seg.CreateDefaultDisplayNodes()
    a = ellipsoid(SHAPE, (4, 7, 4), (2, 3, 3))
    b = ellipsoid(SHAPE, (4, 7, 12), (2, 3, 3))
    target = ellipsoid(SHAPE, (4, 3, 8), (2, 2, 2))
    ids = {name: mrml.write_mask_to_segment(seg, name, m, ijk_to_ras).segment_id
           for name, m in (("A", a), ("B", b), ("T", target))}
    seg.GetDisplayNode().SetSegmentVisibility(ids["B"], False)
    editor = slicer.vtkMRMLSegmentEditorNode()
    scene.AddNode(editor)
    source = np.arange(np.prod(SHAPE)).reshape(SHAPE) % 100

    editor.SetOverwriteMode(editor.OverwriteNone)
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
    assert mrml.editor_settings(editor, seg, "T", ijk_to_ras, SHAPE) == (False, None)

    editor.SetOverwriteMode(editor.OverwriteVisibleSegments)
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideVisibleSegments)
    overwrite, editable = mrml.editor_settings(editor, seg, "T", ijk_to_ras, SHAPE)
    assert overwrite == [ids["A"]]  # B is hidden, T is the edited segment
    np.testing.assert_array_equal(editable, 1 - a)  # the edited segment itself stays editable

    editor.SetOverwriteMode(editor.OverwriteAllSegments)
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideAllSegments)
    editor.SourceVolumeIntensityMaskOn()
    editor.SetSourceVolumeIntensityMaskRange(20, 60)
    overwrite, editable = mrml.editor_settings(editor, seg, "T", ijk_to_ras, SHAPE, source_array_kji=source)
    assert overwrite is True
    np.testing.assert_array_equal(editable, (a | b | target) & (source >= 20) & (source <= 60))
    with pytest.raises(InputError, match="intensity range"):
        mrml.editor_settings(editor, seg, "T", ijk_to_ras, SHAPE)


def test_only_the_changed_extent_is_written(scene, monkeypatch):
    ijk_to_ras = GRIDS["oblique"]
    seg = new_segmentation(scene)
    other = ellipsoid(SHAPE, (4, 3, 3), (2, 2, 2))
    base = ellipsoid(SHAPE, (4, 8, 10), (3, 4, 5))
    mrml.write_mask_to_segment(seg, "other", other, ijk_to_ras)
    mrml.write_mask_to_segment(seg, "target", base, ijk_to_ras)
    before = snapshot(seg, ijk_to_ras, SHAPE)

    logic = slicer.vtkSlicerSegmentationsModuleLogic
    written = []

    class Recorder:
        MODE_REPLACE, MODE_MERGE_MAX = logic.MODE_REPLACE, logic.MODE_MERGE_MAX
        MODE_MERGE_MIN, MODE_MERGE_MASK = logic.MODE_MERGE_MIN, logic.MODE_MERGE_MASK

        @staticmethod
        def SetBinaryLabelmapToSegment(image, *args):
            written.append((image.GetExtent(), tuple(args[3])))
            return logic.SetBinaryLabelmapToSegment(image, *args)

    monkeypatch.setattr(slicer, "vtkSlicerSegmentationsModuleLogic", Recorder)
    edited = base.copy()
    edited[3:5, 6:8, 12:15] = 0  # a small bite out of the segment
    edited[6, 10, 10] = 1
    state = mrml.write_mask_to_segment(seg, "target", edited, ijk_to_ras)
    monkeypatch.undo()

    (k0, j0, i0), (k1, j1, i1) = state.extent_kji
    assert state.extent_kji == geometry.bbox_kji(edited != base)
    assert written, "nothing was written"
    for image_extent, extent in written:
        assert image_extent == extent == (i0, i1, j0, j1, k0, k1)
    np.testing.assert_array_equal(mrml.segment_to_mask(seg, "target", ijk_to_ras, SHAPE), edited)
    np.testing.assert_array_equal(mrml.segment_to_mask(seg, "other", ijk_to_ras, SHAPE), other)
    # Writing the same mask again changes nothing and writes nothing.
    again = mrml.write_mask_to_segment(seg, "target", edited, ijk_to_ras)
    assert again.extent_kji is None and again.changed_voxels == 0
    mrml.restore_segment(seg, state)
    assert_same_snapshot(before, snapshot(seg, ijk_to_ras, SHAPE))


def test_segmentation_and_volume_under_different_transforms(scene):
    ijk_to_ras_local = GRIDS["oblique"]
    volume = make_volume(scene, np.zeros(SHAPE, np.int16), ijk_to_ras_local)
    volume.SetAndObserveTransformNodeID(make_transform(scene, matrix(rotation((0, 0, 1), 0.5), (4, 5, 6))).GetID())
    _, ijk_to_ras = mrml.volume_to_array(volume)
    seg = new_segmentation(scene)
    seg.SetAndObserveTransformNodeID(make_transform(scene, matrix(rotation((1, 1, 0), -0.2), (-7, 0, 2))).GetID())
    mask = ellipsoid(SHAPE, (4, 7, 8), (3, 5, 6))
    mrml.write_mask_to_segment(seg, "s", mask, ijk_to_ras, reference_volume_node=volume)
    np.testing.assert_array_equal(mrml.segment_to_mask(seg, "s", ijk_to_ras, SHAPE), mask)
    update = ellipsoid(SHAPE, (4, 6, 9), (2, 3, 3))
    mrml.write_mask_to_segment(seg, "s", update, ijk_to_ras, reference_volume_node=volume, mode="union")
    np.testing.assert_array_equal(mrml.segment_to_mask(seg, "s", ijk_to_ras, SHAPE), mask | update)


def test_segment_on_shifted_and_on_coarser_lattice(scene):
    ijk_to_ras = GRIDS["anisotropic"]
    seg = new_segmentation(scene)
    # A segment written on a sub-grid (origin shifted by whole voxels) reads back exactly on the full grid.
    sub_ijk_to_ras = ijk_to_ras @ matrix(np.eye(3), (5, 3, 2))
    sub_mask = ellipsoid((5, 8, 9), (2, 4, 4), (2, 3, 3))
    mrml.write_mask_to_segment(seg, "sub", sub_mask, sub_ijk_to_ras)
    full = np.zeros(SHAPE, np.uint8)
    full[2:7, 3:11, 5:14] = sub_mask
    np.testing.assert_array_equal(mrml.segment_to_mask(seg, "sub", ijk_to_ras, SHAPE), full)
    state = mrml.write_mask_to_segment(seg, "sub", full | ellipsoid(SHAPE, (4, 7, 8), (1, 1, 1)), ijk_to_ras)
    mrml.restore_segment(seg, state)
    np.testing.assert_array_equal(mrml.segment_to_mask(seg, "sub", ijk_to_ras, SHAPE), full)

    # A segment on a lattice twice as coarse is resampled (nearest neighbour) when read ...
    coarse_seg = new_segmentation(scene, "coarse")
    coarse_ijk_to_ras = ijk_to_ras @ np.diag([2.0, 2.0, 2.0, 1.0])
    coarse = np.zeros((5, 7, 9), np.uint8)
    coarse[1:3, 2:5, 3:6] = 1
    mrml.write_mask_to_segment(coarse_seg, "c", coarse, coarse_ijk_to_ras)
    k, j, i = np.indices(SHAPE)
    expected = coarse[np.floor(k / 2 + 0.5).astype(int).clip(0, 4), np.floor(j / 2 + 0.5).astype(int).clip(0, 6),
                      np.floor(i / 2 + 0.5).astype(int).clip(0, 8)]
    got = mrml.segment_to_mask(coarse_seg, "c", ijk_to_ras, SHAPE)
    # Voxel centres exactly half-way between coarse voxels may round either way: compare the rest.
    unambiguous = (k % 2 == 0) & (j % 2 == 0) & (i % 2 == 0)
    np.testing.assert_array_equal(got[unambiguous], expected[unambiguous])
    assert got.sum() >= coarse.sum() * 8 * 0.5
    # ... but writing on the fine grid into it is refused and leaves it unchanged.
    before = snapshot(coarse_seg, coarse_ijk_to_ras, coarse.shape)
    with pytest.raises(InputError, match="different voxel grid"):
        mrml.write_mask_to_segment(coarse_seg, "c", np.ones(SHAPE, np.uint8), ijk_to_ras)
    assert_same_snapshot(before, snapshot(coarse_seg, coarse_ijk_to_ras, coarse.shape))
    # A new segment in that segmentation gets its own layer on the fine grid.
    mrml.write_mask_to_segment(coarse_seg, "fine", full, ijk_to_ras)
    np.testing.assert_array_equal(mrml.segment_to_mask(coarse_seg, "fine", ijk_to_ras, SHAPE), full)
    assert_same_snapshot(before, {sid: v for sid, v in snapshot(coarse_seg, coarse_ijk_to_ras, coarse.shape).items()
                                  if v[0] == "c"})


def test_bad_write_inputs_leave_segmentation_unchanged(scene):
    ijk_to_ras = GRIDS["oblique"]
    volume = make_volume(scene, np.zeros(SHAPE, np.int16), ijk_to_ras)
    seg = new_segmentation(scene)
    mask = ellipsoid(SHAPE, (4, 7, 8), (3, 4, 5))
    mrml.write_mask_to_segment(seg, "A", mask, ijk_to_ras, reference_volume_node=volume)
    before = snapshot(seg, ijk_to_ras, SHAPE)
    bad_calls = [
        (dict(mask_kji=mask[:, :, :-1], reference_volume_node=volume), "shape"),
        (dict(mask_kji=mask[0]), "3D"),
        (dict(mask_kji=mask.astype(np.float32)), "dtype"),
        (dict(mask_kji=mask, mode="intersect"), "unknown write mode"),
        (dict(mask_kji=mask, editable_mask=np.ones((2, 2, 2), np.uint8)), "editable_mask"),
        (dict(mask_kji=mask, color=(2, 0, 0)), "color"),
        (dict(mask_kji=mask, reference_volume_node=volume, ijk_to_ras=GRIDS["flipped"]), "does not match"),
    ]
    for kwargs, message in bad_calls:
        for segment_name in ("A", "new"):
            call = dict(segmentation_node=seg, segment_name=segment_name, ijk_to_ras=ijk_to_ras)
            call.update(kwargs)
            with pytest.raises(InputError, match=message):
                mrml.write_mask_to_segment(**call)
            assert_same_snapshot(before, snapshot(seg, ijk_to_ras, SHAPE))
    with pytest.raises(InputError, match="no segment named 'missing'"):
        mrml.segment_to_mask(seg, "missing", ijk_to_ras, SHAPE)


def test_failed_write_is_rolled_back(scene, monkeypatch):
    ijk_to_ras = GRIDS["flipped"]
    seg = new_segmentation(scene)
    b = ellipsoid(SHAPE, (4, 9, 12), (3, 3, 4))
    mrml.write_mask_to_segment(seg, "B", b, ijk_to_ras)
    mrml.write_mask_to_segment(seg, "A", ellipsoid(SHAPE, (4, 5, 5), (3, 3, 4)), ijk_to_ras)
    before = snapshot(seg, ijk_to_ras, SHAPE)
    from MedFMSegmentLib import mrml_segments  # where write_mask_to_segment looks the helper up

    real = mrml_segments._apply_box
    calls = []

    def failing_on_target(seg_node, segment_id, *args):
        calls.append(segment_id)
        if seg_node.GetSegmentation().GetSegment(segment_id).GetName() == "A" and len(calls) == 2:
            raise RuntimeError("simulated failure")
        return real(seg_node, segment_id, *args)

    monkeypatch.setattr(mrml_segments, "_apply_box", failing_on_target)
    with pytest.raises(RuntimeError, match="simulated"):
        mrml.write_mask_to_segment(seg, "A", ellipsoid(SHAPE, (4, 7, 9), (3, 4, 6)), ijk_to_ras, overwrite_others=True)
    monkeypatch.undo()
    assert_same_snapshot(before, snapshot(seg, ijk_to_ras, SHAPE))


# ----------------------------------------------------------------------------------------------------
# files


def test_file_errors_name_the_file_and_leave_no_node(scene, tmp_path):
    n_nodes = scene.GetNumberOfNodes()
    missing = tmp_path / "missing.nrrd"
    with pytest.raises(InputError, match="missing.nrrd"):
        mrml.load_volume(scene, missing)
    garbage = tmp_path / "garbage.nrrd"
    garbage.write_text("not an image")
    with pytest.raises(InputError, match="garbage.nrrd"):
        mrml.load_volume(scene, garbage)
    with pytest.raises(InputError, match="garbage.nrrd"):
        mrml.load_segmentation(scene, garbage)
    assert scene.GetNumberOfNodes() == n_nodes
    volume = make_volume(scene, np.zeros(SHAPE, np.int16), GRIDS["oblique"])
    with pytest.raises(InputError, match="does not exist"):
        mrml.save_node(volume, tmp_path / "no" / "such" / "dir" / "v.nrrd")


def _data_file(*parts) -> Path:
    path = DATA.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"real data not available: {path}")
    return path


def test_real_cranium_ct_loads_with_expected_geometry_and_segments_round_trip(scene, tmp_path):
    node = mrml.load_volume(scene, _data_file("cranium_ct", "cranium_ct.nrrd"))
    array_kji, ijk_to_ras = mrml.volume_to_array(node)
    assert array_kji.shape == (108, 256, 256) and array_kji.dtype == np.int16
    np.testing.assert_allclose(geometry.spacing(ijk_to_ras), [0.957, 0.957, 1.5], atol=1e-3)
    bone = (array_kji >= 226).astype(np.uint8)
    assert 0 < bone.sum() < bone.size // 2
    seg = new_segmentation(scene)
    mrml.write_mask_to_segment(seg, "bone", bone, ijk_to_ras, reference_volume_node=node)
    path = tmp_path / "bone.seg.nrrd"
    mrml.save_node(seg, path)
    loaded = mrml.load_segmentation(scene, path)
    np.testing.assert_array_equal(mrml.segment_to_mask(loaded, "bone", ijk_to_ras, array_kji.shape), bone)


def test_real_colin27_loads_with_expected_geometry(scene):
    node = mrml.load_volume(scene, _data_file("colin27", "ch2.nii.gz"))
    array_kji, ijk_to_ras = mrml.volume_to_array(node)
    assert array_kji.shape == (181, 217, 181)
    np.testing.assert_allclose(geometry.spacing(ijk_to_ras), [1.0, 1.0, 1.0], atol=1e-6)
    # The centre voxel's RAS position from the node's own matrix maps back to it.
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ras = m.MultiplyPoint((90.0, 108.0, 90.0, 1.0))[:3]
    np.testing.assert_allclose(geometry.ras_to_ijk(ras, ijk_to_ras), (90, 108, 90), atol=1e-6)
