"""Tests of MedFMSegmentLib.prompts: the prompts file schema, validation, resolution and writing."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedFMSegmentLib import geometry, io
from MedFMSegmentLib.errors import InputError
from MedFMSegmentLib.prompts import (
    Box2D, Point, PromptSet, SegmentPrompts, dump_prompts, dumps_prompts, load_prompts, parse_prompts,
    resolve, to_dict,
)

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
AAL = DATA / "colin27" / "aal.nii.gz"

SHAPE_KJI = (20, 30, 40)  # 40 i x 30 j x 20 k


def oblique_matrix() -> np.ndarray:
    a = np.deg2rad(25.0)
    rot = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(a), -np.sin(a)], [0.0, np.sin(a), np.cos(a)]])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag([-0.7, 0.9, 2.0])
    m[:3, 3] = (30.0, -12.0, 5.5)
    return m


def ijk_prompts() -> dict:
    return {
        "space": "IJK",
        "segments": [
            {"name": "roi_only", "roi": [[5, 6, 2], [20, 25, 10]]},
            {"name": "boxes", "boxes": [
                {"corners": [[3, 4, 7], [13, 24, 7]]},
                {"corners": [[10, 9, 2], [30, 9, 15]], "axis": "coronal"},
                {"corners": [[12, 2, 3], [12, 20, 18]], "axis": "sagittal"},
            ], "propagate": False},
            {"name": "points", "points": [
                {"position": [4, 5, 6]},
                {"position": [7.5, 8, 9], "positive": False, "axis": "sagittal"},
            ], "adapter": "/adapters/x"},
        ],
    }


def assert_same(a: PromptSet, b: PromptSet, atol: float = 1e-5) -> None:
    """Equal prompt sets, up to float noise in slice coordinates."""
    assert a.names() == b.names()
    for sa, sb in zip(a.segments, b.segments):
        fields = ("roi_ijk", "propagate", "adapter", "roi_axis")
        assert [getattr(sa, f) for f in fields] == [getattr(sb, f) for f in fields]
        assert [(x.axis, x.index) for x in sa.boxes] == [(x.axis, x.index) for x in sb.boxes]
        assert [(x.axis, x.index, x.positive) for x in sa.points] == [(x.axis, x.index, x.positive) for x in sb.points]
        for xa, xb in zip(sa.boxes, sb.boxes):
            np.testing.assert_allclose(xa.box_xy, xb.box_xy, atol=atol)
        for xa, xb in zip(sa.points, sb.points):
            np.testing.assert_allclose(xa.xy_slice, xb.xy_slice, atol=atol)


def message_of(text: str) -> str:
    with pytest.raises(InputError) as info:
        parse_prompts(text, "p.json")
    return str(info.value)


# --------------------------------------------------------------------------- parsing and defaults

def test_parse_fills_defaults():
    raw = parse_prompts(json.dumps(ijk_prompts()), "p.json")
    assert raw["space"] == "IJK"
    roi_only, boxes, points = raw["segments"]
    assert roi_only["roi_axis"] == "axial" and roi_only["boxes"] == [] and roi_only["points"] == []
    assert roi_only["propagate"] is True and roi_only["adapter"] is None
    assert [b["axis"] for b in boxes["boxes"]] == ["axial", "coronal", "sagittal"]
    assert boxes["propagate"] is False and boxes["roi"] is None
    assert [p["positive"] for p in points["points"]] == [True, False]
    assert all(isinstance(v, float) for v in points["points"][0]["position"])
    # parsing is idempotent and does not modify its input
    data = ijk_prompts()
    before = copy.deepcopy(data)
    assert parse_prompts(parse_prompts(data)) == parse_prompts(data)
    assert data == before


def test_comment_keys_are_ignored():
    data = ijk_prompts()
    data["_comment"] = "made by hand"
    data["segments"][0]["_note"] = {"anything": [1, 2]}
    assert parse_prompts(data) == parse_prompts(ijk_prompts())


# --------------------------------------------------------------------------- resolution in IJK

def test_resolve_ijk_follows_the_axis_table():
    ps = resolve(ijk_prompts(), np.eye(4), SHAPE_KJI)
    assert ps.names() == ["roi_only", "boxes", "points"]
    assert ps.get("roi_only") == SegmentPrompts("roi_only", roi_ijk=((5, 6, 2), (20, 25, 10)))
    boxes = ps.get("boxes").boxes
    # axial = k, x = i, y = j; coronal = j, x = i, y = k; sagittal = i, x = j, y = k
    assert boxes[0] == Box2D("axial", 7, (3.0, 4.0, 13.0, 24.0))
    assert boxes[1] == Box2D("coronal", 9, (10.0, 2.0, 30.0, 15.0))
    assert boxes[2] == Box2D("sagittal", 12, (2.0, 3.0, 20.0, 18.0))
    assert ps.get("boxes").propagate is False
    points = ps.get("points")
    assert points.points == [Point("axial", 6, (4.0, 5.0), True), Point("sagittal", 8, (8.0, 9.0), False)]
    assert points.adapter == "/adapters/x"
    with pytest.raises(KeyError):
        ps.get("nothing")


def test_roi_bounds_cover_voxels_touched_by_more_than_half():
    data = {"space": "IJK", "segments": [{"name": "r", "roi": [[4.4, 6.6, 2.0], [9.5, 10.49, 3.0]]}]}
    roi = resolve(data, np.eye(4), SHAPE_KJI).segments[0].roi_ijk
    assert roi == ((4, 7, 2), (9, 10, 3))


def test_box_corners_within_half_a_voxel_share_a_slice():
    data = {"space": "IJK", "segments": [{"name": "b", "boxes": [{"corners": [[1, 2, 7.8], [9, 9, 8.2]]}]}]}
    assert resolve(data, np.eye(4), SHAPE_KJI).segments[0].boxes[0].index == 8


# --------------------------------------------------------------------------- resolution in RAS

def test_ras_and_ijk_files_resolve_identically_on_an_oblique_volume():
    m = oblique_matrix()
    ijk = ijk_prompts()
    ras = copy.deepcopy(ijk)
    ras["space"] = "RAS"
    for seg in ras["segments"]:
        if "roi" in seg:
            seg["roi"] = geometry.ijk_to_ras(seg["roi"], m).tolist()
        for box in seg.get("boxes", []):
            box["corners"] = geometry.ijk_to_ras(box["corners"], m).tolist()
        for point in seg.get("points", []):
            point["position"] = geometry.ijk_to_ras(point["position"], m).tolist()
    assert_same(resolve(ras, m, SHAPE_KJI), resolve(ijk, np.eye(4), SHAPE_KJI), atol=1e-9)


@pytest.mark.data
def test_atlas_structure_bounding_box_resolves_to_its_voxels():
    """A RAS box around Thalamus_L (computed with SimpleITK's own geometry) lands on its voxels."""
    if not AAL.exists():
        pytest.skip(f"real data not available: {AAL}")
    atlas, ijk_to_ras = io.read_volume(AAL)
    thalamus = atlas == 77
    (k0, j0, i0), (k1, j1, i1) = geometry.bbox_kji(thalamus)
    image = sitk.ReadImage(str(AAL))

    def ras(i, j, k):
        x, y, z = image.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
        return [-x, -y, z]

    k_mid = (k0 + k1) // 2
    j_mid = (j0 + j1) // 2
    axial_box = geometry.box_from_mask(geometry.get_slice(thalamus, "axial", k_mid))
    coronal_box = geometry.box_from_mask(geometry.get_slice(thalamus, "coronal", j_mid))
    ks, js, is_ = np.nonzero(thalamus)
    centre = int(round(is_.mean())), int(round(js.mean())), int(round(ks.mean()))
    data = {"space": "RAS", "segments": [{
        "name": "Thalamus_L",
        "roi": [ras(i0, j0, k0), ras(i1, j1, k1)],
        "boxes": [
            {"corners": [ras(axial_box[0], axial_box[1], k_mid), ras(axial_box[2], axial_box[3], k_mid)]},
            {"corners": [ras(coronal_box[0], j_mid, coronal_box[1]), ras(coronal_box[2], j_mid, coronal_box[3])],
             "axis": "coronal"},
        ],
        "points": [{"position": ras(*centre)}],
    }]}
    seg = resolve(data, ijk_to_ras, atlas.shape).get("Thalamus_L")
    assert seg.roi_ijk == ((i0, j0, k0), (i1, j1, k1))
    assert seg.boxes[0] == Box2D("axial", k_mid, tuple(float(v) for v in axial_box))
    assert seg.boxes[1] == Box2D("coronal", j_mid, tuple(float(v) for v in coronal_box))
    point = seg.points[0]
    assert point.index == centre[2]
    assert thalamus[point.index, int(round(point.xy_slice[1])), int(round(point.xy_slice[0]))]


# --------------------------------------------------------------------------- writing back

@pytest.mark.parametrize("space", ["IJK", "RAS"])
def test_to_dict_round_trip(space):
    m = oblique_matrix()
    ps = resolve(ijk_prompts(), np.eye(4), SHAPE_KJI)
    data = to_dict(ps, m if space == "RAS" else None)
    assert data["space"] == space
    text = dumps_prompts(ps, m if space == "RAS" else None)
    assert json.loads(text) == data
    again = resolve(json.loads(text), m if space == "RAS" else np.eye(4), SHAPE_KJI)
    if space == "IJK":
        assert again == ps
    else:
        assert_same(again, ps)  # RAS is written with 6 decimals (1 nm)


def test_dump_and_load_file(tmp_path):
    ps = resolve(ijk_prompts(), np.eye(4), SHAPE_KJI)
    path = tmp_path / "prompts.json"
    dump_prompts(ps, path)
    text = path.read_text()
    assert '"corners": [[3.0, 4.0, 7.0], [13.0, 24.0, 7.0]]' in text  # coordinates stay on one line
    assert resolve(load_prompts(path), np.eye(4), SHAPE_KJI) == ps
    with pytest.raises(InputError, match="already exists"):
        dump_prompts(ps, path)
    dump_prompts(ijk_prompts(), path, overwrite=True)  # a raw dict is written in its own space
    assert load_prompts(path) == parse_prompts(ijk_prompts())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.json"]


def test_relative_adapter_is_relative_to_the_prompts_file(tmp_path):
    data = {"space": "IJK", "segments": [{"name": "a", "roi": [[0, 0, 0], [5, 5, 5]], "adapter": "adapters/liver"},
                                         {"name": "b", "roi": [[0, 0, 0], [5, 5, 5]], "adapter": "/abs/path"}]}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    raw = load_prompts(path)
    assert raw["segments"][0]["adapter"] == str(tmp_path / "adapters" / "liver")
    assert raw["segments"][1]["adapter"] == "/abs/path"


# --------------------------------------------------------------------------- JSON errors

def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "space": "IJK",\n  "segments": [\n    {"name": "a",}\n  ]\n}\n')
    with pytest.raises(InputError) as info:
        load_prompts(path)
    message = str(info.value)
    assert str(path) in message and "line 4" in message and "column" in message


