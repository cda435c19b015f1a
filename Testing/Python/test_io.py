"""Tests of MedFMSegmentLib.io: reading volumes, writing/reading segmentations, atomic output."""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedFMSegmentLib import geometry, io
from MedFMSegmentLib.errors import InputError

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
CT = DATA / "cranium_ct" / "cranium_ct.nrrd"
CH2 = DATA / "colin27" / "ch2.nii.gz"
AAL = DATA / "colin27" / "aal.nii.gz"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path} (see the shared data README)")
    return path


def oblique_matrix() -> np.ndarray:
    """An IJK-to-RAS matrix with rotation, anisotropic spacing and an offset."""
    a = np.deg2rad(20.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag([0.8, 0.9, 2.5]) * np.array([1.0, -1.0, 1.0])
    m[:3, 3] = (12.5, -40.0, 7.25)
    return m


def box_mask(shape_kji, k, j, i) -> np.ndarray:
    mask = np.zeros(shape_kji, np.uint8)
    mask[k[0]:k[1], j[0]:j[1], i[0]:i[1]] = 1
    return mask


def listing(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- read_volume, real data

@pytest.mark.data
def test_read_cranium_ct():
    array_kji, ijk_to_ras = io.read_volume(need(CT))
    assert array_kji.shape == (108, 256, 256)
    assert array_kji.dtype == np.int16
    np.testing.assert_allclose(geometry.spacing(ijk_to_ras), [0.9570312, 0.9570312, 1.5], rtol=1e-7)
    # the file is LPS with identity directions and origin 0: RAS flips i and j
    np.testing.assert_allclose(ijk_to_ras[:3, :3], np.diag([-0.9570312, -0.9570312, 1.5]), rtol=1e-7)
    np.testing.assert_allclose(ijk_to_ras[:3, 3], 0.0)
    # HU range of a head CT: air below -900, bone above 1000
    assert array_kji.min() < -900 and array_kji.max() > 1000


@pytest.mark.data
def test_read_colin_ras_point_maps_to_the_voxel_simpleitk_gives():
    array_kji, ijk_to_ras = io.read_volume(need(CH2))
    image = sitk.ReadImage(str(CH2))
    assert array_kji.shape == tuple(reversed(image.GetSize()))
    for index_ijk in [(0, 0, 0), (30, 100, 60), (90, 108, 90), (180, 216, 180)]:
        x, y, z = image.TransformIndexToPhysicalPoint(index_ijk)  # LPS
        point_ras = (-x, -y, z)
        np.testing.assert_allclose(geometry.ras_to_ijk(point_ras, ijk_to_ras), index_ijk, atol=1e-9)
        np.testing.assert_allclose(geometry.ijk_to_ras(index_ijk, ijk_to_ras), point_ras, atol=1e-9)
        i, j, k = index_ijk
        assert array_kji[k, j, i] == image.GetPixel(index_ijk)


# --------------------------------------------------------------------------- read_volume, formats

@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".nii.gz", ".nii", ".mha", ".mhd"])
def test_read_volume_formats_keep_geometry(tmp_path, suffix):
    m = oblique_matrix()
    array_kji = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = sitk.GetImageFromArray(array_kji)
    ijk_to_lps = geometry.lps_to_ras_matrix(m)  # the flip is its own inverse
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((ijk_to_lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(ijk_to_lps[:3, 3].tolist())
    path = tmp_path / f"vol{suffix}"
    sitk.WriteImage(image, str(path))
    read, ijk_to_ras = io.read_volume(path)
    np.testing.assert_array_equal(read, array_kji)
    tol = 1e-5 if ".nii" in suffix else 1e-9  # NIfTI stores the geometry as float32
    np.testing.assert_allclose(ijk_to_ras, m, atol=tol)


def test_read_volume_single_frame_4d_is_read_as_3d(tmp_path):
    array = np.random.default_rng(0).integers(0, 100, (4, 5, 6)).astype(np.int16)
    path = tmp_path / "one_frame.nrrd"
    image = sitk.JoinSeries([sitk.GetImageFromArray(array)])
    assert image.GetDimension() == 4
    sitk.WriteImage(image, str(path))
    read, m = io.read_volume(path)
    np.testing.assert_array_equal(read, array)
    np.testing.assert_allclose(m, np.diag([-1.0, -1.0, 1.0, 1.0]))


def _expect_input_error(path, *parts):
    with pytest.raises(InputError) as info:
        io.read_volume(path)
    message = str(info.value)
    assert str(path) in message
    for part in parts:
        assert part in message, message
    return message


def test_read_volume_rejects_2d(tmp_path):
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 30), np.int16)), str(path))
    _expect_input_error(path, "is 2D", "30x20", "3D scalar volume")


