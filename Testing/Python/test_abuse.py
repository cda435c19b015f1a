"""Fault-and-abuse suite: bad inputs, aliasing, full disks and kills, run through ``medfm`` as a user would.

Every case runs in its own copy of one case folder (a volume, a prompts file, a labelmap, previous
outputs and an adapter) and asserts three things: the exit code, that the message names the problem,
and that every file that was in the folder is byte-identical afterwards, with no file added (no
partial output, no temporary file). Bad-input cases must fail before the model loads (the loaders
are replaced by tripwires) and in under 3 s. The table grows: add a row for each new finding.

Kinds (``KIND`` of each row): alias (an output that is an input or another output), output (output
names, types, folders), volume (unreadable, truncated, NaN / constant volumes), prompts (malformed,
hostile or meaningless prompts files), corrections (a segment's corrected slices: their labelmap on
another grid, missing, corrupt or truncated, bad slice lists, axis and value), options (CLI options that can be checked without the model),
adapter (broken or crafted adapter folders), detect (detect-segment), tune (``medfm tune``),
checkpoint (malicious or unverified checkpoints), disk (full disk: a writer that fails silently,
a rename that fails), internal (a bug becomes a clear exit, not a traceback).
"""
from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io as pyio
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import pytest
import SimpleITK as sitk

from MedFMSegmentLib import api, cli, io, models

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "Sample" / "colin27_t1_deepgrey.nrrd"
SAMPLE_PROMPTS = REPO / "Resources" / "Sample" / "colin27_t1_deepgrey.prompts.json"
PYTHONPATH = os.pathsep.join(str(REPO / p) for p in ("MedFMSegment", "MedFMTrain"))
EARLY_SECONDS = 3.0  # every argument that can be checked without the model fails within this


# ----------------------------------------------------------------------------- the case folder

def _box_prompts(**segment) -> dict:
    data = json.loads(SAMPLE_PROMPTS.read_text(encoding="utf-8"))
    data["segments"][0]["propagate"] = False
    data["segments"][0].update(segment)
    return data


def _write_adapter(folder: Path, tensors=None) -> Path:
    """A small adapter folder for the embedded LiteMedSAM (random LoRA-shaped tensors, no training)."""
    import torch
    from MedFMTrainLib import store
    from MedFMTrainLib.adapters import LoraSettings, OrganAdapter

    settings = LoraSettings(2, 4.0, "decoder")
    tensors = tensors or {"transformer.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 256) * 0.01}
    manifest = {"base_model": {"id": "litemedsam", "sha256": models.LITEMEDSAM_SHA256},
                "lora": settings.to_dict(), "metrics": {}, "created": "2026-12-01T00:00:00Z"}
    adapter = OrganAdapter("Thalamus_L", "litemedsam", models.LITEMEDSAM_SHA256, settings, tensors,
                           manifest=manifest)
    return store.save_adapter(adapter, folder)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """The case folder every row starts from (copied per row)."""
    if not SAMPLE.is_file():
        pytest.fail(f"the shipped demo sample is missing: {SAMPLE}")
    d = tmp_path_factory.mktemp("abuse_template")
    shutil.copy(SAMPLE, d / "vol.nrrd")
    (d / "prompts.json").write_text(json.dumps(_box_prompts()), encoding="utf-8")
    array, matrix = io.read_volume(SAMPLE)
    labels = (array > np.percentile(array, 90)).astype(np.uint8)
    io.write_labelmap(d / "labels.nrrd", {"bright": labels}, matrix)
    box = np.zeros(array.shape, np.uint8)
    box[30:36, 20:40, 10:50] = 1
    io.write_segmentation(d / "prev.seg.nrrd", {"Thalamus_L": box}, matrix)
    io.write_labelmap(d / "prev.nii.gz", {"Thalamus_L": box}, matrix)
    (d / "prev.png").write_bytes(b"\x89PNG\r\n\x1a\nprevious overlay")
    _write_adapter(d / "adapter")
    return d


def snapshot(folder: Path) -> dict:
    """{relative path: sha256} of every file under ``folder`` (links by their target's content)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink() and not p.exists():
            out[rel] = "dangling link"
        elif p.is_dir():
            out[rel + "/"] = "folder"
        elif not p.is_file():
            out[rel] = "special file"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(argv: Sequence[str]):
    """cli.main in-process -> (exit code, stdout, stderr); argparse's SystemExit counts as an exit code."""
    out, err = pyio.StringIO(), pyio.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def tripwires(monkeypatch):
    """Record (and refuse) any model load: bad input must be found before it."""
    loads: List[str] = []

    def no_session(args):
        loads.append("session")
        raise AssertionError("the model was loaded before the input was checked")

    def no_model(*a, **k):
        loads.append("load_model")
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cli, "_session", no_session)
    monkeypatch.setattr(models, "load_model", no_model)
    return loads


# ----------------------------------------------------------------------------- setups (build the bad input)

def write_json(name, data):
    def setup(d: Path):
        (d / name).write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return setup


def write_bytes(name, data: bytes):
    def setup(d: Path):
        (d / name).write_bytes(data)
    return setup


def image_file(name, array, spacing=(1.0, 1.0, 1.0), vector=False):
    def setup(d: Path):
        img = sitk.GetImageFromArray(array, isVector=vector)
        if img.GetDimension() == len(spacing):
            img.SetSpacing(spacing)
        sitk.WriteImage(img, str(d / name), True)
    return setup


