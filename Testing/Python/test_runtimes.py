"""Tests of MedFMSegmentLib.runtimes and the OpenVINO path of models.load_model.

- The runtime choice is pure logic, tested on made-up CPUs (this machine has no native bf16: the bf16
  path cannot run here, so its gate is tested on recorded check results).
- The export cache's faults (corrupt, truncated, other runtime version, kill -9 during an export,
  read-only folder) are tested on a stand-in export (no conversion needed).
- The real export of LiteMedSAM's encoder and decoder happens once per test run (module fixture, in
  the run's temporary cache, see conftest ``medfm_cache_dir``) and is compared with torch.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from MedFMSegmentLib import cli, models, runtimes
from MedFMSegmentLib.errors import InputError

SEGMENT_DIR = Path(__file__).resolve().parents[2] / "MedFMSegment"
AVX2 = runtimes.CpuInfo("AMD EPYC", "x86_64", ("avx", "avx2", "fma"))
AMX = runtimes.CpuInfo("Intel Xeon", "x86_64", ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))


# ----------------------------------------------------------------------------- the choice (pure)

def test_cpu_flags_and_native_bf16_from_cpuinfo_text():
    text = "processor: 0\nmodel name : Some CPU\nflags : fpu sse4_2 avx avx2 fma avx512f avx512_bf16 amx_tile\n"
    info = runtimes.cpu_info(text)
    assert info.model == "Some CPU" and info.native_bf16
    assert set(info.flags) == {"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"}
    assert not runtimes.cpu_info("model name: X\nflags: avx avx2 fma avx512f\n").native_bf16


def test_this_machine_is_reported():
    info = runtimes.cpu_info()
    assert info.model and isinstance(info.flags, tuple)
    if Path("/proc/cpuinfo").exists():
        flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].splitlines()[0].split())
        assert set(info.flags) <= flags and info.native_bf16 == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_auto_on_an_avx2_cpu_is_openvino_fp32_never_bf16():
    plan = runtimes.plan_runtime("auto", None, "cpu", AVX2, have_openvino=True)
    assert (plan.runtime, plan.precision) == ("openvino", "fp32") and "no native bf16" in plan.reason
    assert runtimes.plan_runtime("auto", None, "cpu", AVX2, have_openvino=False).runtime == "torch"


def test_bf16_is_tried_only_with_native_bf16_and_kept_only_if_it_agrees_and_is_faster():
    plan = runtimes.plan_runtime("auto", None, "cpu", AMX, have_openvino=True)
    assert (plan.runtime, plan.precision) == ("openvino", "bf16") and "amx_bf16" in plan.reason
    good = {"agreement_dice": 0.99, "seconds": 0.2, "fp32_seconds": 0.5}
    assert runtimes.bf16_accepted(good) and runtimes.check_passed(good, "bf16")
    assert not runtimes.bf16_accepted({**good, "agreement_dice": 0.97})  # disagrees
    assert not runtimes.bf16_accepted({**good, "seconds": 0.6})  # slower than fp32
    assert not runtimes.bf16_accepted({"agreement_dice": 0.99})  # never timed: not kept
    fp32 = {"agreement_dice": 0.999, "max_abs_diff": 1e-5}
    assert runtimes.check_passed(fp32, "fp32") and not runtimes.check_passed({**fp32, "max_abs_diff": 0.1}, "fp32")


def test_gpus_run_torch_and_explicit_choices_are_honoured():
    assert runtimes.plan_runtime("auto", None, "cuda", AMX, True).runtime == "torch"
    assert runtimes.plan_runtime("openvino", None, "mps", AMX, True).runtime == "torch"
    assert runtimes.plan_runtime("torch", None, "cpu", AMX, True) == runtimes.RuntimePlan("torch", "fp32", "torch requested")
    assert runtimes.plan_runtime("openvino", "fp32", "cpu", AMX, True).precision == "fp32"
    slow = runtimes.plan_runtime("openvino", "bf16", "cpu", AVX2, True)
    assert slow.precision == "bf16" and "without native bf16" in slow.reason
    ort = runtimes.plan_runtime("onnxruntime", None, "cpu", AVX2, True)
    assert ort.runtime == "torch" and "onnx" in ort.reason


def test_unknown_runtime_or_precision_is_an_input_error():
    with pytest.raises(InputError, match=r"unknown runtime 'tensorrt'.*openvino"):
        runtimes.check_runtime("tensorrt")
    with pytest.raises(InputError, match=r"unknown precision 'int8'"):
        runtimes.check_precision("int8")
    with pytest.raises(InputError, match=r"unknown runtime"):
        models.load_model("litemedsam", runtime="tensorrt")


@pytest.mark.parametrize("argv, message", [(["--runtime", "tensorrt"], "invalid choice: 'tensorrt'"),
                                           (["--precision", "fp8"], "invalid choice: 'fp8'")])
def test_cli_rejects_an_unknown_runtime_before_loading(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as info:
        cli.main(["segment", str(tmp_path / "v.nrrd"), "--prompts", "p.json", "--output", "o.seg.nrrd", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_threads_follow_the_environment_and_the_free_cores(monkeypatch):
    monkeypatch.setenv("MEDFM_THREADS", "1")
    assert runtimes.choose_threads() == (1, "from $MEDFM_THREADS")
    assert runtimes.choose_threads(3)[0] == 3
    monkeypatch.setenv("MEDFM_THREADS", "two")
    with pytest.raises(InputError, match=r"MEDFM_THREADS must be a whole number, got 'two'"):
        runtimes.choose_threads()
    monkeypatch.delenv("MEDFM_THREADS")
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    assert runtimes.choose_threads()[0] == 1  # a saturated machine: one thread
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    n, why = runtimes.choose_threads()
    assert n == len(os.sched_getaffinity(0)) and "load average 0.0" in why


def test_cmd_models_reports_the_runtime_choice(capsys):
    assert cli.main(["models"]) == 0
    captured = capsys.readouterr()
    assert captured.out.split()[0] == "litemedsam"
    line = next(l for l in captured.err.splitlines() if l.startswith("runtime "))
    info = json.loads(line[len("runtime "):])
    assert info["cpu"]["model"] and "isa_flags" in info["cpu"] and info["reason"]
    assert info["runtime"] in ("torch", "openvino") and info["threads"] >= 1
    if not info["cpu"]["native_bf16"]:
        assert info["precision"] == "fp32"


# ----------------------------------------------------------------------------- the cache (stand-in export)

IDENTITY = {"model": "m", "weights_sha256": "ab" * 32, "runtime": "openvino", "runtime_version": "1.0",
            "input_size": 256, "precision": "fp32"}


def _fake_export(calls):
    def export(folder: Path) -> dict:
        calls.append(folder)
        (folder / "model.xml").write_text("<net/>")
        (folder / "model.bin").write_bytes(bytes(range(256)) * 40)
        return {"check": {"agreement_dice": 1.0}}
    return export


def test_cache_hit_then_corrupt_truncated_and_stale_entries_are_rebuilt(tmp_path, caplog):
    calls = []
    entry, manifest, seconds = runtimes.cached_export(tmp_path, "encoder", IDENTITY, _fake_export(calls))
    assert len(calls) == 1 and seconds > 0 and manifest["check"] == {"agreement_dice": 1.0}
    assert set(manifest["files"]) == {"model.xml", "model.bin"}
    assert runtimes.cached_export(tmp_path, "encoder", IDENTITY, _fake_export(calls))[2] == 0.0 and len(calls) == 1
    for damage in ("flip", "truncate", "manifest"):
        if damage == "flip":
            data = bytearray((entry / "model.bin").read_bytes())
            data[100] ^= 0xFF
            (entry / "model.bin").write_bytes(bytes(data))
        elif damage == "truncate":
            (entry / "model.bin").write_bytes((entry / "model.bin").read_bytes()[:500])
        else:  # an entry written by another runtime version under this name
            m = json.loads((entry / "manifest.json").read_text())
            m["identity"]["runtime_version"] = "0.9"
            (entry / "manifest.json").write_text(json.dumps(m))
        assert runtimes.read_entry(entry, {**IDENTITY, "kind": "encoder", "format": runtimes.EXPORT_FORMAT})[0] is None
        with caplog.at_level(logging.WARNING, logger="MedFMSegmentLib.runtimes"):
            again, _, secs = runtimes.cached_export(tmp_path, "encoder", IDENTITY, _fake_export(calls))
        assert again == entry and secs > 0 and "rebuilding" in caplog.text
        caplog.clear()
    assert len(calls) == 4
    # another runtime version is another entry: never the old one
    other, _, secs = runtimes.cached_export(tmp_path, "encoder", {**IDENTITY, "runtime_version": "2.0"}, _fake_export(calls))
    assert other != entry and secs > 0


def test_a_failed_export_leaves_nothing(tmp_path):
    def broken(folder):
        (folder / "model.xml").write_text("<half")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        runtimes.cached_export(tmp_path, "encoder", IDENTITY, broken)
    assert list((tmp_path / "encoder").iterdir()) == []


KILL_PROBE = r"""
import sys, time
sys.path[:0] = [{segment!r}]
from pathlib import Path
from MedFMSegmentLib import runtimes
def export(folder):
    (folder / "model.xml").write_text("<net/>")
    (folder / "model.bin").write_bytes(b"x" * 1000)
    print("writing", flush=True)
    time.sleep(60)