def test_read_volume_rejects_4d(tmp_path):
    path = tmp_path / "series.nii.gz"
    frame = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))
    sitk.WriteImage(sitk.JoinSeries([frame, frame, frame]), str(path))
    _expect_input_error(path, "is 4D", "3 frames", "3D scalar volume")


def test_read_volume_rejects_rgb(tmp_path):
    path = tmp_path / "rgb.mha"
    rgb = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(path))
    _expect_input_error(path, "3 components", "RGB or vector")


def test_read_volume_missing_file(tmp_path):
    _expect_input_error(tmp_path / "nope.nrrd", "not found")


def test_read_volume_folder(tmp_path):
    _expect_input_error(tmp_path, "folder")


@pytest.mark.parametrize("name", ["garbage.nrrd", "garbage.nii.gz", "notes.txt"])
def test_read_volume_garbage_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not an image\n" * 10)
    _expect_input_error(path, "cannot read")


@pytest.mark.data
def test_read_volume_truncated_file(tmp_path):
    data = need(CT).read_bytes()
    path = tmp_path / "truncated.nrrd"
    path.write_bytes(data[: len(data) // 2])
    _expect_input_error(path, "truncated or corrupt")


# --------------------------------------------------------------------------- write/read segmentation

def _segments(shape_kji):
    a = box_mask(shape_kji, (2, 6), (3, 9), (1, 7))
    b = box_mask(shape_kji, (7, 10), (3, 9), (1, 7))   # does not touch a
    c = box_mask(shape_kji, (4, 9), (5, 12), (4, 10))  # overlaps a and b
    return a, b, c


def test_segmentation_round_trip_single_layer(tmp_path):
    m = oblique_matrix()
    a, b, _ = _segments((12, 14, 11))
    path = tmp_path / "out.seg.nrrd"
    io.write_segmentation(path, {"Liver": a, "Spleen": b}, m)
    header = path.read_bytes()[:2000].decode("latin-1")
    assert "dimension: 3" in header
    assert "Segment1_LabelValue:=2" in header and "Segment1_Layer:=0" in header
    assert "Segmentation_MasterRepresentation:=Binary labelmap" in header
    masks, ijk_to_ras = io.read_segmentation(path)
    assert list(masks) == ["Liver", "Spleen"]
    np.testing.assert_array_equal(masks["Liver"], a)
    np.testing.assert_array_equal(masks["Spleen"], b)
    np.testing.assert_allclose(ijk_to_ras, m, atol=1e-12)


def test_segmentation_round_trip_overlapping_layers(tmp_path):
    m = oblique_matrix()
    a, b, c = _segments((12, 14, 11))
    path = tmp_path / "overlap.seg.nrrd"
    io.write_segmentation(path, [("a", a), ("c", c), ("b", b)], m)
    header = path.read_bytes()[:2000].decode("latin-1")
    assert "dimension: 4" in header and "sizes: 2 11 14 12" in header
    # c overlaps a so it goes to layer 1; b overlaps c but not a so it shares layer 0 with a
    assert "Segment1_Layer:=1" in header and "Segment2_Layer:=0" in header
    masks, _ = io.read_segmentation(path)
    assert list(masks) == ["a", "c", "b"]
    for name, mask in [("a", a), ("b", b), ("c", c)]:
        np.testing.assert_array_equal(masks[name], mask)


def _read_with_slicer(slicer, path):
    import vtk
    from vtk.util import numpy_support

    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    out = []
    for n in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetSegment(segmentation.GetNthSegmentID(n))
        labelmap = segment.GetRepresentation("Binary labelmap")
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        extent = labelmap.GetExtent()
        dims = [extent[2 * a + 1] - extent[2 * a] + 1 for a in range(3)]
        voxels = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims[::-1])
        out.append({
            "name": segment.GetName(),
            "label": segment.GetLabelValue(),
            "color": segment.GetColor(),
            "extent": extent,
            "matrix": np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]),
            "mask": (voxels == segment.GetLabelValue()).astype(np.uint8),
        })
    return out