def truncated_copy(src_name, name, fmt_suffix):
    """The sample volume written as ``fmt_suffix`` and cut to half its bytes."""
    def setup(d: Path):
        full = d / f"full{fmt_suffix}"
        sitk.WriteImage(sitk.ReadImage(str(d / src_name)), str(full), True)
        data = full.read_bytes()
        (d / name).write_bytes(data[: len(data) // 2])
        full.unlink()
    return setup


def damaged_gzip(name):
    """A .nii.gz of the sample whose compressed data has one byte flipped near the end (CRC fails)."""
    def setup(d: Path):
        full = d / "full.nii"
        sitk.WriteImage(sitk.ReadImage(str(d / "vol.nrrd")), str(full))
        data = bytearray(gzip.compress(full.read_bytes()))
        data[-12] ^= 0xFF
        (d / name).write_bytes(bytes(data))
        full.unlink()
    return setup


def symlink(name, target):
    def setup(d: Path):
        os.symlink(target, d / name)
    return setup


def hardlink(name, target):
    def setup(d: Path):
        os.link(d / target, d / name)
    return setup


def mkdir(name):
    def setup(d: Path):
        (d / name).mkdir()
    return setup


def fifo(name):
    def setup(d: Path):
        os.mkfifo(d / name)
    return setup


def adapter_variant(name, edit: Callable[[Path], None]):
    def setup(d: Path):
        shutil.copytree(d / "adapter", d / name)
        edit(d / name)
    return setup


def _manifest_edit(change):
    def edit(folder: Path):
        m = json.loads((folder / "manifest.json").read_text())
        change(m)
        (folder / "manifest.json").write_text(json.dumps(m))
    return edit


def _nan_weights(folder: Path):
    import torch
    from safetensors.torch import save_file

    weights = folder / "adapter.safetensors"
    t = torch.zeros(2, 256)
    t[0, 0] = float("nan")
    save_file({"decoder.transformer.layers.0.self_attn.q_proj.lora_A.weight": t}, str(weights))
    _manifest_edit(lambda m: m["files"]["adapter.safetensors"].update(sha256=models.file_sha256(weights)))(folder)


def _cut_weights(folder: Path):
    weights = folder / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def evil_checkpoint(name, marker):
    def setup(d: Path):
        import torch
        torch.save({"model": {"w": torch.zeros(2)}, "x": _Payload(str(d / marker))}, d / name)
    return setup


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def many(*setups):
    def setup(d: Path):
        for s in setups:
            s(d)
    return setup


# ----------------------------------------------------------------------------- the table

@dataclass
class Case:
    id: str
    kind: str
    argv: List[str]
    expect: List[str]  # substrings of stderr (case-insensitive), all required
    setup: Optional[Callable[[Path], None]] = None
    code: int = 2
    forbid: List[str] = field(default_factory=lambda: ["Traceback"])
    model: bool = False  # may load a model (the checkpoint cases: refused inside load_model)


SEG = ["segment", "vol.nrrd", "--prompts", "prompts.json", "--output", "out.seg.nrrd", "--device", "cpu"]
DET = ["detect-segment", "vol.nrrd", "--detector", "labelmap:labels.nrrd", "--output", "out.seg.nrrd"]
TUNE = ["tune", "--image", "vol.nrrd", "--labels", "labels.nrrd", "--organ", "bright", "--out", "newadapter",
        "--train-slices", "30,32"]


def seg(*extra, prompts="prompts.json", volume="vol.nrrd", output="out.seg.nrrd"):
    return ["segment", volume, "--prompts", prompts, "--output", output, *extra]


def det(*extra, volume="vol.nrrd", output="out.seg.nrrd", detector="labelmap:labels.nrrd"):
    return ["detect-segment", volume, "--detector", detector, "--output", output, *extra]


def p_json(text_or_obj, name="p.json"):
    return write_json(name, text_or_obj)


def _corr(propagate=False, **corrections) -> dict:
    """The sample's box prompts with ``"corrections"`` on the template's labelmap (a key set to None is left out)."""
    corr = {"labelmap": "labels.nrrd", "value": 1, "axis": "axial", "slices": [30, 35]}
    corr.update(corrections)
    return _box_prompts(propagate=propagate, corrections={k: v for k, v in corr.items() if v is not None})


def _shifted_labels(name, mm):
    """The template's labelmap with its origin moved ``mm`` along x (same size and spacing)."""
    def setup(d: Path):
        labels, matrix = io.read_volume(d / "labels.nrrd")
        moved = matrix.copy()
        moved[0, 3] += mm
        io.write_labelmap(d / name, {"bright": labels}, moved)
    return setup


def _fractional_labels(name):
    def setup(d: Path):
        labels, matrix = io.read_volume(d / "labels.nrrd")
        img = sitk.GetImageFromArray(labels.astype(np.float32) * 0.5)
        img.CopyInformation(sitk.ReadImage(str(d / "labels.nrrd")))
        sitk.WriteImage(img, str(d / name), True)
    return setup


BOX = {"corners": [[-24.0, -35.0, 9.0], [3.0, -1.0, 9.0]], "axis": "axial"}

CASES: List[Case] = [
    # --- alias: an output that is an input or another output (data loss before this fix)
    Case("labelmap-is-the-volume", "alias", seg("--labelmap", "vol.nrrd", "--overwrite"), ["--labelmap vol.nrrd", "same file"]),
    Case("labelmap-is-the-volume-no-overwrite", "alias", seg("--labelmap", "vol.nrrd"), ["vol.nrrd", "already exists", "--overwrite"]),
    Case("overlay-is-the-volume", "alias", seg("--overlay", "vol.nrrd", "--overwrite"), ["--overlay vol.nrrd", ".png"]),
    Case("output-is-the-input-seg", "alias", seg("--overwrite", volume="in.seg.nrrd", output="in.seg.nrrd"),
         ["--output in.seg.nrrd", "same file", "input"], setup=lambda d: shutil.copy(d / "vol.nrrd", d / "in.seg.nrrd")),
    Case("overlay-is-the-output", "alias", seg("--overlay", "prev.seg.nrrd", "--overwrite", output="prev.seg.nrrd"),
         ["--overlay", ".png"]),
    Case("labelmap-symlink-to-volume", "alias", seg("--labelmap", "link.nrrd", "--overwrite"),
         ["--labelmap link.nrrd", "same file", "vol.nrrd"], setup=symlink("link.nrrd", "vol.nrrd")),
    Case("output-hardlink-to-volume", "alias", seg("--overwrite", volume="in.seg.nrrd", output="hard.seg.nrrd"),
         ["hard.seg.nrrd", "same file"], setup=many(lambda d: shutil.copy(d / "vol.nrrd", d / "in.seg.nrrd"),
                                                     hardlink("hard.seg.nrrd", "in.seg.nrrd"))),
    Case("labelmap-symlink-to-output", "alias", seg("--labelmap", "l.nrrd", "--overwrite", output="prev.seg.nrrd"),
         ["--labelmap l.nrrd", "same file", "output --output"], setup=symlink("l.nrrd", "prev.seg.nrrd")),
    Case("output-via-dotdot-path-is-volume", "alias", seg("--overwrite", volume="in.seg.nrrd", output="sub/../in.seg.nrrd"),
         ["same file"], setup=many(mkdir("sub"), lambda d: shutil.copy(d / "vol.nrrd", d / "in.seg.nrrd"))),
    Case("prompts-hardlink-as-labelmap", "alias", seg("--labelmap", "p.nii", "--overwrite", prompts="p.nii"),
         ["--labelmap p.nii", "same file", "--prompts"], setup=p_json(_box_prompts(), "p.nii")),
    Case("detect-labelmap-is-the-volume", "alias", det("--labelmap", "vol.nrrd", "--overwrite"), ["--labelmap vol.nrrd", "same file"]),
    Case("detect-output-is-the-detector-file", "alias", det("--overwrite", detector="labelmap:prev.seg.nrrd", output="prev.seg.nrrd"),
         ["--output prev.seg.nrrd", "same file", "--detector"]),
    Case("detect-labelmap-is-the-detector-file", "alias", det("--labelmap", "labels.nrrd", "--overwrite"),
         ["--labelmap labels.nrrd", "same file", "--detector"]),
    Case("detect-output-symlink-to-volume", "alias", det("--overwrite", volume="in.seg.nrrd", output="v.seg.nrrd"), ["same file"],
         setup=many(lambda d: shutil.copy(d / "vol.nrrd", d / "in.seg.nrrd"), symlink("v.seg.nrrd", "in.seg.nrrd")),
         ),
    # --- output: names, types and folders, checked before the model
    Case("output-folder-missing", "output", seg(output="nowhere/out.seg.nrrd"), ["nowhere", "does not exist"]),
    Case("output-folder-is-a-file", "output", seg(output="vol.nrrd/out.seg.nrrd"), ["vol.nrrd", "is not a folder"]),
    Case("output-is-a-folder", "output", seg("--overwrite", output="d.seg.nrrd"), ["d.seg.nrrd", "is a folder"], setup=mkdir("d.seg.nrrd")),
    Case("output-wrong-type", "output", seg(output="out.nii.gz"), ["--output out.nii.gz", ".seg.nrrd", "--labelmap"]),
    Case("output-no-suffix", "output", seg(output="out"), ["--output out", ".seg.nrrd"]),
    Case("labelmap-is-seg-nrrd", "output", seg("--labelmap", "l.seg.nrrd"), ["--labelmap l.seg.nrrd", "--output"]),
    Case("labelmap-png", "output", seg("--labelmap", "l.png"), ["--labelmap l.png", ".nii.gz"]),
    Case("labelmap-txt", "output", seg("--labelmap", "l.txt"), ["--labelmap l.txt"]),
    Case("overlay-jpg", "output", seg("--overlay", "o.jpg"), ["--overlay o.jpg", ".png"]),
    Case("output-exists", "output", seg(output="prev.seg.nrrd"), ["prev.seg.nrrd", "already exists", "pass --overwrite"],
         forbid=["Traceback", "overwrite=True"]),
    Case("labelmap-exists", "output", seg("--labelmap", "prev.nii.gz"), ["prev.nii.gz", "already exists", "--overwrite"]),
    Case("overlay-exists", "output", seg("--overlay", "prev.png"), ["prev.png", "already exists"]),
    Case("output-is-a-fifo", "output", seg("--overwrite", output="f.seg.nrrd"), ["f.seg.nrrd", "not a regular file"], setup=fifo("f.seg.nrrd")),
    Case("detect-output-folder-missing", "output", det(output="nowhere/o.seg.nrrd"), ["nowhere", "does not exist"]),
    Case("detect-output-wrong-type", "output", det(output="o.nrrd"), ["--output o.nrrd", ".seg.nrrd"]),
    Case("detect-labelmap-exists", "output", det("--labelmap", "prev.nii.gz"), ["prev.nii.gz", "already exists"]),
    # --- volume
    Case("volume-missing", "volume", seg(volume="none.nrrd"), ["none.nrrd", "not found"]),
    Case("volume-is-a-folder", "volume", seg(volume="dir.nrrd"), ["dir.nrrd", "folder"], setup=mkdir("dir.nrrd")),
    Case("volume-not-an-image", "volume", seg(volume="text.nrrd"), ["text.nrrd", "cannot read"], setup=write_bytes("text.nrrd", b"hello\n")),
    Case("volume-empty-file", "volume", seg(volume="empty.nii.gz"), ["empty.nii.gz"], setup=write_bytes("empty.nii.gz", b"")),
    Case("volume-truncated-nii-gz", "volume", seg(volume="cut.nii.gz"), ["cut.nii.gz", "truncated"],
         setup=truncated_copy("vol.nrrd", "cut.nii.gz", ".nii.gz")),
    Case("volume-truncated-nii", "volume", seg(volume="cut.nii"), ["cut.nii", "truncated", "header promises"],
         setup=truncated_copy("vol.nrrd", "cut.nii", ".nii")),
    Case("volume-truncated-nrrd", "volume", seg(volume="cut.nrrd"), ["cut.nrrd", "truncated"],
         setup=truncated_copy("vol.nrrd", "cut.nrrd", ".nrrd")),
    Case("volume-gzip-crc-damaged", "volume", seg(volume="crc.nii.gz"), ["crc.nii.gz", "corrupt", "gzip"], setup=damaged_gzip("crc.nii.gz")),
    Case("volume-2d", "volume", seg(volume="flat.nrrd"), ["flat.nrrd", "2D"], setup=image_file("flat.nrrd", np.ones((20, 20), np.int16), (1.0, 1.0))),
    Case("volume-4d-frames", "volume", seg(volume="t.nrrd"), ["t.nrrd", "4D", "frames"],
         setup=image_file("t.nrrd", np.arange(3 * 4 * 5 * 6, dtype=np.int16).reshape(3, 4, 5, 6), (1.0, 1.0, 1.0, 1.0))),
    Case("volume-rgb", "volume", seg(volume="rgb.nrrd"), ["rgb.nrrd", "components"],
         setup=image_file("rgb.nrrd", np.random.default_rng(0).integers(0, 255, (5, 6, 7, 3)).astype(np.uint8), vector=True)),
    Case("volume-nan", "volume", seg(volume="nan.nrrd"), ["nan.nrrd", "NaN"],
         setup=image_file("nan.nrrd", np.where(np.arange(5 * 6 * 7).reshape(5, 6, 7) == 3, np.nan, 1.0).astype(np.float32))),
    Case("volume-constant", "volume", seg(volume="const.nrrd"), ["const.nrrd", "constant"],
         setup=image_file("const.nrrd", np.full((5, 6, 7), 7, np.int16))),
    Case("volume-unknown-format", "volume", seg(volume="v.xyz"), ["v.xyz"], setup=write_bytes("v.xyz", b"\0" * 100)),
    Case("detect-volume-nan", "volume", det(volume="nan.nrrd"), ["nan.nrrd", "NaN"],
         setup=image_file("nan.nrrd", np.full((5, 6, 7), np.nan, np.float32))),
    Case("detect-volume-truncated", "volume", det(volume="cut.nii.gz"), ["cut.nii.gz", "truncated"],
         setup=truncated_copy("vol.nrrd", "cut.nii.gz", ".nii.gz")),
    # --- prompts
    Case("prompts-missing", "prompts", seg(prompts="none.json"), ["none.json", "not found"]),
    Case("prompts-folder", "prompts", seg(prompts="pdir"), ["pdir", "not a file"], setup=mkdir("pdir")),
    Case("prompts-invalid-json", "prompts", seg(prompts="p.json"), ["p.json", "line 1"], setup=p_json('{"space": ')),
    Case("prompts-not-an-object", "prompts", seg(prompts="p.json"), ["p.json", "JSON object"], setup=p_json("[1, 2]")),
    Case("prompts-empty-file", "prompts", seg(prompts="p.json"), ["p.json", "invalid JSON"], setup=p_json("")),
    Case("prompts-not-utf8", "prompts", seg(prompts="p.json"), ["p.json"], setup=write_bytes("p.json", b'{"space": "\xff\xfe"}')),
    Case("prompts-int-400-digits", "prompts", seg(prompts="p.json"), ["p.json", "400 digits"],
         setup=p_json('{"space":"RAS","segments":[{"name":"a","boxes":[{"corners":[[%s,0,9],[3,-1,9]]}]}]}' % ("9" * 400))),
    Case("prompts-int-5000-digits", "prompts", seg(prompts="p.json"), ["p.json", "5000 digits"],
         setup=p_json('{"space":"RAS","segments":[{"name":"a","points":[{"position":[%s,0,9]}]}]}' % ("1" * 5000))),
    Case("prompts-nested-100000-deep", "prompts", seg(prompts="p.json"), ["p.json", "nested too deeply"],
         setup=p_json("[" * 100_000 + "]" * 100_000)),
    Case("prompts-nested-in-comment", "prompts", seg(prompts="p.json"), ["p.json", "nested too deeply"],
         setup=p_json('{"space":"RAS","_note":' + "[" * 100_000 + "]" * 100_000 + ',"segments":[]}')),
    Case("prompts-64mb-1m-boxes", "prompts", seg(prompts="p.json"), ["p.json", "more than the limit"],
         setup=p_json('{"space":"RAS","segments":[{"name":"a","boxes":['
                      + ",".join(['{"corners":[[0,0,0],[1,1,0]],"axis":"axial"}'] * 1_400_000) + "]}]}")),
    Case("prompts-200k-boxes", "prompts", seg(prompts="p.json"), ["p.json", "200000 boxes and points", "limit"],
         setup=p_json('{"space":"IJK","segments":[{"name":"a","boxes":['
                      + ",".join(['{"corners":[[0,0,9],[3,1,9]]}'] * 200_000) + "]}]}")),
    Case("prompts-11000-segments", "prompts", seg(prompts="p.json"), ["p.json", "11000 segments"],
         setup=p_json({"space": "RAS", "segments": [{"name": f"s{n}", "boxes": [BOX]} for n in range(11_000)]})),
    Case("prompts-unknown-key", "prompts", seg(prompts="p.json"), ["p.json", "segments[0].boxs", "did you mean 'boxes'"],
         setup=p_json({"space": "RAS", "segments": [{"name": "a", "boxs": [BOX]}]})),
    Case("prompts-missing-space", "prompts", seg(prompts="p.json"), ["p.json", "space", "missing"],
         setup=p_json({"segments": [{"name": "a", "boxes": [BOX]}]})),
    Case("prompts-lps-space", "prompts", seg(prompts="p.json"), ["p.json", "LPS", "negate"],
         setup=p_json({"space": "LPS", "segments": [{"name": "a", "boxes": [BOX]}]})),
    Case("prompts-nan", "prompts", seg(prompts="p.json"), ["p.json", "corners[0][0]", "finite"],
         setup=p_json('{"space":"RAS","segments":[{"name":"a","boxes":[{"corners":[[NaN,0,9],[3,-1,9]]}]}]}')),
    Case("prompts-infinity", "prompts", seg(prompts="p.json"), ["p.json", "finite"],
         setup=p_json('{"space":"RAS","segments":[{"name":"a","points":[{"position":[Infinity,0,9]}]}]}')),
    Case("prompts-1e999", "prompts", seg(prompts="p.json"), ["p.json", "finite"],
         setup=p_json('{"space":"RAS","segments":[{"name":"a","points":[{"position":[1e999,0,9]}]}]}')),
    Case("prompts-duplicate-key", "prompts", seg(prompts="p.json"), ["p.json", "appears twice"],
         setup=p_json('{"space":"RAS","space":"IJK","segments":[]}')),
    Case("prompts-duplicate-names", "prompts", seg(prompts="p.json"), ["p.json", "duplicate name"],
         setup=p_json({"space": "RAS", "segments": [{"name": "a", "boxes": [BOX]}, {"name": "a", "boxes": [BOX]}]})),
    Case("prompts-no-prompt", "prompts", seg(prompts="p.json"), ["p.json", "has no prompt"],
         setup=p_json({"space": "RAS", "segments": [{"name": "a"}]})),
    Case("prompts-only-negative-click", "prompts", seg(prompts="p.json"), ["p.json", "segments[0].points", "only negative"],
         setup=p_json({"space": "RAS", "segments": [{"name": "a", "points": [{"position": [-11, -18, 9], "positive": False}]}]})),
    Case("prompts-only-negative-clicks-2nd-segment", "prompts", seg(prompts="p.json"), ["segments[1].points", "only negative"],
         setup=p_json({"space": "RAS", "segments": [{"name": "a", "boxes": [BOX]}, {"name": "b", "points": [
             {"position": [-11, -18, 9], "positive": False}, {"position": [-12, -18, 9], "positive": False}]}]})),
    Case("prompts-box-outside", "prompts", seg(prompts="p.json"), ["p.json", "outside the volume"],
         setup=p_json({"space": "RAS", "segments": [{"name": "a", "boxes": [{"corners": [[500, 500, 9], [600, 600, 9]]}]}]})),
    Case("prompts-point-1e308", "prompts", seg(prompts="p.json"), ["p.json", "1e+308", "outside the volume"],
         forbid=["Traceback", "0" * 30], setup=p_json({"space": "RAS", "segments": [{"name": "a", "points": [{"position": [1e308, -18, 9]}]}]})),
    Case("prompts-corners-two-slices", "prompts", seg(prompts="p.json"), ["p.json", "not on one axial slice"],
         setup=p_json({"space": "RAS", "segments": [{"name": "a", "boxes": [{"corners": [[-24, -35, 9], [3, -1, 15]]}]}]})),
    Case("prompts-zero-width-box", "prompts", seg(prompts="p.json"), ["p.json", "zero width"],
         setup=p_json({"space": "RAS", "segments": [{"name": "a", "boxes": [{"corners": [[3, -35, 9], [3, -1, 9]]}]}]})),
    Case("prompts-name-newline", "prompts", seg(prompts="p.json"), ["p.json", "control characters"],
         setup=p_json({"space": "RAS", "segments": [{"name": "a\nb", "boxes": [BOX]}]})),
    Case("prompts-bool-coordinate", "prompts", seg(prompts="p.json"), ["p.json", "expected a number"],
         setup=p_json({"space": "RAS", "segments": [{"name": "a", "points": [{"position": [True, 0, 9]}]}]})),
    Case("prompts-adapter-missing", "prompts", seg(prompts="p.json"), ["nope", "adapter folder not found"],
         setup=p_json(_box_prompts(adapter="nope"))),
    # --- corrections: corrected slices from a labelmap (``"corrections"`` of a segment), checked on the volume
    Case("corr-labelmap-other-grid", "corrections", seg(prompts="p.json"),
         ["p.json", "segments[0].corrections.labelmap", "small.nrrd", "not on the volume's voxel grid", "size 7x6x5",
          "size 84x87x63", "spacing", "origin", "directions"],
         setup=many(image_file("small.nrrd", np.ones((5, 6, 7), np.uint8)), p_json(_corr(labelmap="small.nrrd")))),
    Case("corr-labelmap-shifted-origin", "corrections", seg(prompts="p.json"),
         ["segments[0].corrections.labelmap", "shifted.nrrd", "not on the volume's voxel grid", "origin (RAS) (-42"],
         setup=many(_shifted_labels("shifted.nrrd", 5.0), p_json(_corr(labelmap="shifted.nrrd")))),
    Case("corr-slice-outside", "corrections", seg(prompts="p.json"),
         ["segments[0].corrections.slices[1]", "axial slice 63 is outside the volume", "0..62"],
         setup=p_json(_corr(slices=[30, 63]))),
    Case("corr-slice-listed-twice", "corrections", seg(prompts="p.json"),
         ["segments[0].corrections.slices[2]", "slice 30 is listed twice", "slices[0]"],
         setup=p_json(_corr(slices=[30, 31, 30]))),
    Case("corr-slice-negative", "corrections", seg(prompts="p.json"), ["corrections.slices[0]", "negative"],
         setup=p_json(_corr(slices=[-1]))),
    Case("corr-slice-not-integer", "corrections", seg(prompts="p.json"), ["corrections.slices[1]", "integer", "30.5"],
         setup=p_json(_corr(slices=[30, 30.5]))),
    Case("corr-slice-bool", "corrections", seg(prompts="p.json"), ["corrections.slices[0]", "a boolean"],
         setup=p_json(_corr(slices=[True]))),
    Case("corr-slices-empty", "corrections", seg(prompts="p.json"), ["corrections.slices", "is empty"],
         setup=p_json(_corr(slices=[]))),
    Case("corr-slices-missing", "corrections", seg(prompts="p.json"), ["corrections.slices", "missing"],
         setup=p_json(_corr(slices=None))),
    Case("corr-axis-not-the-propagation-axis", "corrections", seg(prompts="p.json"),
         ["segments[0].corrections.axis", "coronal", "propagate along axial", "must lie on its axis"],
         setup=p_json(_corr(axis="coronal", propagate=True))),
    Case("corr-axis-unknown", "corrections", seg(prompts="p.json"), ["corrections.axis", "unknown axis", "axail"],
         setup=p_json(_corr(axis="axail"))),
    Case("corr-adapt-not-boolean", "corrections", seg(prompts="p.json"),
         ["segments[0].corrections.adapt", "expected true or false", "'yes'"], setup=p_json(_corr(adapt="yes"))),
    Case("corr-value-not-integer", "corrections", seg(prompts="p.json"), ["corrections.value", "integer", "1.5"],
         setup=p_json(_corr(value=1.5))),
    Case("corr-value-string", "corrections", seg(prompts="p.json"), ["corrections.value", "integer", "a string"],
         setup=p_json(_corr(value="1"))),
    Case("corr-value-zero", "corrections", seg(prompts="p.json"), ["corrections.value", "background"],
         setup=p_json(_corr(value=0))),
    Case("corr-value-huge", "corrections", seg(prompts="p.json"), ["corrections.value", "not a label value"],
         forbid=["Traceback", "0" * 30], setup=p_json(_corr(value=10 ** 40))),
    Case("corr-labelmap-missing", "corrections", seg(prompts="p.json"),
         ["segments[0].corrections.labelmap", "none.nii.gz", "not found"], setup=p_json(_corr(labelmap="none.nii.gz"))),
    Case("corr-labelmap-key-missing", "corrections", seg(prompts="p.json"), ["corrections.labelmap", "missing"],
         setup=p_json(_corr(labelmap=None))),
    Case("corr-labelmap-not-a-string", "corrections", seg(prompts="p.json"), ["corrections.labelmap", "path string"],
         setup=p_json(_corr(labelmap=7))),
    Case("corr-labelmap-is-a-folder", "corrections", seg(prompts="p.json"), ["corrections.labelmap", "ldir", "folder"],
         setup=many(mkdir("ldir"), p_json(_corr(labelmap="ldir")))),
    Case("corr-labelmap-not-an-image", "corrections", seg(prompts="p.json"),
         ["corrections.labelmap", "bad.nii.gz", "cannot read"],
         setup=many(write_bytes("bad.nii.gz", b"garbage\n" * 40), p_json(_corr(labelmap="bad.nii.gz")))),
    Case("corr-labelmap-truncated", "corrections", seg(prompts="p.json"),
         ["corrections.labelmap", "cut.nii.gz", "truncated"],
         setup=many(truncated_copy("labels.nrrd", "cut.nii.gz", ".nii.gz"), p_json(_corr(labelmap="cut.nii.gz")))),
    Case("corr-labelmap-truncated-nii", "corrections", seg(prompts="p.json"),
         ["corrections.labelmap", "cut.nii", "truncated"],
         setup=many(truncated_copy("labels.nrrd", "cut.nii", ".nii"), p_json(_corr(labelmap="cut.nii")))),
    Case("corr-labelmap-gzip-crc-damaged", "corrections", seg(prompts="p.json"),
         ["corrections.labelmap", "crc.nii.gz", "corrupt"],
         setup=many(damaged_gzip("crc.nii.gz"), p_json(_corr(labelmap="crc.nii.gz")))),
    Case("corr-labelmap-fractional-values", "corrections", seg(prompts="p.json"),
         ["corrections.labelmap", "f.nrrd", "non-integer"],
         setup=many(_fractional_labels("f.nrrd"), p_json(_corr(labelmap="f.nrrd")))),
    Case("corr-unknown-key", "corrections", seg(prompts="p.json"), ["corrections.slice", "did you mean 'slices'"],
         setup=p_json(_corr(slice=[30]))),
    Case("corr-not-an-object", "corrections", seg(prompts="p.json"), ["segments[0].corrections", "expected an object"],
         setup=p_json(_box_prompts(corrections=[30, 31]))),
    Case("corr-problems-listed-together", "corrections", seg(prompts="p.json"),
         ["3 problems", "slices[1]", "value", "segments[1].corrections.labelmap"],
         setup=p_json({"space": "RAS", "segments": [
             _corr(slices=[30, 30], value=2.5)["segments"][0],
             {"name": "b", "boxes": [BOX], "propagate": False, "corrections": {"labelmap": 7, "slices": [3]}}]})),
    Case("corr-20000-slices-in-all", "corrections", seg(prompts="p.json"), ["p.json", "20000 corrected slices", "limit"],
         setup=p_json({"space": "RAS", "segments": [
             {"name": f"s{n}", "corrections": {"labelmap": "labels.nrrd", "slices": list(range(5000))}}
             for n in range(4)]})),
    Case("corr-labelmap-is-the-output", "alias", seg("--labelmap", "labels.nrrd", "--overwrite", prompts="p.json"),
         ["--labelmap labels.nrrd", "same file", "corrections labelmap"], setup=p_json(_corr())),
    # --- options checked without the model
    Case("device-meta", "options", SEG[:-1] + ["meta"], ["--device 'meta'", "unsupported device"]),
    Case("device-xpu", "options", SEG[:-1] + ["xpu"], ["--device 'xpu'"]),
    Case("device-cpu-index", "options", SEG[:-1] + ["cpu:x"], ["--device 'cpu:x'"]),
    Case("device-cuda-absent", "options", SEG[:-1] + ["cuda"], ["cuda", "not available"]),
    Case("device-garbage", "options", SEG[:-1] + ["💥"], ["--device"]),
    Case("model-unknown", "options", seg("--model", "sam_vit_z"), ["sam_vit_z", "known models"]),
    Case("preset-unknown", "options", seg("--preset", "ct-nope"), ["--preset", "ct-nope"]),
    Case("checkpoint-missing", "options", seg("--model", "sam_vit_b", "--checkpoint", "none.pth"), ["--checkpoint none.pth", "not found"]),
    Case("precision-unknown", "options", seg("--precision", "fp16"), ["--precision", "invalid choice"]),
    Case("missing-prompts-option", "options", ["segment", "vol.nrrd", "--output", "o.seg.nrrd"], ["--prompts"]),
    Case("unknown-subcommand", "options", ["segmnt", "vol.nrrd"], ["invalid choice"]),
    # --- adapters
    Case("adapter-missing", "adapter", seg("--adapter", "none"), ["none", "adapter folder not found"]),
    Case("adapter-not-an-adapter", "adapter", seg("--adapter", "empty"), ["manifest.json", "missing"], setup=mkdir("empty")),
    Case("adapter-manifest-not-json", "adapter", seg("--adapter", "a2"), ["manifest.json", "not valid JSON"],
         setup=adapter_variant("a2", lambda f: (f / "manifest.json").write_text("{ broken"))),
    Case("adapter-format-version-99", "adapter", seg("--adapter", "a2"), ["format version 99"],
         setup=adapter_variant("a2", _manifest_edit(lambda m: m.update(format_version=99)))),
    Case("adapter-manifest-no-lora", "adapter", seg("--adapter", "a2"), ["'lora'", "missing"],
         setup=adapter_variant("a2", _manifest_edit(lambda m: m.pop("lora")))),
    Case("adapter-nan-weights", "adapter", seg("--adapter", "a2"), ["adapter.safetensors", "NaN"],
         setup=adapter_variant("a2", _nan_weights)),
    Case("adapter-truncated-weights", "adapter", seg("--adapter", "a2"), ["adapter.safetensors", "truncated"],
         setup=adapter_variant("a2", _cut_weights)),
    Case("adapter-weights-missing", "adapter", seg("--adapter", "a2"), ["adapter.safetensors", "missing"],
         setup=adapter_variant("a2", lambda f: (f / "adapter.safetensors").unlink())),
    # --- detect-segment options
    Case("detect-threshold-2", "detect", det("--score-threshold", "2"), ["--score-threshold", "0..1"]),
    Case("detect-threshold-nan", "detect", det("--score-threshold", "nan"), ["--score-threshold", "nan"]),
    Case("detect-threshold-huge", "detect", det("--score-threshold", "1e308"), ["--score-threshold", "1e+308"],
         forbid=["Traceback", "0" * 30]),
    Case("detect-margin-negative", "detect", det("--margin", "-1"), ["--margin", "-1"]),
    Case("detect-margin-huge", "detect", det("--margin", "1000000000"), ["--margin"]),
    Case("detect-margin-not-int", "detect", det("--margin", "2.5"), ["--margin", "invalid int"]),
    Case("detect-spec-no-colon", "detect", det(detector="labels.nrrd"), ["KIND:PATH"]),
    Case("detect-spec-unknown-kind", "detect", det(detector="magic:labels.nrrd"), ["unknown detector kind", "magic"]),
    Case("detect-labelmap-missing", "detect", det(detector="labelmap:none.nrrd"), ["none.nrrd", "not found"]),
    Case("detect-adapter-dir-missing", "detect", det("--adapter-dir", "nodir"), ["--adapter-dir nodir", "not found"]),
    Case("detect-adapter-dir-nan", "detect", det("--adapter-dir", "lib"), ["NaN"],
         setup=many(mkdir("lib"), lambda d: shutil.copytree(d / "adapter", d / "lib" / "bright"),
                    lambda d: _nan_weights(d / "lib" / "bright"))),
    Case("detect-device-meta", "detect", det("--device", "meta"), ["--device 'meta'"]),
    Case("detect-preset-unknown", "detect", det("--preset", "nope"), ["--preset", "nope"]),
    # --- tune (every option checked before the model loads)
    Case("tune-threads-negative", "tune", TUNE + ["--threads", "-1"], ["--threads", "-1"]),
    Case("tune-lr-1e30", "tune", TUNE + ["--lr", "1e30"], ["--lr", "1e+30"], forbid=["Traceback", "0" * 30]),
    Case("tune-lr-zero", "tune", TUNE + ["--lr", "0"], ["--lr"]),
    Case("tune-lr-nan", "tune", TUNE + ["--lr", "nan"], ["--lr", "nan"]),
    Case("tune-steps-zero", "tune", TUNE + ["--steps", "0"], ["--steps"]),
    Case("tune-rank-zero", "tune", TUNE + ["--rank", "0"], ["--rank"]),
    Case("tune-device-meta", "tune", TUNE + ["--device", "meta"], ["--device 'meta'"]),
    Case("tune-out-parent-missing", "tune", TUNE[:-4] + ["--out", "no/where", "--train-slices", "30,32"], ["no", "does not exist"]),
    Case("tune-out-exists", "tune", TUNE[:-4] + ["--out", "adapter", "--train-slices", "30,32"], ["adapter", "--overwrite"],
         forbid=["Traceback", "overwrite=True"]),
    Case("tune-out-is-a-file", "tune", TUNE[:-4] + ["--out", "vol.nrrd", "--train-slices", "30,32"], ["vol.nrrd", "not a folder"]),
    Case("tune-image-missing", "tune", ["tune", "--image", "none.nrrd", "--labels", "labels.nrrd", "--organ", "x", "--out", "n"],
         ["none.nrrd", "not found"]),
    Case("tune-pairs-mismatch", "tune", TUNE + ["--image", "vol.nrrd"], ["one --labels per --image"]),
    Case("tune-label-value-absent", "tune", TUNE + ["--label-value", "9"], ["label value 9"]),
    Case("tune-labels-other-grid", "tune", ["tune", "--image", "vol.nrrd", "--labels", "small.nrrd", "--organ", "x",
                                            "--out", "n", "--train-slices", "2"], ["small.nrrd", "different grid"],
         setup=image_file("small.nrrd", np.ones((5, 6, 7), np.uint8))),
    Case("tune-bad-slices", "tune", TUNE[:-2] + ["--train-slices", "a,b"], ["--train-slices"]),
    Case("tune-organ-empty", "tune", ["tune", "--image", "vol.nrrd", "--labels", "labels.nrrd", "--organ", " ", "--out", "n"],
         ["organ"]),
    # --- checkpoints (refused inside load_model, before any network is built)
    Case("checkpoint-with-code", "checkpoint", seg("--model", "sam_vit_b", "--checkpoint", "evil.pth", "--allow-unverified"),
         ["evil.pth", "holds code", "refused"], setup=evil_checkpoint("evil.pth", "PWNED"), model=True,
         forbid=["Traceback", "weights_only", "corrupt"]),
    Case("checkpoint-unverified", "checkpoint", seg("--model", "medsam_vit_b", "--checkpoint", "w.pth"),
         ["w.pth", "--allow-unverified"], setup=write_bytes("w.pth", b"not really a checkpoint"), model=True,
         forbid=["Traceback", "allow_unverified=True", "expected_sha256="]),
    Case("checkpoint-garbage", "checkpoint", seg("--model", "sam_vit_b", "--checkpoint", "w.pth", "--allow-unverified"),
         ["w.pth", "corrupt"], setup=write_bytes("w.pth", b"\x80\x02garbage" * 10), model=True,
         forbid=["Traceback", "weights_only"]),
]


def _ids(cases):
    return [c.id for c in cases]


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_bad_input_fails_early_and_changes_nothing(case: Case, template, tmp_path, monkeypatch, request):
    d = tmp_path / "case"
    shutil.copytree(template, d, symlinks=True)
    if case.setup is not None:
        case.setup(d)
    before = snapshot(d)
    monkeypatch.chdir(d)
    loads = request.getfixturevalue("tripwires") if not case.model else []
    t0 = time.perf_counter()
    code, out, err = run_cli(case.argv)
    seconds = time.perf_counter() - t0
    assert code == case.code, f"exit {code}, stderr: {err[-2000:]}"
    for text in case.expect:
        assert text.lower() in err.lower(), f"{text!r} not in the message: {err[-2000:]}"
    for text in case.forbid:
        assert text not in err, f"{text!r} in the message: {err[-2000:]}"
    assert not loads, "the model was loaded before the bad input was found"
    assert snapshot(d) == before, "a pre-existing file changed, or a file was left behind"
    assert not (d / "PWNED").exists(), "a checkpoint ran code"
    if not case.model:
        assert seconds < EARLY_SECONDS, f"took {seconds:.1f} s to reject"


def test_the_suite_is_large_and_covers_every_kind():
    kinds = {c.kind for c in CASES}
    assert len(CASES) >= 80 and len(set(_ids(CASES))) == len(CASES)
    assert kinds >= {"alias", "output", "volume", "prompts", "corrections", "options", "adapter", "detect", "tune",
                     "checkpoint"}


# ----------------------------------------------------------------------------- disk: full disks and failed renames

def _fake_result(monkeypatch, template):
    """Skip the model: cli's session is a stand-in and api.segment / chain.detect_and_segment return a
    fixed mask (these cases are about writing)."""
    from MedFMSegmentLib import chain

    array, _ = io.read_volume(template / "vol.nrrd")
    mask = np.zeros(array.shape, np.uint8)
    mask[30:36, 30:50, 20:45] = 1
    stand_in = types.SimpleNamespace(runtime_info={"runtime": "stand-in"})  # the reports read it
    monkeypatch.setattr(cli, "_session", lambda args: stand_in)
    monkeypatch.setattr(api, "segment", lambda *a, **k: {"Thalamus_L": mask})
    monkeypatch.setattr(chain, "detect_and_segment", lambda *a, **k: ({"bright": mask}, {"labels": ["bright"]}))
    return mask


def _short_writer(monkeypatch, suffix: str, keep: float):
    """SimpleITK's writer as on a full disk: writes, says nothing, leaves ``keep`` of the bytes
    (the NIfTI writer only prints 'NWAD: wrote only N of M bytes')."""
    real = sitk.WriteImage
    hits = []

    def write(image, name, *args, **kwargs):
        real(image, name, *args, **kwargs)
        if str(name).endswith(suffix):
            hits.append(name)
            data = Path(name).read_bytes()
            Path(name).write_bytes(data[: int(len(data) * keep)])

    monkeypatch.setattr(sitk, "WriteImage", write)
    return hits


DISK_CASES = [
    # (id, argv, the file that cannot be written, writer suffix, bytes kept)
    ("seg-cut", seg("--overwrite", output="prev.seg.nrrd"), "prev.seg.nrrd", ".nrrd", 0.5),
    ("seg-empty", seg("--overwrite", output="prev.seg.nrrd"), "prev.seg.nrrd", ".nrrd", 0.0),
    ("labelmap-gz-cut-keeps-seg", seg("--overwrite", "--labelmap", "prev.nii.gz", output="prev.seg.nrrd"),
     "prev.nii.gz", ".nii.gz", 0.6),
    ("labelmap-nii-cut-new-outputs", seg("--labelmap", "new.nii", output="new.seg.nrrd"), "new.nii", ".nii", 0.7),
    ("labelmap-nii-zero-tail", seg("--labelmap", "new.nii", output="new.seg.nrrd"), "new.nii", ".nii", 0.99),
    ("detect-labelmap-cut", det("--overwrite", "--labelmap", "prev.nii.gz", output="prev.seg.nrrd"),
     "prev.nii.gz", ".nii.gz", 0.5),
    ("detect-new-labelmap-cut", det("--labelmap", "n.nii", output="n.seg.nrrd"), "n.nii", ".nii", 0.5),
]


@pytest.mark.parametrize("case", DISK_CASES, ids=[c[0] for c in DISK_CASES])
def test_full_disk_keeps_previous_outputs(case, template, tmp_path, monkeypatch):
    """A writer that silently writes too few bytes: exit 2 naming the file and the free space; no
    output of the command changes (all or nothing), no temporary file is left."""
    _, argv, bad, suffix, keep = case
    d = tmp_path / "case"
    shutil.copytree(template, d)
    _fake_result(monkeypatch, template)
    hits = _short_writer(monkeypatch, suffix, keep)
    before = snapshot(d)
    monkeypatch.chdir(d)
    code, _, err = run_cli(argv)
    assert hits, "the fake writer was not used"
    assert code == 2, err
    assert bad in err and "free on" in err and "does not read back" in err, err
    assert "Traceback" not in err
    assert snapshot(d) == before


def test_rename_failing_midway_removes_what_it_created(template, tmp_path, monkeypatch):
    """The second of three renames fails: the first output (new) is removed again, nothing else changes."""
    d = tmp_path / "case"
    shutil.copytree(template, d)
    _fake_result(monkeypatch, template)
    real, calls = os.replace, []

    def replace(src, dst, *a, **k):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error (simulated)", str(src), None, str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    before = snapshot(d)
    monkeypatch.chdir(d)
    code, _, err = run_cli(seg("--labelmap", "n.nii.gz", "--overlay", "n.png", output="n.seg.nrrd"))
    assert code == 2 and "n.nii.gz" in err and "Input/output error" in err, err
    assert len(calls) == 2 and snapshot(d) == before


def test_a_bug_is_a_clear_exit_not_a_traceback(template, tmp_path, monkeypatch):
    d = tmp_path / "case"
    shutil.copytree(template, d)

    def boom(*a, **k):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(io, "read_volume", boom)
    before = snapshot(d)
    monkeypatch.chdir(d)
    code, _, err = run_cli(seg())
    assert code == 3 and "internal error (ZeroDivisionError: simulated bug)" in err and "Traceback" not in err
    assert snapshot(d) == before


@contextlib.contextmanager
def tmpfs(folder: Path, size: str, readonly: bool = False):
    """A small tmpfs at ``folder`` (root only); skips the test when mounting is not permitted."""
    folder.mkdir()
    opts = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): the fake-writer cases "
                    f"cover the full disk instead")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.parametrize("outputs", [("--labelmap", "out.nii"), ("--overlay", "out.png"), ("--labelmap", "out.nii.gz")])
