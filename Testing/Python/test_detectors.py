"""Tests of MedFMSegmentLib.detectors: detectors on real data, box planning, chaining, bad input."""
from __future__ import annotations

import csv
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

from MedFMSegmentLib import detectors as det
from MedFMSegmentLib import geometry, io
from MedFMSegmentLib.detectors import Detection
from MedFMSegmentLib.errors import Cancelled, InputError, ModelError

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
AAL = DATA / "colin27" / "aal.nii.gz"
AAL_NAMES = DATA / "colin27" / "aal.nii.txt"
CT = DATA / "cranium_ct" / "cranium_ct.nrrd"
BONE = DATA / "cranium_ct" / "cranium_bone_thr226.nrrd"

STRUCTURES = ("Caudate_L", "Thalamus_L", "Putamen_R", "Hippocampus_L")


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path} (see the shared data README)")
    return path


@pytest.fixture(scope="module")
def aal():
    array_kji, ijk_to_ras = io.read_volume(need(AAL))
    names = det.read_label_names(need(AAL_NAMES))
    return array_kji, ijk_to_ras, names


@pytest.fixture(scope="module")
def bone():
    return io.read_volume(need(BONE))


def value_of(names, name):
    return next(v for v, n in names.items() if n == name)


def numpy_box_ijk(mask_kji):
    """Inclusive IJK box of a mask, computed with numpy only."""
    k, j, i = np.nonzero(mask_kji)
    return (int(i.min()), int(j.min()), int(k.min())), (int(i.max()), int(j.max()), int(k.max()))


# --------------------------------------------------------------------------- labelmap detector

def test_label_names_file(aal):
    _, _, names = aal
    assert names[71] == "Caudate_L" and names[77] == "Thalamus_L"
    assert len(names) == 116


def test_labelmap_boxes_equal_true_bounding_boxes(aal):
    array_kji, ijk_to_ras, names = aal
    wanted = {value_of(names, n): n for n in STRUCTURES}
    detector = det.LabelmapDetector(array_kji, ijk_to_ras, labels=wanted)
    found = {d.label: d for d in detector.detect(array_kji, ijk_to_ras)}
    assert set(found) == set(STRUCTURES)
    for value, name in wanted.items():
        assert found[name].box_ijk == numpy_box_ijk(array_kji == value)
        assert found[name].score == 1.0


def test_labelmap_slice_boxes_are_true_per_slice_boxes_plus_margin(aal):
    array_kji, ijk_to_ras, names = aal
    value = value_of(names, "Caudate_L")
    mask = array_kji == value
    detector = det.LabelmapDetector(array_kji, ijk_to_ras, labels={value: "Caudate_L"})
    detections = detector.detect(array_kji, ijk_to_ras)
    for axis in geometry.AXES:
        plan = det.detections_to_slice_boxes(detections, array_kji.shape, axis, margin_vox=2)
        h, w = geometry.slice_shape(array_kji.shape, axis)
        expected = []
        for index in range(geometry.num_slices(array_kji.shape, axis)):
            box = geometry.box_from_mask(geometry.get_slice(mask, axis, index))
            if box is not None:
                x0, y0, x1, y1 = box
                expected.append((index, (max(x0 - 2, 0), max(y0 - 2, 0), min(x1 + 2, w - 1), min(y1 + 2, h - 1))))
        assert plan["Caudate_L"] == expected, axis


def test_labelmap_without_tight_slices_splits_the_3d_box(aal):
    array_kji, ijk_to_ras, names = aal
    value = value_of(names, "Thalamus_L")
    detector = det.LabelmapDetector(array_kji, ijk_to_ras, labels={value: "Thalamus_L"}, tight_slices=False)
    (i0, j0, k0), (i1, j1, k1) = numpy_box_ijk(array_kji == value)
    plan = det.detections_to_slice_boxes(detector.detect(array_kji, ijk_to_ras), array_kji.shape, "coronal",
                                         margin_vox=3)
    assert [index for index, _ in plan["Thalamus_L"]] == list(range(j0, j1 + 1))
    assert {box for _, box in plan["Thalamus_L"]} == {(i0 - 3, k0 - 3, i1 + 3, k1 + 3)}


