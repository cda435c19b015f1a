"""Tests of MedFMTrainLib: training pairs, LoRA swapping, tuning, adapter store, localizer, CLI.

Real data: Colin27 T1 + AAL (left caudate, label 71). Training runs are tiny (a couple of slices, a
few encodes and steps) and share one pool: these tests check behaviour, not accuracy (that is
Testing/benchmarks/bench_tune.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from MedFMSegmentLib import geometry
from MedFMSegmentLib.errors import Cancelled, InputError

from MedFMTrainLib import adapters as A
from MedFMTrainLib import store
from MedFMTrainLib.augment import Augmenter
from MedFMTrainLib.data import even_slices, slices_from_segmentation, slices_from_volumes
from MedFMTrainLib.localizer import box_from_heatmap, interpolate_boxes, model_box_to_slice
from MedFMTrainLib.samples import PoolConfig
from MedFMTrainLib.tune import TuneConfig, build_pool, tune

REPO = Path(__file__).resolve().parents[2]
CAUDATE_L = 71
TINY = dict(steps=2, batch_size=2, localizer_steps=3,
            pool=PoolConfig(box_encodes=2, click_encodes=0, full_encodes=1))


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def colin(shared_data):
    from MedFMSegmentLib.io import read_volume

    ch2, aal = shared_data / "colin27" / "ch2.nii.gz", shared_data / "colin27" / "aal.nii.gz"
    if not ch2.is_file() or not aal.is_file():
        pytest.skip(f"Colin27 data not found in {shared_data / 'colin27'}")
    array, matrix = read_volume(ch2)
    labels, _ = read_volume(aal)
    return array, matrix, (labels == CAUDATE_L).astype(np.uint8), ch2, aal


@pytest.fixture(scope="module")
def model():
    """A private LiteMedSAM: these tests inject LoRA layers, so the shared fixture stays untouched."""
    from MedFMSegmentLib.models import load_model

    return load_model("litemedsam", device="cpu")


@pytest.fixture(scope="module")
def training(colin):
    array, matrix, mask, _, _ = colin
    return slices_from_segmentation(array, matrix, mask, "axial", even_slices(mask, "axial", 2))


@pytest.fixture(scope="module")
def pool(model, training):
    samples, encodes = build_pool(model, training, TuneConfig(**TINY))
    return samples


@pytest.fixture(scope="module")
def adapter(model, training, pool):
    return tune(model, training, "Caudate_L", TuneConfig(**TINY), samples=pool)


def base_logits(model, emb, box=(60, 70, 180, 190)):
    logits, iou = model.decode(emb, box)
    return logits.clone(), iou.copy()


def random_adapter(model, organ="X", seed=1, rank=4):
    """An adapter with non-zero random weights (a real delta), made without training."""
    settings = A.LoraSettings(rank, 2.0 * rank, "decoder")
    name = f"tmp_{organ}_{seed}"
    A.inject(model, name, settings, seed=seed)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: (torch.randn(v.shape, generator=g) * 0.05) for k, v in A.state(model, name).items()}
    A.remove(model, name)
    return A.OrganAdapter(organ, model.spec.id, model.checkpoint_sha256, settings, tensors)


# --------------------------------------------------------------------------- training pairs

def test_training_pairs_use_the_session_normalisation(colin, training):
    from MedFMSegmentLib.preprocess import normalise_volume

    array, matrix, mask, _, _ = colin
    u8, preset, _ = normalise_volume(array)
    assert training.preset == preset.name
    for s in training.slices:
        assert np.array_equal(s.image_u8, geometry.get_slice(u8, "axial", s.index))
        assert np.array_equal(s.mask, geometry.get_slice(mask, "axial", s.index))
        assert s.mask.sum() >= 4 and s.box_xy is not None
    summary = training.summary()
    assert summary["volumes"][0]["slices"] == [s.index for s in training.slices]
    assert summary["positive_slices"] == len(training.slices)


def test_other_axes_and_volume_mode(colin):
    array, matrix, mask, _, _ = colin
    coronal = slices_from_segmentation(array, matrix, mask, "coronal", even_slices(mask, "coronal", 1))
    assert coronal.slices[0].image_u8.shape == geometry.slice_shape(array.shape, "coronal")
    ts = slices_from_volumes([(array, matrix, mask)], "sagittal", slices_per_volume=3, negatives_per_volume=1)
    assert len(ts.positives) == 3 and len(ts.negatives) == 1
    assert not ts.negatives[0].mask.any()


def test_empty_mask_is_refused(colin):
    array, matrix, mask, _, _ = colin
    with pytest.raises(InputError, match="mask is empty"):
        slices_from_segmentation(array, matrix, np.zeros_like(mask), "axial", [80])
    k_empty = int(np.nonzero(mask.sum(axis=(1, 2)) == 0)[0][0])
    with pytest.raises(InputError, match=f"axial slice {k_empty} of the mask is empty"):
        slices_from_segmentation(array, matrix, mask, "axial", [k_empty])
    with pytest.raises(InputError, match="mask is empty"):
        slices_from_volumes([(array, matrix, np.zeros_like(mask))], "axial")


def test_mask_on_another_grid_is_refused(colin):
    array, matrix, mask, _, _ = colin
    with pytest.raises(InputError, match="differs from the image shape"):
        slices_from_segmentation(array, matrix, mask[:, :, :-1], "axial", [80])
    shifted = matrix.copy()
    shifted[:3, 3] += 2.0
    with pytest.raises(InputError, match="geometry differs"):
        slices_from_segmentation(array, matrix, mask, "axial", [80], mask_ijk_to_ras=shifted)


def test_single_voxel_mask_is_refused(colin):
    array, matrix, mask, _, _ = colin
    one = np.zeros_like(mask)
    one[80, 100, 100] = 1
    with pytest.raises(InputError, match="only 1 voxel"):
        slices_from_segmentation(array, matrix, one, "axial", [80])


def test_bad_indices_are_refused(colin):
    array, matrix, mask, _, _ = colin
    with pytest.raises(InputError, match="out of range"):
        slices_from_segmentation(array, matrix, mask, "axial", [500])
    with pytest.raises(InputError, match="more than once"):
        slices_from_segmentation(array, matrix, mask, "axial", [80, 80])
    with pytest.raises(InputError, match="unknown axis"):
        slices_from_segmentation(array, matrix, mask, "oblique", [80])


def test_augmentation_is_seeded_and_keeps_masks_binary(training):
    s = training.slices[0]
    img = s.image_u8[:128, :128].astype(np.float32) / 255
    msk = np.zeros((128, 128), np.uint8)
    msk[40:80, 50:90] = 1
    a1 = Augmenter(128, seed=3)(img, msk)
    a2 = Augmenter(128, seed=3)(img, msk)
    a3 = Augmenter(128, seed=4)(img, msk)
    assert np.array_equal(a1[0], a2[0]) and np.array_equal(a1[1], a2[1])
    assert not np.array_equal(a1[0], a3[0])
    assert set(np.unique(a1[1])) <= {0, 1} and a1[0].min() >= 0 and a1[0].max() <= 1


# --------------------------------------------------------------------------- LoRA swapping

def test_adapter_swaps_without_changing_the_base_bitwise(model):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1, 256, 64, 64, generator=g)
    before, iou_before = base_logits(model, emb)
    enc_before = {k: v.clone() for k, v in model.net.image_encoder.state_dict().items()}
    a, b = random_adapter(model, "A", 1), random_adapter(model, "B", 2)
    with a.applied(model):
        la, _ = base_logits(model, emb)
    with b.applied(model):
        lb, _ = base_logits(model, emb)
    with a.applied(model):
        la2, _ = base_logits(model, emb)
    after, iou_after = base_logits(model, emb)
    assert not torch.equal(la, before) and not torch.equal(la, lb)
    assert torch.equal(la, la2)  # switching back gives the same adapted output
    assert torch.equal(after, before) and np.array_equal(iou_after, iou_before)  # base bitwise unchanged
    a.detach(model)
    b.detach(model)
    assert torch.equal(base_logits(model, emb)[0], before)
    assert a.peft_name not in A.injected_adapters(model) and b.peft_name not in A.injected_adapters(model)
    enc_after = model.net.image_encoder.state_dict()
    assert all(torch.equal(enc_before[k], enc_after[k]) for k in enc_before)  # encoder untouched


def test_adapter_is_removed_even_when_the_block_fails(model):
    emb = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(5))
    before, _ = base_logits(model, emb)
    a = random_adapter(model, "C", 3)
    with pytest.raises(RuntimeError):
        with a.applied(model):
            raise RuntimeError("boom")
    assert torch.equal(base_logits(model, emb)[0], before)
    a.detach(model)


def test_training_forward_matches_the_session_decoder(model):
    emb = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits, iou = A.decode_batch(model, emb, torch.tensor([[60.0, 70, 180, 190]]))
    ref, ref_iou = model.decode(emb, (60, 70, 180, 190))
    assert torch.allclose(logits[0], ref, atol=1e-4)
    assert abs(float(iou[0]) - float(ref_iou[0])) < 1e-4


def test_lora_settings_are_checked():
    with pytest.raises(InputError, match="rank"):
        A.LoraSettings(rank=0)
    with pytest.raises(InputError, match="regular expression"):
        A.LoraSettings(targets="(unclosed")


# --------------------------------------------------------------------------- tuning

def test_tune_trains_decoder_and_localizer(adapter, model, training):
    m = adapter.manifest
    assert m["organ"] == "Caudate_L" and m["base_model"]["sha256"] == model.checkpoint_sha256
    assert m["training_data"]["volumes"][0]["slices"] == [s.index for s in training.slices]
    assert m["metrics"]["decoder"]["loss_first"] > 0
    assert adapter.localizer is not None and adapter.localizer.axis == "axial"
    assert adapter.tensors and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in adapter.tensors)
    assert any(float(v.abs().max()) > 0 for k, v in adapter.tensors.items() if "lora_B" in k)  # B moved from 0
    assert not [n for n in A.injected_adapters(model) if "train" in n]  # training left nothing in the model


def test_same_seed_same_weights(model, training, pool, adapter):
    again = tune(model, training, "Caudate_L", TuneConfig(**TINY), samples=pool)
    assert again.digest == adapter.digest
    assert all(torch.equal(v, adapter.localizer.tensors[k]) for k, v in again.localizer.tensors.items())
    other = tune(model, training, "Caudate_L", TuneConfig(**dict(TINY, seed=1, localizer=False)), samples=pool)
    assert other.digest != adapter.digest


def test_session_uses_the_adapter(model, colin, adapter):
    from MedFMSegmentLib.session import PromptSession

    array, matrix, mask, _, _ = colin
    k = int(np.argmax(mask.sum(axis=(1, 2))))
    box = geometry.box_from_mask(mask[k])
    session = PromptSession(model)
    session.set_volume(array, matrix)
    base = session.add_box("axial", k, box).mask
    session.reset()
    session.adapter = adapter
    adapted = session.add_box("axial", k, box)
    session.adapter = None
    session.reset()
    again = session.add_box("axial", k, box).mask
    assert np.array_equal(base, again)  # the base result is unchanged after the adapter was used
    assert adapted.mask.shape == base.shape and adapted.mask.any()
    assert session.cache.hits >= 2  # the adapter shares the base model's embeddings


def test_cancel_leaves_no_adapter(model, training, pool, tmp_path):
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 1

    out = tmp_path / "Caudate_L"
    injected = A.injected_adapters(model)
    with pytest.raises(Cancelled):
        tune(model, training, "Caudate_L", TuneConfig(**TINY), should_stop=should_stop, out=out, samples=pool)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert A.injected_adapters(model) == injected


def test_tune_reports_progress(model, training, pool):
    seen = []
    tune(model, training, "Caudate_L", TuneConfig(**dict(TINY, steps=1, localizer=False)),
         progress=lambda f, msg: seen.append(f), samples=pool)
    assert seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen)
    assert seen == sorted(seen)


def test_tune_config_is_checked(model, training, pool):
    with pytest.raises(InputError, match="steps"):
        tune(model, training, "Caudate_L", TuneConfig(**dict(TINY, steps=0)), samples=pool)
    with pytest.raises(InputError, match="learning rate"):
        tune(model, training, "Caudate_L", TuneConfig(**dict(TINY, lr=float("nan"))), samples=pool)
    with pytest.raises(InputError, match="organ"):
        tune(model, training, " ", TuneConfig(**TINY), samples=pool)
    with pytest.raises(InputError, match="box_encodes must be at least 1"):
        tune(model, training, "Caudate_L", TuneConfig(**dict(TINY, pool=PoolConfig(box_encodes=0))), samples=pool)


# --------------------------------------------------------------------------- store

def test_store_round_trip_list_and_delete(adapter, model, tmp_path):
    path = store.save_adapter(adapter, tmp_path / "Caudate_L")
    assert sorted(p.name for p in path.iterdir()) == ["adapter.safetensors", "manifest.json"]
    manifest = json.loads((path / "manifest.json").read_text())
    for key in ("organ", "base_model", "method", "lora", "config", "training_data", "metrics", "created", "files"):
        assert key in manifest
    loaded = store.load_adapter(path, model)
    assert loaded.digest == adapter.digest and loaded.organ == "Caudate_L"
    assert all(torch.equal(loaded.localizer.tensors[k], v) for k, v in adapter.localizer.tensors.items())
    listed = store.list_adapters(tmp_path)
    assert [e["organ"] for e in listed] == ["Caudate_L"] and listed[0]["error"] is None
    assert store.find_adapter(tmp_path, "Caudate_L") == path
    with pytest.raises(InputError, match="already exists"):
        store.save_adapter(adapter, path)
    store.delete_adapter(path)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    loaded.detach(model)


def test_no_pickle_in_adapter_files(adapter, tmp_path):
    path = store.save_adapter(adapter, tmp_path / "a")
    head = (path / "adapter.safetensors").read_bytes()[:2]
    assert head != b"\x80\x04" and not (path / "adapter.safetensors").read_bytes().startswith(b"PK")
    json.loads((path / "manifest.json").read_text())


def test_interrupted_save_keeps_the_previous_adapter(adapter, tmp_path, monkeypatch):
    path = store.save_adapter(adapter, tmp_path / "Caudate_L")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    real = store._write_files

    def half_then_fail(a, folder):
        real(a, folder)
        (folder / "manifest.json").write_text("{ partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(store, "_write_files", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        store.save_adapter(adapter, path, overwrite=True)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["Caudate_L"]  # no temporary folder left


def test_adapter_for_another_base_model_is_refused(adapter, model, tmp_path):
    path = store.save_adapter(adapter, tmp_path / "Caudate_L")

    class Other:
        checkpoint_sha256 = "0" * 64
        spec = model.spec

    with pytest.raises(InputError) as err:
        store.load_adapter(path, Other())
    assert model.checkpoint_sha256 in str(err.value) and "0" * 64 in str(err.value)
    with pytest.raises(InputError, match="0{64}"):
        with adapter.applied(Other()):
            pass


def test_corrupt_adapter_files_are_refused(adapter, model, tmp_path):
    path = store.save_adapter(adapter, tmp_path / "Caudate_L")
    weights, manifest = path / "adapter.safetensors", path / "manifest.json"
    good_weights, good_manifest = weights.read_bytes(), manifest.read_text()
    weights.write_bytes(good_weights[: len(good_weights) // 2])
    with pytest.raises(InputError, match="corrupt or truncated"):
        store.load_adapter(path, model)
    # truncated and the manifest's checksum edited to match: the safetensors reader refuses it
    m = json.loads(good_manifest)
    m["files"]["adapter.safetensors"]["sha256"] = store.file_sha256(weights)
    manifest.write_text(json.dumps(m))
    with pytest.raises(InputError, match="corrupt adapter weights"):
        store.load_adapter(path, model)
    weights.write_bytes(good_weights)
    manifest.write_text(good_manifest[:-20])
    with pytest.raises(InputError, match="manifest.json: corrupt manifest"):
        store.load_adapter(path, model)
    listed = store.list_adapters(tmp_path)
    assert listed[0]["error"] and "manifest.json" in listed[0]["error"]
    with pytest.raises(InputError, match="not found"):
        store.load_adapter(tmp_path / "missing", model)


def test_save_refuses_to_replace_a_folder_that_is_not_an_adapter(adapter, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not an adapter folder"):
        store.save_adapter(adapter, tmp_path / "docs", overwrite=True)
    with pytest.raises(InputError, match="not an adapter folder"):
        store.delete_adapter(tmp_path / "docs")
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- localizer

def test_heatmap_box_maps_back_to_the_slice():
    from MedFMSegmentLib.preprocess import full_slice_crop

    prob = np.zeros((256, 256), np.float32)
    prob[100:121, 50:71] = 0.9
    prob[10:12, 200:202] = 0.6  # a weak speck far away is ignored
    box, score = box_from_heatmap(prob, 0.5)
    assert box == (50.0, 100.0, 70.0, 120.0) and score == pytest.approx(0.9)
    crop = full_slice_crop((217, 181), (1.0, 1.0), 256)
    x0, y0, x1, y1 = model_box_to_slice(box, crop, (217, 181))
    assert np.allclose(crop.box_to_model((x0, y0, x1, y1)), box)
    assert box_from_heatmap(np.zeros((8, 8)), 0.5) is None
    # presence by the peak, extent by a lower level: the soft rim of the heatmap widens the box
    soft = prob.copy()
    soft[95:126, 45:76] = np.maximum(soft[95:126, 45:76], 0.3)
    assert box_from_heatmap(soft, 0.5, 0.25)[0] == (45.0, 95.0, 75.0, 125.0)
    assert box_from_heatmap(soft, 0.5)[0] == (50.0, 100.0, 70.0, 120.0)
    assert box_from_heatmap(np.full((8, 8), 0.4, np.float32), 0.5, 0.25) is None  # no peak: absent


def test_interpolated_boxes_fill_gaps_of_the_scan():
    found = {10: ((0, 0, 10, 10), 0.9), 14: ((4, 4, 14, 14), 0.8), 30: ((0, 0, 5, 5), 0.7)}
    boxes = interpolate_boxes(found, stride=4)
    assert sorted(boxes) == [10, 11, 12, 13, 14, 30]
    assert boxes[12] == (2.0, 2.0, 12.0, 12.0)


def test_localizer_detect_returns_detections(adapter, model, colin):
    from MedFMSegmentLib.detectors import Detection, detections_to_slice_boxes

    array, matrix, mask, _, _ = colin
    k = int(np.argmax(mask.sum(axis=(1, 2))))
    det = adapter.detector(model, threshold=0.0)  # threshold 0: the whole slice counts as found
    found = det.detect(array, matrix, indices=[k])
    assert len(found) == 1 and isinstance(found[0], Detection) and found[0].label == "Caudate_L"
    assert found[0].slice_boxes[0][:2] == ("axial", k)
    plan = detections_to_slice_boxes(found, array.shape, "axial", score_threshold=0.0)
    assert [i for i, _ in plan["Caudate_L"]] == [k]
    assert adapter.detector(model, threshold=1.01).detect(array, matrix, indices=[k]) == []


# --------------------------------------------------------------------------- CLI

def test_tune_parser_plugs_into_a_subparsers_object():
    import argparse

    from MedFMTrainLib.cli import add_tune_parser, run_tune

    parser = argparse.ArgumentParser(prog="medfm")
    add_tune_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tune", "--image", "v.nii.gz", "--labels", "l.nii.gz", "--label-value", "71",
                              "--organ", "Caudate_L", "--train-slices", "40,45,50", "--out", "x", "--steps", "7"])
    assert args.func is run_tune and args.label_value == 71 and args.steps == 7 and args.axis == "axial"


def test_cli_rejects_labels_on_another_grid(colin, tmp_path):
    import SimpleITK as sitk

    from MedFMTrainLib.cli import add_tune_parser, run_tune
    import argparse

    _, _, mask, ch2, _ = colin
    img = sitk.GetImageFromArray(mask)
    img.SetSpacing((2.0, 1.0, 1.0))
    other = tmp_path / "labels.nii.gz"
    sitk.WriteImage(img, str(other))
    parser = argparse.ArgumentParser()
    add_tune_parser(parser.add_subparsers())
    args = parser.parse_args(["tune", "--image", str(ch2), "--labels", str(other), "--organ", "C",
                              "--train-slices", "70", "--out", str(tmp_path / "out")])
    with pytest.raises(InputError, match="different grid"):
        run_tune(args)
    assert not (tmp_path / "out").exists()


def test_tune_cli_process_reports_errors_as_json(colin, tmp_path):
    _, _, _, ch2, aal = colin
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "MedFMSegment"), str(REPO / "MedFMTrain")]))
    proc = subprocess.run([sys.executable, "-m", "MedFMTrainLib.tune_cli", "--image", str(ch2), "--labels",
                           str(aal), "--label-value", "9999", "--organ", "C", "--train-slices", "70",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert "label value 9999 does not occur" in message and "values present: 0, 1, 2" in message
    assert not (tmp_path / "out").exists()


def test_tune_cli_trains_and_saves(colin, tmp_path, capsys):
    from MedFMTrainLib.tune_cli import main

    _, _, mask, ch2, aal = colin
    k = even_slices(mask, "axial", 1)[0]
    out = tmp_path / "Caudate_L"
    code = main(["--image", str(ch2), "--labels", str(aal), "--label-value", str(CAUDATE_L), "--organ", "Caudate_L",
                 "--train-slices", str(k), "--out", str(out), "--steps", "1", "--box-encodes", "1",
                 "--click-encodes", "0",
                 "--no-localizer", "--threads", "2", "--device", "cpu"])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert code == 0, lines[-1]
    assert "progress" in lines[0] and lines[-1]["result"]["adapter"] == str(out)
    manifest = store.read_manifest(out)
    assert manifest["training_data"]["volumes"][0]["slices"] == [k]
    assert manifest["localizer"] is None