def test_real_full_disk_tmpfs(outputs, template, tmp_path, monkeypatch):
    """A 200 kB tmpfs filled to a few kB: the command fails with exit 2 naming the output and the
    free space; the previous files on that disk are byte-identical and nothing else is left there."""
    d = tmp_path / "case"
    shutil.copytree(template, d)
    _fake_result(monkeypatch, template)
    with tmpfs(tmp_path / "disk", "200k") as disk:
        (disk / "previous.seg.nrrd").write_bytes((template / "prev.seg.nrrd").read_bytes())
        with open(disk / "filler", "wb") as fh:  # leave ~6 kB free
            free = shutil.disk_usage(disk).free
            fh.write(b"\0" * max(free - 6 * 1024, 0))
        before = snapshot(disk)
        monkeypatch.chdir(d)
        code, _, err = run_cli(seg(outputs[0], str(disk / outputs[1]), "--overwrite",
                                   output=str(disk / "previous.seg.nrrd")))
        assert code == 2, err
        assert str(disk) in err and ("free on" in err or "No space left" in err), err
        assert "Traceback" not in err
        assert snapshot(disk) == before


def test_read_only_output_folder_is_refused_before_the_model(template, tmp_path, monkeypatch, tripwires):
    d = tmp_path / "case"
    shutil.copytree(template, d)
    with tmpfs(tmp_path / "ro", "100k", readonly=True) as ro:
        monkeypatch.chdir(d)
        code, _, err = run_cli(seg(output=str(ro / "o.seg.nrrd")))
        assert code == 2 and "cannot write in the output folder" in err and str(ro) in err, err
        assert not tripwires