runtimes.cached_export(Path({root!r}), "encoder", {identity!r}, export)
"""


def test_kill_9_during_an_export_leaves_nothing_that_is_loaded(tmp_path):
    script = KILL_PROBE.format(segment=str(SEGMENT_DIR), root=str(tmp_path), identity=IDENTITY)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = list((tmp_path / "encoder").iterdir())
    assert leftovers and all(p.name.startswith(".tmp-") for p in leftovers)  # only the temporary folder
    calls = []
    entry, manifest, seconds = runtimes.cached_export(tmp_path, "encoder", IDENTITY, _fake_export(calls))
    assert len(calls) == 1 and seconds > 0 and not entry.name.startswith(".tmp-")  # rebuilt, not loaded


def test_a_read_only_cache_folder_falls_back_to_a_temporary_one(tmp_path, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")  # a folder cannot be made under a file: unwritable even for root
    with caplog.at_level(logging.WARNING, logger="MedFMSegmentLib.runtimes"):
        got = runtimes.cache_dir(blocker / "cache")
    assert got != blocker / "cache" and got.is_dir() and os.access(got, os.W_OK)
    assert "not writable" in caplog.text and str(blocker / "cache") in caplog.text


def test_openvino_conversion_sends_no_telemetry(monkeypatch, tmp_path):
    pytest.importorskip("openvino")
    import openvino_telemetry

    def refuse(*a, **k):
        raise AssertionError("telemetry was started")

    monkeypatch.setattr(openvino_telemetry.Telemetry, "__init__", refuse)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.rand(1, 3, 16, 16)
    xml = runtimes.export_openvino(net, (x,), tmp_path)
    out = runtimes.OpenVINOModel(xml, "fp32", 1)(x.numpy())[0]
    with torch.inference_mode():
        assert np.abs(out - net(x).numpy()).max() < 1e-5


# ----------------------------------------------------------------------------- the real export

@pytest.fixture(scope="module")
def ov_model():
    pytest.importorskip("openvino")
    m = models.load_model("litemedsam", device="cpu", runtime="openvino", precision="fp32")
    if m.runtime != "openvino":
        pytest.fail(f"OpenVINO export fell back to torch: {m.runtime_info['reason']}")
    return m


def _blob_image(size=256):
    yy, xx = np.mgrid[:size, :size]
    rng = np.random.default_rng(1)
    return np.clip(0.3 * rng.random((size, size)) + 0.7 * np.exp(-((xx - 120) ** 2 + (yy - 140) ** 2) / 1800), 0, 1
                   ).astype(np.float32)


def test_openvino_encoder_and_decoder_agree_with_torch(ov_model, litemedsam):
    info = ov_model.runtime_info
    assert info["runtime"] == "openvino" and info["precision"] == "fp32" and info["decoder"] == "openvino"
    check = info["exports"]["encoder_fp32"]["check"]
    assert check["agreement_dice"] >= 0.995 and check["max_abs_diff"] <= 1e-3
    assert info["cpu"]["isa_flags"] == list(runtimes.cpu_info().flags)
    img = _blob_image()
    emb_ov, emb_torch = torch.as_tensor(ov_model.encode(img)), litemedsam.encode(img)  # numpy from OpenVINO
    assert emb_ov.shape == emb_torch.shape == (1, 256, 64, 64)
    assert float((emb_ov - emb_torch).abs().max()) <= 1e-3 and float(emb_torch.std()) > 0.01
    for box in ((70, 90, 170, 190), (100, 120, 140, 160)):
        fast, iou = ov_model.decode(emb_torch, box_xy_model=box, fast=True)
        fast = torch.as_tensor(fast)  # numpy from the exported decoder
        ref, ref_iou = litemedsam.decode(emb_torch, box_xy_model=box)
        assert fast.shape == ref.shape == (1, 256, 256)
        assert float((fast - ref).abs().max()) <= 1e-2 and np.allclose(iou, ref_iou, atol=1e-3)
        assert runtimes.dice(fast.numpy() > 0, ref.numpy() > 0) >= 0.995 and (ref > 0).any()
    multi, multi_iou = ov_model.decode(emb_torch, box_xy_model=(70, 90, 170, 190), multimask=True, fast=True)
    multi = torch.as_tensor(multi)
    ref, _ = litemedsam.decode(emb_torch, box_xy_model=(70, 90, 170, 190), multimask=True)
    assert multi.shape == (3, 256, 256) and float((multi - ref).abs().max()) <= 1e-2
    pts, _ = ov_model.decode(emb_torch, points_xy_model=[(120, 140), (20, 20)], point_labels=[1, 0], fast=True)
    ref, _ = litemedsam.decode(emb_torch, points_xy_model=[(120, 140), (20, 20)], point_labels=[1, 0])
    assert float((torch.as_tensor(pts) - ref).abs().max()) <= 1e-2  # another number of prompt tokens (dynamic shape)


def test_a_modified_torch_decoder_is_used_instead_of_the_export(ov_model):
    """Adapters inject LoRA layers into the torch decoder: the exported decoder would ignore them."""
    emb = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    md = ov_model.net.mask_decoder
    md.add_module("_test_extra", torch.nn.Identity())
    try:
        assert not ov_model._decoder_unmodified()
        got, _ = ov_model.decode(emb, box_xy_model=(60, 60, 180, 180), fast=True)
        ref, _ = ov_model.decode(emb, box_xy_model=(60, 60, 180, 180), fast=False)
        assert torch.equal(got, ref)
    finally:
        del md._test_extra
    assert ov_model._decoder_unmodified()


def test_second_load_uses_the_cache_and_a_damaged_entry_is_refused(ov_model, tmp_path):
    again = models.load_model("litemedsam", device="cpu", runtime="openvino", precision="fp32")
    for name in ("encoder_fp32", "decoder"):
        assert again.runtime_info["exports"][name]["cached"] and again.runtime_info["exports"][name]["export_seconds"] == 0
    entry = Path(again.runtime_info["exports"]["encoder_fp32"]["cache"])
    manifest = json.loads((entry / "manifest.json").read_text())
    copy = tmp_path / "entry"
    shutil.copytree(entry, copy)
    assert runtimes.read_entry(copy, manifest["identity"])[0] is not None
    with open(copy / "model.bin", "r+b") as fh:
        fh.truncate(1000)
    manifest_after, why = runtimes.read_entry(copy, manifest["identity"])
    assert manifest_after is None and "model.bin" in why


def test_a_failed_export_falls_back_to_torch_with_one_log_line(monkeypatch, tmp_path, caplog):
    def broken(*a, **k):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(runtimes, "export_openvino", broken)
    with caplog.at_level(logging.WARNING, logger="MedFMSegmentLib.models"):
        m = models.load_model("litemedsam", device="cpu", runtime="openvino", cache_dir=tmp_path)
    assert m.runtime == "torch" and m._fast_encoder is None and "export failed" in m.runtime_info["reason"]
    lines = [r for r in caplog.records if "OpenVINO" in r.getMessage()]
    assert len(lines) == 1 and "unsupported operation" in lines[0].getMessage()


def test_the_tinyvit_stem_and_rest_compose_to_the_encoder_bitwise(litemedsam, colin27):
    """bf16 keeps the encoder's stem in fp32: its two graphs are exported from these two modules, whose
    composition is the encoder, bitwise, on a real MR crop."""
    from MedFMSegmentLib.openvino_model import _splittable, encoder_stem_and_rest
    from MedFMSegmentLib.preprocess import slice_to_model
    from MedFMSegmentLib.session import PromptSession

    s = PromptSession(litemedsam)
    s.set_volume(*colin27)
    crop = s.crop_for("axial", (60, 70, 120, 130), 70)
    x = torch.from_numpy(litemedsam.model_input(slice_to_model(s.normalised_slice("axial", 70, crop.preset), crop)))
    s.close()
    assert _splittable(litemedsam)  # from the spec, without building anything; the ViT models are not split
    assert [spec.id for spec in models.REGISTRY.values() if spec.encoder == "tinyvit"] == ["litemedsam"]
    stem, rest = encoder_stem_and_rest(litemedsam.net.image_encoder, 64)
    with torch.inference_mode():
        whole = litemedsam.net.image_encoder(x)
        split = rest(stem(x))
    assert split.shape == whole.shape == (1, 256, 64, 64) and torch.equal(split, whole) and float(whole.std()) > 0.01
    assert encoder_stem_and_rest(torch.nn.Linear(2, 2), 64) is None  # not a TinyViT: one graph


@pytest.mark.skipif(not runtimes.cpu_info().native_bf16, reason="bf16 is exported only on CPUs with native bf16")
def test_bf16_export_runs_the_stem_in_fp32_and_passes_its_check(tmp_path):
    pytest.importorskip("openvino")
    m = models.load_model("litemedsam", device="cpu", runtime="openvino", precision="bf16", cache_dir=tmp_path)
    exp = m.runtime_info["exports"]["encoder_bf16"]
    entry = Path(exp["cache"])
    assert (entry / "stem.xml").is_file() and (entry / "model.xml").is_file()
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["identity"]["graph"] == "stem-fp32" and {"stem.bin", "model.bin"} <= set(manifest["files"])
    check = exp["check"]
    if runtimes.bf16_accepted(check):  # chosen: the stem in fp32, the rest in bf16
        assert m.precision == "bf16" and isinstance(m._fast_encoder, runtimes.ChainedModel)
        assert m._fast_encoder.precision == "fp32+bf16" and check["agreement_dice"] >= 0.98
    else:  # refused (its masks disagree or it is not faster): fp32, as the gate says
        assert m.precision == "fp32" and "bf16 failed its check" in m.runtime_info["reason"]


@pytest.mark.slow
def test_a_sam_vit_checkpoint_a_user_brings_goes_to_openvino_and_then_runs_without_torch(tmp_path):
    """A SAM ViT-B checkpoint (here: the architecture with seeded random weights, saved as a user's
    state dict; 1024 px input): its encoder and decoder export to OpenVINO fp32 and pass their checks
    against torch; loaded again from the cache, a box on a slice runs with no torch imported, and the mask
    is the one this process's torch model gives (Dice >= 0.99)."""
    pytest.importorskip("openvino")
    from MedFMSegmentLib.model_registry import get_spec
    from MedFMSegmentLib.session import PromptSession

    torch.manual_seed(0)
    ckpt = tmp_path / "sam_vit_b_random.pth"
    torch.save(get_spec("sam_vit_b").builder().state_dict(), ckpt)
    kw = dict(checkpoint=ckpt, allow_unverified=True, runtime="openvino", precision="fp32", cache_dir=tmp_path / "c")
    m = models.load_model("sam_vit_b", **kw)
    assert m.runtime == "openvino" and m.runtime_info["decoder"] == "openvino", m.runtime_info["reason"]
    enc = m.runtime_info["exports"]["encoder_fp32"]["check"]
    assert enc["agreement_dice"] >= 0.995 and enc["max_abs_diff"] <= 1e-3
    volume = (np.random.default_rng(1).integers(0, 255, (3, 96, 128)).astype(np.int16), np.eye(4))
    volume[0][1, 30:70, 40:90] = 600
    np.savez(tmp_path / "vol.npz", array=volume[0], affine=volume[1])
    script = (f"import sys, json\nsys.path.insert(0, {str(SEGMENT_DIR)!r})\nimport numpy as np\n"
              "from MedFMSegmentLib import models\nfrom MedFMSegmentLib.session import PromptSession\n"
              f"m = models.load_model('sam_vit_b', checkpoint={str(ckpt)!r}, allow_unverified=True, runtime='openvino',"
              f" precision='fp32', cache_dir={str(tmp_path / 'c')!r})\n"
              f"d = np.load({str(tmp_path / 'vol.npz')!r}); s = PromptSession(m); s.set_volume(d['array'], d['affine'])\n"
              "r = s.add_box('axial', 1, (38, 28, 92, 72))\n"
              f"np.save({str(tmp_path / 'mask.npy')!r}, r.mask)\n"
              "print(json.dumps({'torch': 'torch' in sys.modules, 'cached': m.runtime_info['exports']['encoder_fp32']['cached']}))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"torch": False, "cached": True}
    ref = models.load_model("sam_vit_b", checkpoint=ckpt, allow_unverified=True, runtime="torch")
    s = PromptSession(ref)
    s.set_volume(*volume)
    expected = s.add_box("axial", 1, (38, 28, 92, 72)).mask
    got = np.load(tmp_path / "mask.npy")
    assert expected.sum() > 100 and runtimes.dice(got, expected) >= 0.99
