"""The effect's interaction bookkeeping (MedFMSegmentLib.interaction), without Slicer."""
from __future__ import annotations

import numpy as np
import pytest

from MedFMSegmentLib.errors import InputError
from MedFMSegmentLib.interaction import PROMPTS_TAG, Interaction, parse_prompts, view_axis_and_index


def test_clicks_polarity_shift_and_toggle():
    it = Interaction()
    with pytest.raises(InputError, match="select a segment"):
        it.click((1, 2, 3), "axial")
    it.select("Segment_1")
    assert it.click((10.2, 20.7, 5.4), "axial").positive is True
    shifted = it.click((11, 21, 5), "axial", shift=True)
    assert shifted.positive is False and shifted.slice == ("axial", 5)
    assert it.toggle_polarity() is False
    assert it.click((12, 22, 5), "axial").positive is False
    assert it.click((12, 22, 5), "axial", shift=True).positive is True  # Shift inverts the toggled polarity
    sagittal = it.click((7.6, 3, 4), "sagittal")
    assert sagittal.slice == ("sagittal", 8)
    assert [p.id for p in it.prompts()] == [1, 2, 3, 4, 5]


def test_prompts_belong_to_their_segment():
    it = Interaction()
    it.select("A")
    it.click((1, 1, 1), "axial")
    it.select("B")
    assert it.prompts() == [] and it.session_plan() == (True, []), "B starts empty: A's clicks are not re-sent"
    b = it.box((0, 0, 2), (10, 12, 2), "axial")
    it.mark_applied("B", [b])
    it.select("A")
    reset, prompts = it.session_plan()
    assert reset and [p.axis for p in prompts] == ["axial"] and prompts[0].kind == "point"
    assert [p.kind for p in it.prompts("B")] == ["box"]


def test_box_replaces_the_slice_box_and_rejects_tiny_drags():
    it = Interaction()
    it.select("S")
    first = it.box((0, 0, 2.2), (10, 12, 1.8), "axial")
    assert first.box_ijk[0][2] == first.box_ijk[1][2] == 2 and first.box_xy() == (0, 0, 10, 12)
    it.click((5, 5, 2), "axial")
    second = it.box((1, 1, 2), (8, 9, 2), "axial")
    assert [p.id for p in it.prompts()] == [2, second.id], "the new box replaced the old one, the click stays"
    with pytest.raises(InputError, match="too small"):
        it.box((1, 1, 2), (1.5, 9, 2), "axial")
    assert len(it.prompts()) == 2


def test_tag_round_trip_and_undo_restores_the_previous_list():
    it = Interaction()
    it.select("S")
    it.box((0, 0, 3), (20, 20, 3), "axial")
    it.mark_written()
    before_click = it.text()  # stored in the segment before the click's write
    click = it.click((5, 6, 3), "axial", shift=True)
    assert it.dirty_slices() == {("axial", 3)}
    it.mark_written()
    after_click = it.text()
    assert parse_prompts(after_click) == it.prompts()
    it.mark_applied("S", it.prompts())
    # Ctrl+Z: the editor restores the segment and its tag; the effect reloads it.
    assert it.load("S", before_click) is True
    assert click.id not in [p.id for p in it.prompts()]
    assert it.dirty_slices() == set(), "after an undo the segment already holds the result: nothing to write"
    assert it.session_plan() == (True, it.prompts()), "the session is rebuilt without the undone click"
    assert it.load("S", after_click) is True and it.prompts()[-1] == click  # Ctrl+Y
    assert it.load("S", after_click) is False
    new = it.click((9, 9, 3), "axial")
    assert new.id != click.id, "ids stay unique across undo / redo"


def test_move_and_remove_update_the_list_and_the_dirty_slices():
    it = Interaction()
    it.select("S")
    a = it.click((5, 5, 3), "axial")
    b = it.click((6, 6, 3), "axial")
    it.mark_written()
    it.mark_applied("S", it.prompts())
    assert it.move(a.id, (5, 5, 3.0001)) is None
    moved = it.move(a.id, (7, 8, 4.2))
    assert moved.slice == ("axial", 4) and moved.id == a.id
    assert it.dirty_slices() == {("axial", 3), ("axial", 4)}, "the old slice loses the point, the new one gains it"
    assert it.session_plan()[0] is True
    it.mark_written(slices={("axial", 3), ("axial", 4)})
    assert it.dirty_slices() == set()
    assert it.remove(b.id) == b
    assert it.dirty_slices() == {("axial", 3)}
    with pytest.raises(InputError, match="no prompt"):
        it.remove(b.id)
    assert [p.id for p in it.clear()] == [a.id] and it.prompts() == []