def test_labelmap_from_file_reads_names_and_skips_small_labels(aal):
    array_kji, ijk_to_ras, names = aal
    detector = det.LabelmapDetector(need(AAL))
    assert set(names.values()) <= set(detector.labels)
    found = {d.label: d for d in detector.detect(array_kji, ijk_to_ras)}
    assert found["Thalamus_L"].box_ijk == numpy_box_ijk(array_kji == 77)
    counts = np.bincount(array_kji.ravel())
    big = det.LabelmapDetector(array_kji, ijk_to_ras, min_voxels=int(np.median(counts[1:])) + 1)
    kept = {d.label for d in big.detect(array_kji, ijk_to_ras)}
    assert kept == {str(v) for v in np.nonzero(counts > np.median(counts[1:]))[0] if v != 0}


def test_labelmap_on_another_grid_is_resampled(aal):
    array_kji, ijk_to_ras, names = aal
    value = value_of(names, "Putamen_R")
    # the image is a crop of the atlas grid, starting at (i, j, k) = (20, 31, 17)
    off_ijk = np.array([20, 31, 17])
    image = array_kji[17:170, 31:200, 20:160]
    image_matrix = ijk_to_ras.copy()
    image_matrix[:3, 3] = geometry.ijk_to_ras(off_ijk, ijk_to_ras)
    detector = det.LabelmapDetector(array_kji, ijk_to_ras, labels={value: "Putamen_R"})
    (d,) = detector.detect(image, image_matrix)
    lo, hi = numpy_box_ijk(array_kji == value)
    assert d.box_ijk == (tuple(np.subtract(lo, off_ijk)), tuple(np.subtract(hi, off_ijk)))
    # and a coarser 2 mm grid: the box covers the same RAS extent within one voxel
    coarse = ijk_to_ras.copy()
    coarse[:3, :3] *= 2.0
    (c,) = detector.detect(np.zeros((91, 109, 91)), coarse)
    corners_fine = geometry.ras_to_ijk(geometry.ijk_to_ras(np.array(c.box_ijk, float), coarse), ijk_to_ras)
    np.testing.assert_allclose(np.sort(corners_fine, axis=0), np.array([lo, hi]), atol=1.01)


def test_per_component_on_ct_bone_mask(bone):
    mask_kji, ijk_to_ras = bone
    whole = det.LabelmapDetector(mask_kji, ijk_to_ras, labels={1: "bone"})
    (all_bone,) = whole.detect(mask_kji, ijk_to_ras)
    assert all_bone.box_ijk == numpy_box_ijk(mask_kji)
    detector = det.LabelmapDetector(mask_kji, ijk_to_ras, labels={1: "bone"}, per_component=True,
                                    min_voxels=1000, tight_slices=False)
    parts = detector.detect(mask_kji, ijk_to_ras)
    assert len(parts) >= 3
    assert len({p.box_ijk for p in parts}) == len(parts)
    (alo, ahi) = all_bone.box_ijk
    for p in parts:
        (i0, j0, k0), (i1, j1, k1) = p.box_ijk
        assert all(a <= b for a, b in zip(alo, (i0, j0, k0))) and all(a >= b for a, b in zip(ahi, (i1, j1, k1)))
        sub = mask_kji[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1]
        assert sub.sum() >= 1000
        # the box is tight: bone touches each of its six faces
        for face in (sub[0], sub[-1], sub[:, 0], sub[:, -1], sub[:, :, 0], sub[:, :, -1]):
            assert face.any()
    more = det.LabelmapDetector(mask_kji, ijk_to_ras, labels={1: "bone"}, per_component=True, min_voxels=10,
                                tight_slices=False).detect(mask_kji, ijk_to_ras)
    assert len(more) > len(parts)


def test_per_component_connectivity_is_exact():
    lab = np.zeros((10, 12, 14), np.uint8)
    lab[1:3, 1:4, 1:5] = 2  # component A
    lab[5:8, 6:9, 8:12] = 2  # component B
    lab[8, 9, 12] = 2  # touches B by a corner only
    lab[0, 0, 13] = 3
    m = np.diag([1.0, 1.0, 2.0, 1.0])
    d = det.LabelmapDetector(lab, m, labels={2: "x"}, per_component=True, min_voxels=1)
    boxes = sorted(x.box_ijk for x in d.detect(lab, m))
    assert boxes == [((1, 1, 1), (4, 3, 2)), ((8, 6, 5), (11, 8, 7)), ((12, 9, 8), (12, 9, 8))]
    d = det.LabelmapDetector(lab, m, labels={2: "x"}, per_component=True, min_voxels=1, fully_connected=True)
    assert sorted(x.box_ijk for x in d.detect(lab, m)) == [((1, 1, 1), (4, 3, 2)), ((8, 6, 5), (12, 9, 8))]