@pytest.mark.data
@pytest.mark.parametrize("overlap", [False, True], ids=["one-layer", "two-layers"])
def test_slicer_reads_our_segmentation_on_the_volume_grid(tmp_path, overlap):
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    ct_kji, ijk_to_ras = io.read_volume(need(CT))
    bone = (ct_kji >= 226).astype(np.uint8)
    soft = ((ct_kji >= -142) & (ct_kji < 226)).astype(np.uint8)
    head = (ct_kji >= -142).astype(np.uint8)
    masks = [("Bone", bone), ("Head" if overlap else "Soft tissue", head if overlap else soft)]
    path = tmp_path / "cranium.seg.nrrd"
    io.write_segmentation(path, masks, ijk_to_ras, colors={"Bone": (0.9, 0.85, 0.7)})
    segments = _read_with_slicer(slicer, path)
    assert [s["name"] for s in segments] == [name for name, _ in masks]
    assert [s["label"] for s in segments] == [1, 2]
    np.testing.assert_allclose(segments[0]["color"], (0.9, 0.85, 0.7), atol=1e-6)
    k, j, i = ct_kji.shape
    for segment, (_, mask) in zip(segments, masks):
        assert segment["extent"] == (0, i - 1, 0, j - 1, 0, k - 1)
        np.testing.assert_allclose(segment["matrix"], ijk_to_ras, atol=1e-9)
        np.testing.assert_array_equal(segment["mask"], mask)


def _write_with_slicer(slicer, path, boxes, spacing, origin_ras):
    """A segmentation saved by Slicer itself (cropped to its content, layers as Slicer chooses)."""
    import vtk
    from vtk.util import numpy_support

    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    shape_kji = (8, 12, 10)
    masks = {}
    for name, (k, j, i) in boxes.items():
        mask = box_mask(shape_kji, k, j, i)
        masks[name] = mask
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(shape_kji[2], shape_kji[1], shape_kji[0])
        image.SetSpacing(*spacing)
        image.SetOrigin(*origin_ras)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        image.GetPointData().GetScalars().DeepCopy(numpy_support.numpy_to_vtk(mask.ravel()))
        segment = slicer.vtkSegment()
        segment.SetName(name)
        segment.AddRepresentation("Binary labelmap", image)
        node.GetSegmentation().AddSegment(segment, name)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.WriteData(node) == 1
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.diag(spacing)
    ijk_to_ras[:3, 3] = origin_ras
    return masks, shape_kji, ijk_to_ras


def test_read_segmentation_written_by_slicer(tmp_path):
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    path = tmp_path / "slicer.seg.nrrd"
    boxes = {"A": ((1, 3), (1, 4), (1, 5)), "B": ((4, 6), (5, 8), (5, 9)), "C": ((2, 5), (2, 6), (2, 6))}
    masks, shape_kji, ijk_to_ras = _write_with_slicer(slicer, path, boxes, (1.0, 1.5, 2.0), (5.0, 6.0, 7.0))
    header = path.read_bytes()[:400].decode("latin-1")
    assert "dimension: 4" in header  # C overlaps A: Slicer wrote two layers, cropped to the content
    read, file_matrix = io.read_segmentation(path)
    assert list(read) == ["A", "B", "C"]
    assert read["A"].shape != shape_kji  # cropped by Slicer
    placed, matrix = io.read_segmentation(path, reference=(shape_kji, ijk_to_ras))
    np.testing.assert_allclose(matrix, ijk_to_ras)
    for name, mask in masks.items():
        np.testing.assert_array_equal(placed[name], mask)
        assert read[name].sum() == mask.sum()