# ----------------------------------------------------------------------------- as a user runs it: a real process

def _medfm(args, cwd, env=None, timeout=120):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "MedFMSegmentLib.cli", *args], cwd=cwd, capture_output=True,
                       text=True, timeout=timeout, env=dict(os.environ, PYTHONPATH=PYTHONPATH, **(env or {})))
    return r, time.perf_counter() - t0


@pytest.mark.parametrize("argv,expect", [
    (seg(output="out.nii.gz"), "--output out.nii.gz"),
    (seg("--labelmap", "vol.nrrd", "--overwrite"), "same file"),
    (seg(prompts="p.json", output="o.seg.nrrd"), "nested too deeply"),
    (SEG[:-1] + ["meta"] + ["-q"], "--device 'meta'"),
])
def test_subprocess_errors_are_one_clear_line(argv, expect, template, tmp_path):
    """Through a real process: exit 2, one message, no traceback, no timm FutureWarning, quickly
    (errors found before torch is imported take well under 3 s; the time is printed)."""
    d = tmp_path / "case"
    shutil.copytree(template, d)
    (d / "p.json").write_text("[" * 100_000 + "]" * 100_000)
    before = snapshot(d)
    r, seconds = _medfm(argv, d)
    print(f"{' '.join(argv[:8])}: exit {r.returncode} in {seconds:.2f} s")
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr and "Traceback" not in r.stderr and "FutureWarning" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert snapshot(d) == before
    if "--device" not in argv:  # no torch import on these paths
        assert seconds < 3 * EARLY_SECONDS, f"{seconds:.1f} s"