def test_duplicate_json_key():
    assert "'space' appears twice" in message_of('{"space": "IJK", "space": "RAS", "segments": []}')


def test_top_level_must_be_an_object():
    assert "must be a JSON object" in message_of("[1, 2]")


def test_missing_prompts_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_prompts(tmp_path / "none.json")
    with pytest.raises(InputError, match="none.json: prompts file not found"):  # a path given as text
        resolve(str(tmp_path / "none.json"), np.eye(4), SHAPE_KJI)


def test_non_utf8_prompts_file(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"space": "IJK", "segments": [{"name": "F\xe9mur"}]}'.encode("latin-1"))
    with pytest.raises(InputError, match=str(path)):
        load_prompts(path)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_in_json(literal):
    text = '{"space": "IJK", "segments": [{"name": "a", "points": [{"position": [1, %s, 3]}]}]}' % literal
    message = message_of(text)
    assert "segments[0].points[0].position[1]" in message and "finite" in message


# --------------------------------------------------------------------------- schema errors

def mutated(change):
    data = ijk_prompts()
    change(data)
    return data


SCHEMA_ERRORS = [
    ("unknown top key", lambda d: d.update(spaec="IJK"), ["spaec", "unknown key", "did you mean 'space'"]),
    ("unknown segment key", lambda d: d["segments"][1].update(boxs=[]), ["segments[1].boxs", "did you mean 'boxes'"]),
    ("unknown box key", lambda d: d["segments"][1]["boxes"][0].update(label=1), ["segments[1].boxes[0].label"]),
    ("missing space", lambda d: d.pop("space"), ["space: missing"]),
    ("unknown space", lambda d: d.update(space="LPS"), ["unknown space 'LPS'", "negate x and y"]),
    ("missing segments", lambda d: d.pop("segments"), ["segments: missing"]),
    ("empty segments", lambda d: d.update(segments=[]), ["segments: is empty"]),
    ("segments not a list", lambda d: d.update(segments={"name": "a"}), ["segments: expected a list"]),
    ("segment not an object", lambda d: d["segments"].append("liver"), ["segments[3]: expected an object"]),
    ("missing name", lambda d: d["segments"][1].pop("name"), ["segments[1].name: missing"]),
    ("empty name", lambda d: d["segments"][1].update(name="  "), ["segments[1].name", "non-empty string"]),
    ("name not a string", lambda d: d["segments"][1].update(name=7), ["segments[1].name", "got a number 7"]),
    ("name with newline", lambda d: d["segments"][1].update(name="a\nb"), ["control characters"]),
    ("duplicate names", lambda d: d["segments"][2].update(name="boxes"),
     ["segments[2].name", "duplicate name 'boxes'", "segments[1]"]),
    ("no prompt", lambda d: d["segments"].append({"name": "empty"}), ["segments[3]", "'empty' has no prompt"]),
    ("no prompt, empty lists", lambda d: d["segments"].append({"name": "e", "boxes": [], "points": []}),
     ["'e' has no prompt"]),
    ("boxes not a list", lambda d: d["segments"][1].update(boxes={"corners": []}),
     ["segments[1].boxes: expected a list"]),
    ("box missing corners", lambda d: d["segments"][1]["boxes"][0].pop("corners"),
     ["segments[1].boxes[0].corners: missing"]),
    ("three corners", lambda d: d["segments"][1]["boxes"][0]["corners"].append([1, 2, 3]),
     ["segments[1].boxes[0].corners", "expected 2 corners", "got 3 items"]),
    ("corner with 2 values", lambda d: d["segments"][1]["boxes"][0]["corners"][1].pop(),
     ["segments[1].boxes[0].corners[1]", "expected 3 numbers", "got 2 values"]),
    ("corner value a string", lambda d: d["segments"][1]["boxes"][0]["corners"][0].__setitem__(2, "7"),
     ["segments[1].boxes[0].corners[0][2]", "expected a number", "'7'"]),
    ("corner value a boolean", lambda d: d["segments"][1]["boxes"][0]["corners"][0].__setitem__(2, True),
     ["segments[1].boxes[0].corners[0][2]", "expected a number"]),
    ("corners a string", lambda d: d["segments"][1]["boxes"][0].update(corners="1,2,3"), ["expected 2 corners"]),
    ("unknown axis", lambda d: d["segments"][1]["boxes"][0].update(axis="transverse"),
     ["segments[1].boxes[0].axis", "unknown axis 'transverse'", "axial, coronal, sagittal"]),
    ("unknown roi axis", lambda d: d["segments"][0].update(roi_axis="Axial"), ["segments[0].roi_axis", "'Axial'"]),
    ("roi axis without roi", lambda d: d["segments"][1].update(roi_axis="axial"),
     ["segments[1].roi_axis", "without a roi"]),
    ("roi with 1 corner", lambda d: d["segments"][0]["roi"].pop(), ["segments[0].roi", "expected 2 corners"]),
    ("point missing position", lambda d: d["segments"][2]["points"][0].pop("position"),
     ["segments[2].points[0].position: missing"]),
    ("position with 4 values", lambda d: d["segments"][2]["points"][0]["position"].append(1),
     ["segments[2].points[0].position", "got 4 values"]),
    ("positive not a boolean", lambda d: d["segments"][2]["points"][0].update(positive="yes"),
     ["segments[2].points[0].positive", "expected true or false"]),
    ("propagate not a boolean", lambda d: d["segments"][1].update(propagate=1), ["segments[1].propagate"]),
    ("adapter not a string", lambda d: d["segments"][2].update(adapter=3), ["segments[2].adapter"]),
]