def test_read_segmentation_reference_must_share_the_grid(tmp_path):
    m = oblique_matrix()
    a, _, _ = _segments((12, 14, 11))
    path = tmp_path / "x.seg.nrrd"
    io.write_segmentation(path, {"a": a}, m)
    shifted = m.copy()
    shifted[:3, 3] += m[:3, :3] @ [0.5, 0.0, 0.0]  # half a voxel along i
    with pytest.raises(InputError, match="not aligned"):
        io.read_segmentation(path, reference=((12, 14, 11), shifted))
    moved = m.copy()
    moved[:3, 3] += m[:3, :3] @ [2.0, 0.0, 1.0]  # reference starts 2 voxels later along i, 1 along k
    placed, _ = io.read_segmentation(path, reference=((12, 14, 11), moved))
    np.testing.assert_array_equal(placed["a"][:-1, :, :-2], a[1:, :, 2:])


# --------------------------------------------------------------------------- labelmaps

@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_write_labelmap_later_segment_wins(tmp_path, suffix):
    m = oblique_matrix()
    a, b, c = _segments((12, 14, 11))
    path = tmp_path / f"labels{suffix}"
    io.write_labelmap(path, [("a", a), ("b", b), ("c", c)], m)
    labels, ijk_to_ras = io.read_volume(path)
    assert labels.dtype == np.uint8
    expected = np.zeros_like(a)
    for n, mask in enumerate((a, b, c)):
        expected[mask > 0] = n + 1
    np.testing.assert_array_equal(labels, expected)
    assert np.any((a > 0) & (labels == 3))  # the overlap went to c
    np.testing.assert_allclose(ijk_to_ras, m, atol=1e-5)
    masks, _ = io.read_segmentation(path, label_names={1: "a", 3: "c"})
    assert list(masks) == ["a", "2", "c"]
    np.testing.assert_array_equal(masks["c"], c)


@pytest.mark.data
def test_read_atlas_as_plain_labelmap():
    names = {77: "Thalamus_L", 78: "Thalamus_R"}
    masks, ijk_to_ras = io.read_segmentation(need(AAL), label_names=names, only=["Thalamus_R", "1"])
    atlas, atlas_matrix = io.read_volume(AAL)
    assert list(masks) == ["1", "Thalamus_R"]  # file (label value) order
    np.testing.assert_array_equal(masks["Thalamus_R"], atlas == 78)
    np.testing.assert_array_equal(masks["1"], atlas == 1)
    np.testing.assert_allclose(ijk_to_ras, atlas_matrix)
    with pytest.raises(InputError, match="no segment named 'Thalamus'"):
        io.read_segmentation(AAL, label_names=names, only=["Thalamus"])


def test_read_segmentation_rejects_intensity_image(tmp_path):
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(12 * 12 * 12, dtype=np.int16).reshape(12, 12, 12)), str(path))
    with pytest.raises(InputError, match="intensity image"):
        io.read_segmentation(path)


# --------------------------------------------------------------------------- argument checks

@pytest.mark.parametrize("masks, message", [
    ({}, "no segments"),
    ({"a": np.zeros((4, 4), np.uint8)}, "must be 3D"),
    ({"a": np.zeros((4, 4, 4), np.uint8), "b": np.zeros((4, 4, 5), np.uint8)}, "differs"),
    ([("a", np.zeros((4, 4, 4))), ("a", np.zeros((4, 4, 4)))], "used twice"),
    ({"": np.zeros((4, 4, 4))}, "non-empty string"),
    ({"a\nb": np.zeros((4, 4, 4))}, "control characters"),
    ({"p": np.full((4, 4, 4), 0.7)}, "probabilities"),
])
def test_write_segmentation_rejects_bad_masks(tmp_path, masks, message):
    with pytest.raises(InputError, match=message):
        io.write_segmentation(tmp_path / "x.seg.nrrd", masks, np.eye(4))
    assert listing(tmp_path) == []