def test_labelmap_bad_input():
    m = np.eye(4)
    with pytest.raises(InputError, match="non-integer"):
        det.LabelmapDetector(np.full((3, 3, 3), 0.5), m)
    with pytest.raises(InputError, match="negative"):
        det.LabelmapDetector(np.full((3, 3, 3), -1), m)
    with pytest.raises(InputError, match="ijk_to_ras"):
        det.LabelmapDetector(np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(InputError, match="empty"):
        det.LabelmapDetector(np.ones((3, 3, 3), np.uint8), m, labels={1: " "})
    with pytest.raises(InputError, match="min_voxels"):
        det.LabelmapDetector(np.ones((3, 3, 3), np.uint8), m, min_voxels=0)


# --------------------------------------------------------------------------- box files and ROIs

def _ras_corners(box_ijk, ijk_to_ras):
    return geometry.ijk_to_ras(np.array(box_ijk, float), ijk_to_ras)


def test_ras_box_file_round_trips_to_the_ijk_box(aal, bone, tmp_path):
    for volume, ijk_to_ras, box_ijk in (
        (aal[0], aal[1], numpy_box_ijk(aal[0] == 77)),
        (bone[0], bone[1], ((40, 52, 10), (120, 181, 77))),
    ):
        c0, c1 = _ras_corners(box_ijk, ijk_to_ras)
        csv_path = tmp_path / "boxes.csv"
        with csv_path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "score", "space", "x0", "y0", "z0", "x1", "y1", "z1"])
            w.writerow(["target", 0.9, "RAS", *c0, *c1])
            w.writerow(["target_lps", 0.8, "LPS", -c1[0], -c1[1], c1[2], -c0[0], -c0[1], c0[2]])
            w.writerow(["target_ijk", 0.7, "IJK", *box_ijk[1], *box_ijk[0]])
        json_path = tmp_path / "boxes.json"
        json_path.write_text(json.dumps({"boxes": [
            {"label": "target", "score": 0.9, "space": "RAS", "corners": [list(c1), list(c0)]},
            {"label": "slice", "axis": "axial", "index": 12, "box_xy": [30, 40, 20, 50]},
        ]}))
        from_csv = det.BoxFileDetector(csv_path).detect(volume, ijk_to_ras)
        assert [d.box_ijk for d in from_csv] == [box_ijk] * 3
        assert [d.score for d in from_csv] == [0.9, 0.8, 0.7]
        from_json = det.BoxFileDetector(json_path).detect(volume, ijk_to_ras)
        assert from_json[0].box_ijk == box_ijk
        assert from_json[1].slice_boxes == (("axial", 12, (20.0, 40.0, 30.0, 50.0)),)


def test_ras_box_covers_voxel_centres_inside(bone):
    _, ijk_to_ras = bone
    box_ijk = ((40, 52, 10), (120, 181, 77))
    step = geometry.spacing(ijk_to_ras)
    c0, c1 = _ras_corners(box_ijk, ijk_to_ras)
    direction = np.sign(np.diag(ijk_to_ras)[:3])  # this CT's axes are RAS-aligned (flipped i, j)
    # 0.9 voxel beyond the end centres: no new centre inside; 1.1 voxel beyond: one more voxel each side
    near = det.box_ras_to_ijk(c0 - 0.9 * step * direction, c1 + 0.9 * step * direction, ijk_to_ras)
    far = det.box_ras_to_ijk(c0 - 1.1 * step * direction, c1 + 1.1 * step * direction, ijk_to_ras)
    assert near == box_ijk
    assert far == (tuple(v - 1 for v in box_ijk[0]), tuple(v + 1 for v in box_ijk[1]))
    # a zero-thickness box on one axial slice keeps that slice
    flat = det.box_ras_to_ijk(c0, [c1[0], c1[1], c0[2]], ijk_to_ras)
    assert flat == (box_ijk[0], (box_ijk[1][0], box_ijk[1][1], box_ijk[0][2]))


def test_roi_detector(aal):
    array_kji, ijk_to_ras, _ = aal
    box_ijk = numpy_box_ijk(array_kji == 71)
    c0, c1 = _ras_corners(box_ijk, ijk_to_ras)
    (d,) = det.RoiDetector([("Caudate_L", c1, c0)]).detect(array_kji, ijk_to_ras)
    assert d.label == "Caudate_L" and d.box_ijk == box_ijk
    with pytest.raises(InputError, match="corner0_ras"):
        det.RoiDetector([("x", [0, np.nan, 0], [1, 1, 1])])