# ----------------------------------------------------------------------------- kill anywhere

_FAKE_SEGMENT = """
import sys
import numpy as np
from MedFMSegmentLib import api, cli, io
array, _ = io.read_volume("vol.nrrd")
mask = np.zeros(array.shape, np.uint8)
mask[30:36, 30:50, 20:45] = 1
cli._session = lambda args: object()
api.segment = lambda *a, **k: {"Thalamus_L": mask}
sys.exit(cli.main(sys.argv[1:]))
"""

KILL_POINTS = ["temp-written", "before-rename", "renamed"]


def _outputs_complete_or_previous(d: Path, before: dict, names):
    for name in names:
        p = d / name
        if not p.exists():
            assert name not in before, f"{name}: the previous file vanished"
            continue
        if name in before and snapshot(d).get(name) == before[name]:
            continue  # the previous file, intact
        if name.endswith(".png"):
            assert p.read_bytes().startswith(b"\x89PNG")
        elif name.endswith(".seg.nrrd"):
            assert io.read_segmentation(p)[0]["Thalamus_L"].sum() > 0
        else:
            assert io.truncation_problem(p) is None and io.read_volume(p)[0].max() == 1


@pytest.mark.parametrize("point", KILL_POINTS)
@pytest.mark.parametrize("overwrite", [pytest.param(False, marks=pytest.mark.slow), True], ids=["new", "overwrite"])
def test_kill_segment_anywhere(point, overwrite, template, tmp_path):
    """SIGKILL at each write step (temp file written, before / after a rename): every output is the
    previous file, complete, or absent; the other files are untouched; a rerun completes."""
    d = tmp_path / "case"
    shutil.copytree(template, d)
    (d / "fake.py").write_text(_FAKE_SEGMENT)
    names = (["prev.seg.nrrd", "prev.nii.gz", "prev.png"] if overwrite else ["n.seg.nrrd", "n.nii.gz", "n.png"])
    argv = ["segment", "vol.nrrd", "--prompts", "prompts.json", "--output", names[0], "--labelmap", names[1],
            "--overlay", names[2], "-q"] + (["--overwrite"] if overwrite else [])
    before = snapshot(d)
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, MEDFM_FAULT_KILL_AT=point)
    r = subprocess.run([sys.executable, "fake.py", *argv], cwd=d, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, (r.returncode, r.stderr)
    _outputs_complete_or_previous(d, before, names)
    for name, digest in before.items():
        if name not in names:
            assert snapshot(d)[name] == digest, name
    env.pop("MEDFM_FAULT_KILL_AT")
    r = subprocess.run([sys.executable, "fake.py", *argv, "--overwrite"], cwd=d, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    _outputs_complete_or_previous(d, {}, names)
    left = [p.name for p in d.iterdir() if p.name.startswith(".")]
    assert all(n.endswith((".tmp.nrrd", ".tmp.nii.gz", ".tmp")) for n in left)  # only a killed run's temp files


_SAVE_ADAPTER = """
import sys
sys.path.insert(0, sys.argv[2])
from test_abuse import _write_adapter
import torch
from pathlib import Path
from MedFMTrainLib import store
store.save_adapter  # the save below replaces the adapter with other weights
folder = Path(sys.argv[1])
import test_abuse
from MedFMTrainLib.adapters import LoraSettings, OrganAdapter
from MedFMSegmentLib import models
settings = LoraSettings(2, 4.0, "decoder")
tensors = {"transformer.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 256)}
manifest = {"base_model": {"id": "litemedsam", "sha256": models.LITEMEDSAM_SHA256}, "lora": settings.to_dict(),
            "metrics": {"new": 1}}
store.save_adapter(OrganAdapter("Thalamus_L", "litemedsam", models.LITEMEDSAM_SHA256, settings, tensors,
                                manifest=manifest), folder, overwrite=True)
"""


@pytest.mark.parametrize("point", [pytest.param("adapter-written", marks=pytest.mark.slow), "adapter-moved-aside",
                                   pytest.param("adapter-renamed", marks=pytest.mark.slow)])
def test_kill_adapter_save_anywhere(point, template, tmp_path):
    """SIGKILL inside ``save_adapter`` (what ``medfm tune`` does last): the old or the new adapter loads."""
    from MedFMTrainLib import store

    d = tmp_path / "case"
    shutil.copytree(template, d)
    old = store.load_adapter(d / "adapter")
    script = d / "save.py"
    script.write_text(_SAVE_ADAPTER)
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, MEDFM_FAULT_KILL_AT=point)
    r = subprocess.run([sys.executable, str(script), str(d / "adapter"), str(Path(__file__).parent)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    loaded = store.load_adapter(d / "adapter")  # recovers a kill between the renames
    assert loaded.digest == old.digest or loaded.manifest["metrics"] == {"new": 1}
    if point == "adapter-moved-aside":
        assert loaded.digest == old.digest  # the previous one, renamed back
    env.pop("MEDFM_FAULT_KILL_AT")
    r = subprocess.run([sys.executable, str(script), str(d / "adapter"), str(Path(__file__).parent)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert store.load_adapter(d / "adapter").manifest["metrics"] == {"new": 1}
    assert [p.name for p in d.iterdir() if p.name.startswith(".adapter")] == []  # dead saves cleaned up


def test_adapter_swap_interrupted_between_renames_in_process(template, tmp_path, monkeypatch):
    """os.rename fails after moving the old adapter aside and while putting it back: load still works."""
    from MedFMTrainLib import store

    d = tmp_path / "case"
    shutil.copytree(template, d)
    old = store.load_adapter(d / "adapter")
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) >= 2:
            raise OSError(errno.EIO, "simulated crash", str(src))
        return real(src, dst)

    import torch

    adapter = store.load_adapter(d / "adapter")
    monkeypatch.setattr(os, "rename", rename)
    adapter.tensors = {k: torch.ones_like(v) for k, v in adapter.tensors.items()}
    with pytest.raises(OSError):
        store.save_adapter(adapter, d / "adapter", overwrite=True)
    monkeypatch.setattr(os, "rename", real)
    assert not (d / "adapter").exists()  # the window: only .adapter.old-* is left ...
    assert store.load_adapter(d / "adapter").digest == old.digest  # ... and it loads (recovered)