def test_write_rejects_bad_paths_and_matrix(tmp_path):
    mask = {"a": np.ones((3, 3, 3), np.uint8)}
    with pytest.raises(InputError, match=r"\.seg\.nrrd"):
        io.write_segmentation(tmp_path / "x.nrrd", mask, np.eye(4))
    with pytest.raises(InputError, match="does not exist"):
        io.write_segmentation(tmp_path / "missing" / "x.seg.nrrd", mask, np.eye(4))
    with pytest.raises(InputError, match="unsupported labelmap"):
        io.write_labelmap(tmp_path / "x.png", mask, np.eye(4))
    with pytest.raises(InputError, match="singular"):
        io.write_labelmap(tmp_path / "x.nii.gz", mask, np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(InputError, match="color"):
        io.write_segmentation(tmp_path / "x.seg.nrrd", mask, np.eye(4), colors={"a": (2, 0, 0)})
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------- atomic output

def test_existing_output_needs_overwrite(tmp_path):
    path = tmp_path / "x.seg.nrrd"
    path.write_bytes(b"precious")
    mask = {"a": np.ones((3, 3, 3), np.uint8)}
    with pytest.raises(InputError) as info:
        io.write_segmentation(path, mask, np.eye(4))
    assert str(path) in str(info.value) and "overwrite" in str(info.value)
    assert path.read_bytes() == b"precious"
    io.write_segmentation(path, mask, np.eye(4), overwrite=True)
    assert io.read_segmentation(path)[0]["a"].sum() == 27
    assert listing(tmp_path) == ["x.seg.nrrd"]


def test_output_gets_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = tmp_path / "x.nii.gz"
    io.write_labelmap(path, {"a": np.ones((3, 3, 3), np.uint8)}, np.eye(4))
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def _failing_writer(image, filename, *args, **kwargs):
    Path(filename).write_bytes(b"NRRD0004\npartial")  # half-written output, then the disk is full
    raise RuntimeError("sitk::ERROR: could not write: No space left on device")


@pytest.mark.parametrize("existing", [False, True])
def test_failed_image_write_leaves_nothing(tmp_path, monkeypatch, existing):
    path = tmp_path / "x.seg.nrrd"
    if existing:
        path.write_bytes(b"previous result")
    monkeypatch.setattr(io.sitk, "WriteImage", _failing_writer)
    with pytest.raises(OSError) as info:
        io.write_segmentation(path, {"a": np.ones((3, 3, 3), np.uint8)}, np.eye(4), overwrite=True)
    assert str(path) in str(info.value) and "No space left" in str(info.value)
    assert listing(tmp_path) == (["x.seg.nrrd"] if existing else [])
    if existing:
        assert path.read_bytes() == b"previous result"


@pytest.mark.parametrize("existing", [False, True])
def test_failed_rename_leaves_nothing(tmp_path, monkeypatch, existing):
    path = tmp_path / "labels.nii.gz"
    if existing:
        path.write_bytes(b"previous result")

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "replace", no_space)
    with pytest.raises(OSError) as info:
        io.write_labelmap(path, {"a": np.ones((3, 3, 3), np.uint8)}, np.eye(4), overwrite=True)
    assert info.value.errno == errno.ENOSPC
    assert listing(tmp_path) == (["labels.nii.gz"] if existing else [])
    if existing:
        assert path.read_bytes() == b"previous result"


def test_write_text_atomic(tmp_path):
    path = tmp_path / "p.json"
    io.write_text_atomic(path, "{}\n")
    assert path.read_text() == "{}\n"
    with pytest.raises(InputError, match="already exists"):
        io.write_text_atomic(path, "[]")
    assert path.read_text() == "{}\n"
    assert listing(tmp_path) == ["p.json"]


def test_duplicate_segment_names_in_a_file_are_kept_apart(tmp_path, caplog):
    m = np.eye(4)
    a, b, _ = _segments((12, 14, 11))
    path = tmp_path / "dup.seg.nrrd"
    io.write_segmentation(path, {"x": a, "y": b}, m)
    # rename the second segment to the first one's name, as Slicer allows (IDs stay unique)
    image = sitk.ReadImage(str(path))
    image.SetMetaData("Segment1_Name", "x")
    sitk.WriteImage(image, str(path), True)
    with caplog.at_level(logging.WARNING):
        masks, _ = io.read_segmentation(path)
    assert list(masks) == ["x", "x [y]"]
    np.testing.assert_array_equal(masks["x [y]"], b)
    assert "more than once" in caplog.text
    only, _ = io.read_segmentation(path, only=["x [y]"])
    assert list(only) == ["x [y]"]
    np.testing.assert_array_equal(only["x [y]"], b)