@pytest.mark.parametrize("content, message", [
    ("label,x0,y0,z0,x1,y1\nx,0,0,0,1,1\n", "missing CSV column"),
    ("label,score,x0,y0,z0,x1,y1,z1\nx,nan,0,0,0,1,1,1\n", "score nan"),
    ("label,score,x0,y0,z0,x1,y1,z1\n,1,0,0,0,1,1,1\n", "empty"),
    ("label,x0,y0,z0,x1,y1,z1\nx,0,0,zero,1,1,1\n", "line 2: column z0"),
    ("label,space,x0,y0,z0,x1,y1,z1\nx,XYZ,0,0,0,1,1,1\n", "unknown space"),
])
def test_bad_box_csv(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        det.BoxFileDetector(path)


@pytest.mark.parametrize("content, message", [
    ("[{", "invalid JSON"),
    ('[{"label": "x"}]', "corners"),
    ('[{"label": "x", "score": NaN, "corners": [[0,0,0],[1,1,1]]}]', "score nan"),
    ('[{"label": "x", "axis": "oblique", "index": 3, "box_xy": [0,0,1,1]}]', "unknown axis"),
    ('{"detections": []}', "boxes"),
])
def test_bad_box_json(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        det.BoxFileDetector(path)


# --------------------------------------------------------------------------- planning

SHAPE = (20, 40, 50)  # k, j, i


def test_split_3d_box_along_each_axis():
    d = Detection("a", 0.9, box_ijk=((10, 12, 4), (20, 30, 8)))
    assert det.detections_to_slice_boxes([d], SHAPE, "axial", margin_vox=0)["a"] == \
        [(k, (10, 12, 20, 30)) for k in range(4, 9)]
    assert det.detections_to_slice_boxes([d], SHAPE, "coronal", margin_vox=1)["a"] == \
        [(j, (9, 3, 21, 9)) for j in range(12, 31)]
    assert det.detections_to_slice_boxes([d], SHAPE, "sagittal", margin_vox=0, slice_margin=2)["a"] == \
        [(i, (12, 4, 30, 8)) for i in range(8, 23)]


def test_score_threshold_clipping_and_outside_are_reported(caplog):
    dets = [
        Detection("a", 0.9, box_ijk=((45, -5, 3), (60, 10, 6))),  # sticks out at i > 49 and j < 0
        Detection("a", 0.2, box_ijk=((1, 1, 1), (2, 2, 2))),  # below threshold
        Detection("b", 0.8, box_ijk=((60, 0, 0), (70, 5, 5))),  # entirely outside (i >= 50)
        Detection("c", 0.7, slice_boxes=[("axial", 25, (0, 0, 3, 3)), ("axial", 3, (-4, 30, 5, 45))]),
    ]
    report = {}
    with caplog.at_level(logging.WARNING, logger="MedFMSegmentLib.detectors"):
        plan = det.detections_to_slice_boxes(dets, SHAPE, "axial", score_threshold=0.5, margin_vox=2,
                                             report=report)
    assert plan["a"] == [(k, (43, 0, 49, 12)) for k in range(3, 7)]
    assert "b" not in plan
    assert plan["c"] == [(3, (0, 28, 7, 39))]  # slice 25 is outside (20 slices); x < 0 and y > 39 clipped
    assert [e["label"] for e in report["below_threshold"]] == ["a"]
    assert [e["label"] for e in report["clipped"]] == ["a", "c"]
    assert [e["label"] for e in report["outside"]] == ["b"]
    assert report["kept"] == {"a": 1, "c": 1}
    assert "entirely outside" in caplog.text and "clipped" in caplog.text


def test_overlapping_boxes_of_a_label_are_merged_per_slice():
    dets = [
        Detection("a", 0.6, box_ijk=((10, 10, 0), (20, 20, 1))),
        Detection("a", 0.9, box_ijk=((11, 11, 1), (21, 21, 2))),  # IoU > 0.5 with the first on slice 1
        Detection("a", 0.5, box_ijk=((30, 30, 1), (35, 35, 1))),  # disjoint: kept on its own
        Detection("b", 0.7, box_ijk=((10, 10, 1), (20, 20, 1))),  # another label: never merged with "a"
    ]
    report = {}
    nms = det.detections_to_slice_boxes(dets, SHAPE, "axial", margin_vox=0, nms_iou=0.5, score_threshold=0.0,
                                        report=report)
    assert nms["a"] == [(0, (10, 10, 20, 20)), (1, (11, 11, 21, 21)), (1, (30, 30, 35, 35)),
                        (2, (11, 11, 21, 21))]
    assert nms["b"] == [(1, (10, 10, 20, 20))]
    assert report["merged"] == {"a": 1, "b": 0}
    union = det.detections_to_slice_boxes(dets, SHAPE, "axial", margin_vox=0, nms_iou=0.5, score_threshold=0.0,
                                          merge="union")
    assert union["a"][1:3] == [(1, (10, 10, 21, 21)), (1, (30, 30, 35, 35))]
    strict = det.detections_to_slice_boxes(dets, SHAPE, "axial", margin_vox=0, nms_iou=0.9, score_threshold=0.0)
    assert len([b for i, b in strict["a"] if i == 1]) == 3


def test_planning_bad_input():
    good = [Detection("a", 1.0, box_ijk=((1, 1, 1), (2, 2, 2)))]
    with pytest.raises(InputError, match="unknown axis"):
        det.detections_to_slice_boxes(good, SHAPE, "oblique")
    with pytest.raises(InputError, match="margin_vox"):
        det.detections_to_slice_boxes(good, SHAPE, margin_vox=-1)
    with pytest.raises(InputError, match="merge"):
        det.detections_to_slice_boxes(good, SHAPE, merge="max")
    with pytest.raises(InputError, match="score nan"):
        Detection("a", float("nan"), box_ijk=((1, 1, 1), (2, 2, 2)))
    with pytest.raises(InputError, match="empty"):
        Detection("", 1.0, box_ijk=((1, 1, 1), (2, 2, 2)))
    with pytest.raises(InputError, match="neither"):
        Detection("a", 1.0)
    with pytest.raises(InputError, match="box_ijk"):
        Detection("a", 1.0, box_ijk=((1, 1, 1), (2, np.inf, 2)))


# --------------------------------------------------------------------------- chain

def fill_boxes(shape_kji, axis):
    """A segmenter that fills each box: the chain's output is then exactly the planned boxes."""
    calls = []

    def segment(label, boxes):
        calls.append((label, len(boxes)))
        mask = np.zeros(shape_kji, np.uint8)
        for index, (x0, y0, x1, y1) in boxes:
            geometry.get_slice(mask, axis, index)[y0:y1 + 1, x0:x1 + 1] = 1
        return mask

    return segment, calls


def test_chain_gives_one_mask_per_label(aal):
    array_kji, ijk_to_ras, names = aal
    detector = det.LabelmapDetector(array_kji, ijk_to_ras, labels=names)
    segment, calls = fill_boxes(array_kji.shape, "axial")
    steps = []
    result = det.chain(detector, array_kji, ijk_to_ras, segment, labels=["Caudate_L", "Thalamus_L"],
                       margin_vox=2, progress=lambda f, msg: steps.append(f))
    assert set(result.masks) == {"Caudate_L", "Thalamus_L"}
    assert sorted(label for label, _ in calls) == ["Caudate_L", "Thalamus_L"]
    for name in result.masks:
        truth = array_kji == value_of(names, name)
        mask = result.masks[name]
        assert mask.dtype == np.uint8 and mask.shape == array_kji.shape
        assert mask[truth].all()  # the per-slice boxes cover the whole structure
        (i0, j0, k0), (i1, j1, k1) = numpy_box_ijk(truth)
        outside = mask.copy()
        outside[k0:k1 + 1, max(j0 - 2, 0):j1 + 3, max(i0 - 2, 0):i1 + 3] = 0
        assert not outside.any()  # and nothing beyond the 3D box + margin
        assert result.report["voxels"][name] == int(mask.sum())
    assert steps[0] == 0.0 and steps[-1] == 1.0 and steps == sorted(steps)


def test_chain_cancel_and_bad_segmenter(aal):
    array_kji, ijk_to_ras, names = aal
    detector = det.LabelmapDetector(array_kji, ijk_to_ras, labels={71: "Caudate_L", 77: "Thalamus_L"})
    segment, calls = fill_boxes(array_kji.shape, "axial")
    with pytest.raises(Cancelled):
        det.chain(detector, array_kji, ijk_to_ras, segment, should_stop=lambda: len(calls) >= 1)
    assert len(calls) == 1
    with pytest.raises(Exception, match="shape"):
        det.chain(detector, array_kji, ijk_to_ras, lambda label, boxes: np.zeros((2, 2, 2)))


class FixedDetector:
    def __init__(self, detections, labels=None):
        self._detections = detections
        if labels is not None:
            self.labels = labels

    def detect(self, array_kji, ijk_to_ras):
        return list(self._detections)


def test_chain_with_nothing_detected_is_empty_not_an_error(caplog):
    volume = np.zeros(SHAPE, np.int16)
    segment, calls = fill_boxes(SHAPE, "axial")
    with caplog.at_level(logging.WARNING, logger="MedFMSegmentLib.detectors"):
        result = det.chain(FixedDetector([]), volume, np.eye(4), segment)
    assert result.masks == {} and calls == []
    assert "found nothing" in caplog.text
    low = FixedDetector([Detection("a", 0.1, box_ijk=((1, 1, 1), (3, 3, 3)))])
    result = det.chain(low, volume, np.eye(4), segment, score_threshold=0.5)
    assert result.masks == {} and len(result.report["below_threshold"]) == 1
    # an empty labelmap finds nothing either
    empty = det.LabelmapDetector(np.zeros(SHAPE, np.uint8), np.eye(4))
    assert det.chain(empty, volume, np.eye(4), segment).masks == {}


def test_chain_unknown_labels_are_input_errors():
    volume = np.zeros(SHAPE, np.int16)
    segment, _ = fill_boxes(SHAPE, "axial")
    d = FixedDetector([Detection("liver", 0.9, box_ijk=((1, 1, 1), (3, 3, 3)))], labels=("liver", "spleen"))
    with pytest.raises(InputError, match="unknown label.*'kidney'"):
        det.chain(d, volume, np.eye(4), segment, labels=["kidney"])
    with pytest.raises(InputError, match="empty"):
        det.chain(d, volume, np.eye(4), segment, labels=[""])
    stray = FixedDetector([Detection("heart", 0.9, box_ijk=((1, 1, 1), (3, 3, 3)))], labels=("liver",))
    with pytest.raises(InputError, match="not in its label map"):
        det.chain(stray, volume, np.eye(4), segment)
    result = det.chain(d, volume, np.eye(4), segment, labels=["spleen", "liver"])
    assert set(result.masks) == {"liver"} and result.report["not_found"] == ["spleen"]


def test_chain_nan_score_from_a_detector_is_an_input_error():
    class NanDetector:
        def detect(self, array_kji, ijk_to_ras):
            return [Detection("a", float("nan"), box_ijk=((1, 1, 1), (2, 2, 2)))]

    segment, _ = fill_boxes(SHAPE, "axial")
    with pytest.raises(InputError, match="score nan"):
        det.chain(NanDetector(), np.zeros(SHAPE), np.eye(4), segment)


# --------------------------------------------------------------------------- specs

def test_detector_from_spec(aal, tmp_path):
    d = det.detector_from_spec(f"labelmap:{need(AAL)}:per-component:min-voxels=50")
    assert isinstance(d, det.LabelmapDetector) and d.per_component and d.min_voxels == 50
    assert "Thalamus_L" in d.labels
    boxes = tmp_path / "b.csv"
    boxes.write_text("label,x0,y0,z0,x1,y1,z1\nx,0,0,0,1,1,1\n")
    assert isinstance(det.detector_from_spec(f"boxes:{boxes}"), det.BoxFileDetector)
    with pytest.raises(InputError, match="unknown detector kind"):
        det.detector_from_spec(f"yolo:{boxes}")
    with pytest.raises(InputError, match="does not apply"):
        det.detector_from_spec(f"boxes:{boxes}:per-component")
    with pytest.raises(InputError, match="not found"):
        det.detector_from_spec(f"labelmap:{tmp_path / 'missing.nii.gz'}")
    with pytest.raises(InputError, match="KIND:PATH"):
        det.detector_from_spec("labelmap")


# --------------------------------------------------------------------------- MONAI RetinaNet

def test_model_frame_picks_the_ras_axes_of_a_permuted_volume():
    m = np.eye(4)
    m[:3, :3] = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 3.0], [2.0, 0.0, 0.0]])  # i -> S, j -> -R, k -> A
    frame = det.ModelFrame.build((10, 20, 30), m, "RAS", None)  # k, j, i sizes
    assert frame.perm == (1, 2, 0) and frame.flip == (True, False, False) and frame.size == (20, 10, 30)
    vol = np.zeros((10, 20, 30), np.float32)
    vol[2:5, 3:9, 11:17] = 1  # k 2..4, j 3..8, i 11..16
    model = frame.to_model(vol)
    assert model.shape == (20, 10, 30)
    x, y, z = np.nonzero(model > 0.5)
    box = (x.min(), y.min(), z.min(), x.max() + 1, y.max() + 1, z.max() + 1)
    assert frame.box_to_ijk(box) == ((11, 3, 2), (16, 8, 4))