@pytest.mark.parametrize("change, parts", [(c, p) for _, c, p in SCHEMA_ERRORS], ids=[n for n, _, _ in SCHEMA_ERRORS])
def test_schema_error(change, parts):
    with pytest.raises(InputError) as info:
        parse_prompts(mutated(change), "prompts.json")
    message = str(info.value)
    assert message.startswith("prompts.json:")
    for part in parts:
        assert part in message, message


def test_all_problems_are_reported_together():
    def change(d):
        d["segments"][0].update(name=1)
        d["segments"][1]["boxes"][0].update(axis="z")
        d["segments"][2]["points"][0].update(positive=None)

    with pytest.raises(InputError) as info:
        parse_prompts(mutated(change), "p.json")
    message = str(info.value)
    assert "3 problems" in message
    for where in ("segments[0].name", "segments[1].boxes[0].axis", "segments[2].points[0].positive"):
        assert where in message


# --------------------------------------------------------------------------- geometric errors

def one_segment(**prompts) -> dict:
    return {"space": "IJK", "segments": [{"name": "liver", **prompts}]}


GEOMETRY_ERRORS = [
    ("zero-width box", one_segment(boxes=[{"corners": [[5, 2, 3], [5, 9, 3]]}]),
     ["segments[0].boxes[0].corners", "zero width"]),
    ("zero-height coronal box", one_segment(boxes=[{"corners": [[1, 2, 3], [9, 2, 3]], "axis": "coronal"}]),
     ["zero height"]),
    ("corners on two slices", one_segment(boxes=[{"corners": [[1, 2, 3], [9, 9, 3.5]]}]),
     ["segments[0].boxes[0].corners", "not on one axial slice", "k = 3.00 and 3.50"]),
    ("sagittal corners on two slices", one_segment(boxes=[{"corners": [[1, 2, 3], [4, 9, 9]], "axis": "sagittal"}]),
     ["not on one sagittal slice", "i = 1.00 and 4.00"]),
    ("zero-extent roi", one_segment(roi=[[1, 2, 3], [9, 2, 8]]), ["segments[0].roi", "zero extent along j"]),
    ("box on a slice outside", one_segment(boxes=[{"corners": [[1, 2, 25], [9, 9, 25]]}]),
     ["segments[0].boxes[0]", "'liver'", "slice k=25", "outside the volume", "i 0..39, j 0..29, k 0..19"]),
    ("box beside the slice", one_segment(boxes=[{"corners": [[41, 2, 5], [60, 9, 5]]}]), ["outside the volume"]),
    ("point outside", one_segment(points=[{"position": [1, 2, -3]}]),
     ["segments[0].points[0].position", "'liver'", "voxel (1.0, 2.0, -3.0)", "k 0..19"]),
    ("roi entirely outside", one_segment(roi=[[50, 2, 3], [60, 9, 8]]),
     ["segments[0].roi", "'liver'", "entirely outside", "i 0..39"]),
]