def test_session_plan_appends_new_prompts_only():
    it = Interaction()
    it.select("S")
    a = it.click((5, 5, 3), "axial")
    assert it.session_plan() == (True, [a])
    it.mark_applied("S", [a])
    b = it.click((6, 6, 3), "axial")
    assert it.session_plan() == (False, [b])
    it.session_lost()
    assert it.session_plan() == (True, [a, b])


def test_requests_during_a_job_are_queued_never_lost():
    it = Interaction()
    assert it.request("segment") is True and it.busy
    assert it.request("segment") is False
    assert it.request("propagate") is False
    assert it.request("segment") is False
    assert it.queued == ["segment", "propagate"], "pending prompt work is coalesced, other requests kept in order"
    assert it.finished() == "segment" and it.finished() == "propagate" and it.finished() is None
    assert not it.busy
    with pytest.raises(InputError, match="unknown request"):
        it.request("explode")


@pytest.mark.parametrize("text, match", [("{", "not JSON"), ('{"format": 9, "prompts": []}', "format"),
                                          ('{"format": 1, "prompts": [{"kind": "lasso", "id": 1, "axis": "axial", '
                                           '"index": 0}]}', "lasso"),
                                          ('{"format": 1, "prompts": [{"kind": "point", "id": 1, "axis": "up", '
                                           '"index": 0, "ijk": [1, 2, 3]}]}', "up")])
def test_bad_tags_are_input_errors_naming_the_tag(text, match):
    with pytest.raises(InputError, match=match):
        Interaction().load("S", text)
    assert PROMPTS_TAG == "MedFM.Prompts"


def _slice_to_ras(x_ras, y_ras, origin_ras):
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = x_ras, y_ras, np.cross(x_ras, y_ras), origin_ras
    return m


def test_the_clicked_view_decides_the_axis_also_when_oblique():
    ijk_to_ras = np.diag([1.0, 1.0, 1.5, 1.0])
    shape = (10, 20, 30)
    assert view_axis_and_index(_slice_to_ras((-1, 0, 0), (0, 1, 0), (4, 5, 9)), ijk_to_ras, shape) == ("axial", 6)
    assert view_axis_and_index(_slice_to_ras((0, -1, 0), (0, 0, 1), (11.2, 3, 2)), ijk_to_ras, shape) == \
        ("sagittal", 11)
    tilt = np.deg2rad(30)  # a coronal view tilted by 30 degrees is still nearest to coronal
    assert view_axis_and_index(_slice_to_ras((-1, 0, 0), (0, np.sin(tilt), np.cos(tilt)), (0, 7, 4)), ijk_to_ras,
                               shape) == ("coronal", 7)
    rotated = np.eye(4)
    rotated[:3, :3] = [[0, 0, 1.5], [1, 0, 0], [0, 1, 0]]  # volume axes permuted: k runs along R
    assert view_axis_and_index(_slice_to_ras((0, 1, 0), (0, 0, 1), (3, 0, 0)), rotated, shape)[0] == "axial"
    with pytest.raises(InputError, match="outside the volume"):
        view_axis_and_index(_slice_to_ras((0, -1, 0), (0, 0, 1), (99, 0, 0)), ijk_to_ras, shape, "Yellow")


def test_replaying_after_a_removed_click_equals_a_fresh_session(colin27_session, colin27_aal):
    """On Colin27 + LiteMedSAM: remove a click, replay the plan; the slice equals one never given that click."""
    session = colin27_session
    session.reset()
    k = 80
    region = colin27_aal[k] == 77  # Thalamus_L
    ys, xs = np.nonzero(region)
    it = Interaction()
    it.select("Thalamus")
    it.box((xs.min() - 2, ys.min() - 2, k), (xs.max() + 2, ys.max() + 2, k), "axial")
    far = it.click((xs.max() + 25, ys.mean(), k), "axial")  # a stray include click outside the thalamus
    neg = it.click((xs.mean(), ys.mean(), k), "axial", shift=True)
    results = {}
    for p in it.session_plan()[1]:
        results[p.slice] = p.apply(session)
    it.mark_applied("Thalamus", it.prompts())
    with_stray = results[("axial", k)].mask.copy()
    it.remove(far.id)
    reset, plan = it.session_plan()
    assert reset and [p.id for p in plan] == [1, neg.id]
    session.reset()
    for p in plan:
        results[p.slice] = p.apply(session)
    replayed = results[("axial", k)].mask.copy()
    session.reset()
    session.add_box("axial", k, plan[0].box_xy())
    fresh = session.add_point(ijk=np.array(neg.point_ijk), positive=False, axis="axial").mask
    session.reset()
    np.testing.assert_array_equal(replayed, fresh)
    assert not np.array_equal(with_stray, replayed), "the stray click had changed the mask"