def test_model_frame_round_trip_on_ct_bone(bone):
    mask_kji, ijk_to_ras = bone
    truth = numpy_box_ijk(mask_kji)
    for spacing in (None, [3.0, 2.0, 4.0]):
        frame = det.ModelFrame.build(mask_kji.shape, ijk_to_ras, "RAS", spacing)
        assert frame.flip == (True, True, False)  # LPS-stored CT: i and j point left and posterior
        model = frame.to_model(mask_kji)
        x, y, z = np.nonzero(model > 0.5)
        box = frame.box_to_ijk((x.min(), y.min(), z.min(), x.max() + 1, y.max() + 1, z.max() + 1))
        tol = 0 if spacing is None else np.ceil(np.divide(spacing, geometry.spacing(ijk_to_ras)))
        assert np.all(np.abs(np.subtract(box, truth)) <= tol), (spacing, box, truth)
        if spacing is None:
            assert box == truth


ANCHOR = (4, 2, 2)  # model voxels; levels scale it by 1 and 2
BUNDLE_CONFIG = {
    "labels": {"0": "anchor_probe", "1": "random"},
    "backbone": {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [8, 16, 32, 64],
                 "conv1_t_size": [3, 3, 3], "conv1_t_stride": [2, 2, 1]},
    "returned_layers": [1],
    "base_anchor_shapes": [list(ANCHOR)],
    "feature_map_scales": [1, 2],
    "spacing": [16.0, 16.0, 16.0],  # a coarse model grid keeps the test fast
    "intensity": {"a_min": -1000, "a_max": 2000, "b_min": 0, "b_max": 1, "clip": True},
    "score_thresh": 0.3,
    "nms_thresh": 0.22,
    "detections_per_img": 3000,
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny RetinaNet bundle: zero box regression (boxes = anchors), class 0 always on, class 1 random."""
    import torch

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("retinanet_bundle")
    (root / "configs").mkdir()
    (root / "models").mkdir()
    (root / "configs" / "detector.json").write_text(json.dumps(BUNDLE_CONFIG))
    cfg = det.check_retinanet_config(BUNDLE_CONFIG)
    network = det.build_retinanet(cfg).network
    with torch.no_grad():
        network.regression_head.bbox_reg.weight.zero_()
        network.regression_head.bbox_reg.bias.zero_()
        network.classification_head.cls_logits.weight[0::2].zero_()  # class 0 of the one anchor shape
        network.classification_head.cls_logits.bias[0] = 3.0
        network.classification_head.cls_logits.bias[1] = 0.0
    torch.save(network.state_dict(), root / "models" / "model.pt")
    network.use_list_output = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        script = torch.jit.script(network.eval())
    ts_path = root.parent / (root.name + "_model.ts")
    script.save(str(ts_path))
    (ts_path.parent / (ts_path.name + ".json")).write_text(json.dumps(BUNDLE_CONFIG))
    return root, ts_path


@pytest.fixture(scope="module")
def ct():
    return io.read_volume(need(CT))


def test_retinanet_bundle_detects_anchor_boxes_in_ijk(bundle, ct):
    array_kji, ijk_to_ras = ct
    detector = det.MonaiRetinaNetDetector(bundle[0])
    assert detector.labels == ("anchor_probe", "random")
    found = detector.detect(array_kji, ijk_to_ras)
    probes = [d for d in found if d.label == "anchor_probe"]
    assert probes and all(abs(d.score - 1 / (1 + np.exp(-3.0))) < 1e-4 for d in probes)
    frame = det.ModelFrame.build(array_kji.shape, ijk_to_ras, "RAS", BUNDLE_CONFIG["spacing"])
    n_ijk = np.array(array_kji.shape[::-1])
    scale_ijk = n_ijk / np.array(frame.size)  # model x, y, z are i, j, k here (RAS-aligned CT)
    interior = 0
    for d in found:
        lo, hi = np.array(d.box_ijk)
        assert np.all(lo >= 0) and np.all(hi <= n_ijk - 1)
        if np.any(lo == 0) or np.any(hi == n_ijk - 1):
            continue  # clipped at the image border
        interior += 1
        extent = hi - lo + 1
        assert any(np.all(np.abs(extent - np.multiply(ANCHOR, s) * scale_ijk) <= 1.0) for s in (1, 2)), extent
    assert interior >= 5


def test_retinanet_torchscript_matches_the_bundle(bundle, ct):
    array_kji, ijk_to_ras = ct
    crop = array_kji[20:90, 40:220, 30:230]
    from_bundle = det.MonaiRetinaNetDetector(bundle[0]).detect(crop, ijk_to_ras)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from_script = det.MonaiRetinaNetDetector(bundle[1]).detect(crop, ijk_to_ras)
    assert any(d.label == "random" for d in from_bundle)
    key = lambda d: (d.label, d.box_ijk)  # noqa: E731
    assert sorted(map(key, from_bundle)) == sorted(map(key, from_script))
    scores = {key(d): d.score for d in from_bundle}
    for d in from_script:
        assert abs(scores[key(d)] - d.score) < 1e-4


def test_retinanet_in_a_chain_and_from_spec(bundle, ct):
    array_kji, ijk_to_ras = ct
    detector = det.detector_from_spec(f"monai:{bundle[0]}:device=cpu")
    segment, calls = fill_boxes(array_kji.shape, "axial")
    result = det.chain(detector, array_kji, ijk_to_ras, segment, labels=["anchor_probe"], score_threshold=0.9)
    assert set(result.masks) == {"anchor_probe"} and [c[0] for c in calls] == ["anchor_probe"]
    assert result.report["kept"]["anchor_probe"] >= 5


def test_retinanet_bad_bundles(bundle, tmp_path):
    with pytest.raises(ModelError, match="no such bundle"):
        det.MonaiRetinaNetDetector(tmp_path / "nothing")
    empty = tmp_path / "empty_bundle"
    (empty / "configs").mkdir(parents=True)
    (empty / "configs" / "detector.json").write_text(json.dumps(BUNDLE_CONFIG))
    with pytest.raises(ModelError, match="neither models/model.pt"):
        det.MonaiRetinaNetDetector(empty)
    (empty / "models").mkdir()
    (empty / "models" / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot load"):
        det.MonaiRetinaNetDetector(empty)
    bad = dict(BUNDLE_CONFIG, labels={"0": "a", "2": "c"})
    with pytest.raises(ModelError, match="every class"):
        det.check_retinanet_config(bad)
    with pytest.raises(ModelError, match="labels"):
        det.check_retinanet_config({k: v for k, v in BUNDLE_CONFIG.items() if k != "labels"})
    wrong = dict(BUNDLE_CONFIG, backbone=dict(BUNDLE_CONFIG["backbone"], block_inplanes=[16, 32, 64, 128]))
    mismatch = tmp_path / "mismatch"
    (mismatch / "configs").mkdir(parents=True)
    (mismatch / "models").mkdir()
    (mismatch / "configs" / "detector.json").write_text(json.dumps(wrong))
    (mismatch / "models" / "model.pt").symlink_to(bundle[0] / "models" / "model.pt")
    with pytest.raises(ModelError, match="does not match"):
        det.MonaiRetinaNetDetector(mismatch)


def test_labelmap_from_a_seg_nrrd_gives_one_region_per_segment(aal, tmp_path):
    array_kji, ijk_to_ras, names = aal
    masks = {"Caudate_L": (array_kji == 71).astype(np.uint8),
             "Striatum_L": ((array_kji == 71) | (array_kji == 73)).astype(np.uint8)}  # overlaps Caudate_L
    path = tmp_path / "seg.seg.nrrd"
    io.write_segmentation(path, masks, ijk_to_ras)
    detector = det.LabelmapDetector(path)
    assert set(detector.labels) == set(masks)
    found = {d.label: d.box_ijk for d in detector.detect(array_kji, ijk_to_ras)}
    assert found == {name: numpy_box_ijk(m) for name, m in masks.items()}


def test_slice_boxes_on_another_axis_fall_back_to_their_3d_hull():
    d = Detection("a", 0.9, slice_boxes=[("coronal", 5, (2, 3, 6, 8)), ("coronal", 7, (1, 4, 5, 9))])
    assert det.detections_to_slice_boxes([d], SHAPE, "coronal", margin_vox=0)["a"] == \
        [(5, (2, 3, 6, 8)), (7, (1, 4, 5, 9))]
    # hull: i 1..6, j 5..7, k 3..9
    assert det.detections_to_slice_boxes([d], SHAPE, "axial", margin_vox=0)["a"] == \
        [(k, (1, 5, 6, 7)) for k in range(3, 10)]
    assert det.detections_to_slice_boxes([d], SHAPE, "coronal", margin_vox=0, slice_margin=1)["a"] == \
        [(4, (2, 3, 6, 8)), (5, (2, 3, 6, 8)), (7, (1, 4, 5, 9)), (8, (1, 4, 5, 9))]