@pytest.mark.parametrize("data, parts", [(d, p) for _, d, p in GEOMETRY_ERRORS], ids=[n for n, _, _ in GEOMETRY_ERRORS])
def test_geometry_error(data, parts):
    with pytest.raises(InputError) as info:
        resolve(data, np.eye(4), SHAPE_KJI, source="p.json")
    message = str(info.value)
    assert message.startswith("p.json:")
    for part in parts:
        assert part in message, message


def test_ras_outside_message_gives_both_frames():
    data = {"space": "RAS", "segments": [{"name": "liver", "points": [{"position": [500, 0, 0]}]}]}
    with pytest.raises(InputError) as info:
        resolve(data, oblique_matrix(), SHAPE_KJI)
    message = str(info.value)
    assert "RAS (500, 0, 0) = voxel (" in message and "(RAS R " in message


def test_partly_outside_roi_and_box_are_clipped_with_a_warning(caplog):
    data = one_segment(roi=[[-6, 3, 2], [50, 9, 30]], boxes=[{"corners": [[-3.0, 5, 4], [45, 40, 4]]},
                                                             {"corners": [[-0.4, 5, 6], [39.4, 9, 6]]}])
    with caplog.at_level(logging.WARNING, logger="MedFMSegmentLib.prompts"):
        seg = resolve(data, np.eye(4), SHAPE_KJI).segments[0]
    assert seg.roi_ijk == ((0, 3, 2), (39, 9, 19))
    assert seg.boxes[0] == Box2D("axial", 4, (0.0, 5.0, 39.0, 29.0))
    assert seg.boxes[1] == Box2D("axial", 6, (0.0, 5.0, 39.0, 9.0))  # within half a voxel: clipped silently
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "roi" in warnings[0] and "'liver'" in warnings[0] and "clipped" in warnings[0]
    assert "boxes[0]" in warnings[1] and "clipped" in warnings[1]


def test_bad_volume_description():
    with pytest.raises(InputError, match="shape_kji"):
        resolve(ijk_prompts(), np.eye(4), (20, 30))
    with pytest.raises(InputError, match="singular"):
        resolve(ijk_prompts(), np.zeros((4, 4)), SHAPE_KJI)


def test_prompt_set_is_plain_data():
    ps = PromptSet([SegmentPrompts("a", boxes=[Box2D("axial", 1, (0.0, 0.0, 2.0, 2.0))])])
    assert to_dict(ps) == {"space": "IJK", "segments": [
        {"name": "a", "boxes": [{"corners": [[0.0, 0.0, 1.0], [2.0, 2.0, 1.0]], "axis": "axial"}], "propagate": True}]}
