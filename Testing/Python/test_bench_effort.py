"""bench_effort's parts and merge: n processes share the structure list, their files join into one result."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_effort")


def record(dices, seconds):
    return {"dice": dices, "slices_to_0.85": None, "slices_to_0.90": None, "fbs_same": [0.1] * len(dices),
            "repropagation_seconds": seconds, "repropagation_cpu_seconds": seconds, "encoded": [0] * len(seconds),
            "adapt_seconds": [], "review": [], "first_propagation": {"visited": [1, 9], "result_extent": [2, 8]}}


def result(names, settings):
    rows = {n: {"extent": [1, 9], "fbs_slices_to_0.90": 4, "guided": record([0.5, 0.6, 0.7, 0.8], [1.0, 2.0, 3.0]),
                "oracle": record([0.5, 0.7, 0.8, 0.9], [4.0, 5.0, 6.0])} for n in names}
    return {"settings": settings, "load_average": [1.0, 1.0, 1.0], "structures": rows}


def test_parts_cover_the_list_once():
    names = ["a", "b", "c", "d", "e"]
    parts = [bench.part_of(names, f"{i}/2") for i in (1, 2)]
    assert parts == [["a", "c", "e"], ["b", "d"]] and bench.part_of(names, None) == names
    with pytest.raises(SystemExit):
        bench.part_of(names, "3/2")


def test_merge_joins_parts_and_refuses_other_settings(tmp_path):
    st = {"precision": "bf16", "corrections": 3, "modes": ["guided", "oracle"], "adapt": False, "threads": 1}
    (tmp_path / "a.json").write_text(json.dumps(result(["x", "y"], st)))
    (tmp_path / "b.json").write_text(json.dumps(result(["z"], st)))
    out = bench.merge([tmp_path / "a.json", tmp_path / "b.json"])
    assert sorted(out["structures"]) == ["x", "y", "z"]
    assert out["summary"]["guided"]["dice_per_step_mean"] == [0.5, 0.6, 0.7, 0.8]
    assert out["summary"]["oracle"]["repropagation_seconds"]["first_correction_median"] == 4.0
    cached = out["summary"]["oracle"]["repropagation_seconds"]["cached"]  # no step encoded: all count as cached
    assert cached["all"] == {"steps": 9, "wall_median": 5.0, "wall_max": 6.0, "cpu_median": 5.0, "cpu_max": 6.0}
    assert cached["structures_of_40_slices_or_more"] is None  # the rows say no slice count
    (tmp_path / "c.json").write_text(json.dumps(result(["w"], {**st, "corrections": 10})))
    with pytest.raises(SystemExit, match="settings"):
        bench.merge([tmp_path / "a.json", tmp_path / "c.json"])
