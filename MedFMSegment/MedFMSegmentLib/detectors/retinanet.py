"""A MONAI RetinaNet detector (:class:`MonaiRetinaNetDetector`, spec ``monai:PATH[:device=DEV]``).

Configuration, network build, weights loading, and the model frame (reorientation, resampling and
back-mapping of the predicted boxes). torch and monai are imported only when a model is used.

Files
  A bundle folder holds ``configs/detector.json`` and ``models/model.pt`` (a state dict of the
  ``RetinaNet`` network, loaded with ``torch.load(weights_only=True)``) or ``models/model.ts``
  (TorchScript). A TorchScript file may also be given directly, with its configuration in a
  sidecar ``<file>.json`` (or ``<file without suffix>.json``). The configuration is plain JSON,
  never evaluated; key names follow MONAI's detection tutorial (defaults: its LUNA16 model)::

      {
        "labels": {"0": "nodule"},              # class index -> name (required; or a list)
        "backbone": {"block": "bottleneck", "layers": [3, 4, 6, 3],
                     "block_inplanes": [64, 128, 256, 512],
                     "conv1_t_size": [7, 7, 7], "conv1_t_stride": [2, 2, 1]},
        "returned_layers": [1, 2],
        "base_anchor_shapes": [[6, 8, 4], [8, 6, 5], [10, 10, 6]],
        "feature_map_scales": [1, 2, 4],        # default 2**n for each FPN level
        "size_divisible": [16, 16, 8],          # default derived from the backbone
        "orientation": "RAS",                   # model array axes: "RAS" (MONAI Orientationd) or "IJK"
        "spacing": [0.703125, 0.703125, 1.25],  # model voxel size in mm, null = native
        "intensity": {"a_min": -1024, "a_max": 300, "b_min": 0, "b_max": 1, "clip": true},
                                                # null = min-max scaling to 0..1
        "score_thresh": 0.02, "nms_thresh": 0.22, "detections_per_img": 300,
        "topk_candidates_per_level": 1000,
        "infer_patch_size": null                # e.g. [512, 512, 192]: sliding-window inference
      }

  Predicted boxes are MONAI ``StandardMode`` boxes in the model array frame, ``[min, max + 1)``
  voxel edges as :func:`monai.apps.detection.transforms.box_ops.convert_mask_to_box` makes them;
  they are mapped back through the resampling and reorientation to voxel indices of the input.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .. import geometry
from ..errors import InputError, ModelError
from .base import BoxIJK, Detection, DetectorKind, PathLike, _checked_matrix, _voxels_inside

log = logging.getLogger(__name__)


_DEFAULT_CONFIG: Dict[str, Any] = {
    "spatial_dims": 3,
    "n_input_channels": 1,
    "backbone": {"block": "bottleneck", "layers": [3, 4, 6, 3], "block_inplanes": [64, 128, 256, 512],
                 "conv1_t_size": [7, 7, 7], "conv1_t_stride": [2, 2, 1]},
    "returned_layers": [1, 2],
    "base_anchor_shapes": [[6, 8, 4], [8, 6, 5], [10, 10, 6]],
    "feature_map_scales": None,
    "size_divisible": None,
    "orientation": "RAS",
    "spacing": None,
    "intensity": None,
    "score_thresh": 0.02,
    "nms_thresh": 0.22,
    "detections_per_img": 300,
    "topk_candidates_per_level": 1000,
    "infer_patch_size": None,
    "sw_overlap": 0.25,
}


def _config_error(source, message: str) -> ModelError:
    return ModelError(f"{source}: {message}")


def load_retinanet_config(path: PathLike) -> Dict[str, Any]:
    """Read and validate a RetinaNet detector configuration (plain JSON, see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: detector configuration not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read the detector configuration: {exc}") from None
    return check_retinanet_config(raw, path)


def _int_list(value, length: Optional[int], key: str, source) -> List[int]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and length is not None:
        value = [value] * length
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        raise _config_error(source, f"{key!r} must be a list of {length or 'some'} integers, got {value!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) == int(v) for v in value):
        raise _config_error(source, f"{key!r} must hold integers, got {value!r}")
    return [int(v) for v in value]


def _positive_list(value, length: int, key: str, source) -> List[float]:
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise _config_error(source, f"{key!r} must be a list of {length} numbers, got {value!r}")
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        raise _config_error(source, f"{key!r} must hold numbers, got {value!r}") from None
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise _config_error(source, f"{key!r} must hold positive numbers, got {value!r}")
    return out


def _config_labels(raw, source) -> Dict[int, str]:
    labels = raw.get("labels")
    if labels is None:
        raise _config_error(source, "missing 'labels' (class index -> name, e.g. {\"0\": \"nodule\"})")
    if isinstance(labels, list):
        labels = dict(enumerate(labels))
    if not isinstance(labels, Mapping) or not labels:
        raise _config_error(source, f"'labels' must be a non-empty object or list, got {labels!r}")
    out = {}
    for key, name in labels.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise _config_error(source, f"'labels' key {key!r} is not a class index") from None
        if not isinstance(name, str) or not name.strip():
            raise _config_error(source, f"'labels' entry {key!r} has an empty or non-string name {name!r}")
        out[index] = name.strip()
    return out


def check_retinanet_config(raw: Mapping[str, Any], source: Any = "detector configuration") -> Dict[str, Any]:
    """Fill defaults into a RetinaNet configuration and validate it; raises :class:`ModelError`."""
    if not isinstance(raw, Mapping):
        raise _config_error(source, "the configuration must be a JSON object")
    unknown = sorted(set(raw) - set(_DEFAULT_CONFIG) - {"labels", "num_classes", "conv1_t_stride"})
    if unknown:
        log.warning("%s: ignoring unknown configuration key(s) %s", source, ", ".join(unknown))
    cfg = {k: raw.get(k, v) for k, v in _DEFAULT_CONFIG.items()}
    cfg["backbone"] = {**_DEFAULT_CONFIG["backbone"], **dict(raw.get("backbone") or {})}
    if "conv1_t_stride" in raw and "conv1_t_stride" not in (raw.get("backbone") or {}):
        cfg["backbone"]["conv1_t_stride"] = raw["conv1_t_stride"]
    labels = _config_labels(raw, source)
    num_classes = int(raw.get("num_classes", len(labels)))
    if sorted(labels) != list(range(num_classes)):
        raise _config_error(source, f"'labels' must name every class 0..{num_classes - 1}, got indices "
                                    f"{sorted(labels)}")
    cfg["labels"], cfg["num_classes"] = labels, num_classes
    if cfg["spatial_dims"] != 3:
        raise _config_error(source, f"only 3D detectors are supported, got spatial_dims {cfg['spatial_dims']!r}")
    if cfg["n_input_channels"] != 1:
        raise _config_error(source, f"only single-channel images are supported, got n_input_channels "
                                    f"{cfg['n_input_channels']!r}")
    bb = cfg["backbone"]
    if bb["block"] not in ("basic", "bottleneck"):
        raise _config_error(source, f"backbone 'block' must be 'basic' or 'bottleneck', got {bb['block']!r}")
    bb["layers"] = _int_list(bb["layers"], 4, "backbone.layers", source)
    bb["block_inplanes"] = _int_list(bb["block_inplanes"], 4, "backbone.block_inplanes", source)
    bb["conv1_t_size"] = _int_list(bb["conv1_t_size"], 3, "backbone.conv1_t_size", source)
    bb["conv1_t_stride"] = _int_list(bb["conv1_t_stride"], 3, "backbone.conv1_t_stride", source)
    layers = _int_list(cfg["returned_layers"], None, "returned_layers", source)
    if not layers or min(layers) < 1 or max(layers) > 4:
        raise _config_error(source, f"'returned_layers' must be in 1..4, got {layers}")
    cfg["returned_layers"] = layers
    shapes = cfg["base_anchor_shapes"]
    if not isinstance(shapes, (list, tuple)) or not shapes:
        raise _config_error(source, f"'base_anchor_shapes' must be a list of [w, h, d], got {shapes!r}")
    cfg["base_anchor_shapes"] = [_positive_list(s, 3, "base_anchor_shapes", source) for s in shapes]
    if cfg["feature_map_scales"] is None:
        cfg["feature_map_scales"] = [2 ** n for n in range(len(layers) + 1)]
    cfg["feature_map_scales"] = _positive_list(cfg["feature_map_scales"], len(layers) + 1,
                                               "feature_map_scales", source)
    if cfg["size_divisible"] is None:
        cfg["size_divisible"] = [2 * s * 2 ** max(layers) for s in bb["conv1_t_stride"]]
    cfg["size_divisible"] = _int_list(cfg["size_divisible"], 3, "size_divisible", source)
    if str(cfg["orientation"]).upper() not in ("RAS", "IJK"):
        raise _config_error(source, f"'orientation' must be 'RAS' or 'IJK', got {cfg['orientation']!r}")
    cfg["orientation"] = str(cfg["orientation"]).upper()
    if cfg["spacing"] is not None:
        cfg["spacing"] = _positive_list(cfg["spacing"], 3, "spacing", source)
    if cfg["infer_patch_size"] is not None:
        cfg["infer_patch_size"] = _int_list(cfg["infer_patch_size"], 3, "infer_patch_size", source)
    cfg["intensity"] = _check_intensity(cfg["intensity"], source)
    for key in ("score_thresh", "nms_thresh", "sw_overlap"):
        if not isinstance(cfg[key], (int, float)) or not 0 <= float(cfg[key]) <= 1:
            raise _config_error(source, f"{key!r} must be a number in 0..1, got {cfg[key]!r}")
    for key in ("detections_per_img", "topk_candidates_per_level"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise _config_error(source, f"{key!r} must be a positive integer, got {cfg[key]!r}")
    return cfg


def _check_intensity(value, source) -> Optional[Dict[str, Any]]:
    if value is None:
        return None
    if not isinstance(value, Mapping) or "a_min" not in value or "a_max" not in value:
        raise _config_error(source, f"'intensity' must be null or hold a_min and a_max, got {value!r}")
    out = {"a_min": value["a_min"], "a_max": value["a_max"], "b_min": value.get("b_min", 0.0),
           "b_max": value.get("b_max", 1.0)}
    try:
        out = {k: float(v) for k, v in out.items()}
    except (TypeError, ValueError):
        raise _config_error(source, f"'intensity' values must be numbers, got {value!r}") from None
    if not all(math.isfinite(v) for v in out.values()) or out["a_max"] <= out["a_min"]:
        raise _config_error(source, f"'intensity' needs finite values with a_max > a_min, got {value!r}")
    out["clip"] = bool(value.get("clip", True))
    return out


@dataclass(frozen=True)
class ModelFrame:
    """The model's array frame: the volume's IJK axes permuted/flipped to RAS and resampled.

    Model axis ``m`` (x, y, z of the network input) is IJK axis ``perm[m]``, reversed when
    ``flip[m]``; it has ``size[m]`` voxels, resampled from ``n_ijk[perm[m]]`` with
    ``torch.nn.functional.interpolate(align_corners=False)``, so in voxel *edge* coordinates a model
    position ``e`` is ``e * n / size`` voxels along the (possibly reversed) IJK axis.
    """

    perm: Tuple[int, int, int]
    flip: Tuple[bool, bool, bool]
    size: Tuple[int, int, int]
    n_ijk: Tuple[int, int, int]

    @classmethod
    def build(cls, shape_kji: Sequence[int], ijk_to_ras, orientation: str = "RAS",
              spacing_mm: Optional[Sequence[float]] = None) -> "ModelFrame":
        """Frame for a volume; ``orientation`` "RAS" (like MONAI's Orientationd) or "IJK" (as stored)."""
        matrix = _checked_matrix(ijk_to_ras)
        n_ijk = tuple(int(s) for s in shape_kji[::-1])
        if orientation == "RAS":
            direction = matrix[:3, :3] / geometry.spacing(matrix)
            perm = max(itertools.permutations(range(3)),
                       key=lambda p: sum(abs(direction[m, p[m]]) for m in range(3)))
            flip = tuple(bool(direction[m, perm[m]] < 0) for m in range(3))
        else:
            perm, flip = (0, 1, 2), (False, False, False)
        vox = geometry.spacing(matrix)
        size = []
        for m in range(3):
            n = n_ijk[perm[m]]
            if spacing_mm is None:
                size.append(n)
            else:
                size.append(max(1, int(round(n * vox[perm[m]] / float(spacing_mm[m])))))
        return cls(tuple(int(p) for p in perm), flip, tuple(size), n_ijk)

    def to_model(self, array_kji: np.ndarray) -> np.ndarray:
        """The volume as a float32 ``[x, y, z]`` array in the model frame (trilinear resampling)."""
        import torch
        import torch.nn.functional as F

        arr = np.asarray(array_kji, dtype=np.float32).transpose(2, 1, 0).transpose(self.perm)
        flips = [m for m in range(3) if self.flip[m]]
        if flips:
            arr = np.flip(arr, axis=flips)
        arr = np.ascontiguousarray(arr)
        if tuple(arr.shape) != self.size:
            t = torch.from_numpy(arr)[None, None]
            arr = F.interpolate(t, size=self.size, mode="trilinear", align_corners=False)[0, 0].numpy()
        return arr

    def box_to_ijk(self, box_model) -> BoxIJK:
        """A model-frame box ``(x0, y0, z0, x1, y1, z1)`` (voxel edges) -> inclusive IJK box."""
        b = np.asarray(box_model, dtype=np.float64).reshape(2, 3)
        lo_ijk, hi_ijk = np.zeros(3), np.zeros(3)
        for m in range(3):
            c = self.perm[m]
            n = self.n_ijk[c]
            scale = n / self.size[m]
            e0, e1 = sorted((b[0, m] * scale, b[1, m] * scale))
            if self.flip[m]:
                e0, e1 = n - e1, n - e0
            lo_ijk[c], hi_ijk[c] = e0 - 0.5, e1 - 0.5  # edges -> voxel-centre coordinates
        return _voxels_inside(lo_ijk, hi_ijk)


def _scale_intensity(arr: np.ndarray, intensity: Optional[Mapping[str, Any]]) -> np.ndarray:
    if intensity is None:
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    a0, a1, b0, b1 = (intensity[k] for k in ("a_min", "a_max", "b_min", "b_max"))
    out = (arr - a0) / (a1 - a0) * (b1 - b0) + b0
    if intensity["clip"]:
        out = np.clip(out, min(b0, b1), max(b0, b1))
    return out.astype(np.float32)


def build_retinanet(cfg: Mapping[str, Any], network=None):
    """A MONAI ``RetinaNetDetector`` for a validated config; ``network`` (e.g. TorchScript) or a new RetinaNet."""
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.apps.detection.networks.retinanet_network import RetinaNet, resnet_fpn_feature_extractor
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
    from monai.networks.nets import resnet

    if network is None:
        bb = cfg["backbone"]
        backbone = resnet.ResNet(block=bb["block"], layers=bb["layers"], block_inplanes=bb["block_inplanes"],
                                 spatial_dims=3, n_input_channels=cfg["n_input_channels"],
                                 conv1_t_size=bb["conv1_t_size"], conv1_t_stride=bb["conv1_t_stride"])
        extractor = resnet_fpn_feature_extractor(backbone, 3, False, cfg["returned_layers"], None)
        network = RetinaNet(spatial_dims=3, num_classes=cfg["num_classes"],
                            num_anchors=len(cfg["base_anchor_shapes"]), feature_extractor=extractor,
                            size_divisible=cfg["size_divisible"])
    anchors = AnchorGeneratorWithAnchorShape(feature_map_scales=cfg["feature_map_scales"],
                                             base_anchor_shapes=cfg["base_anchor_shapes"])
    detector = RetinaNetDetector(network, anchors, spatial_dims=3, num_classes=cfg["num_classes"],
                                 size_divisible=cfg["size_divisible"])
    detector.set_box_selector_parameters(score_thresh=float(cfg["score_thresh"]),
                                         topk_candidates_per_level=cfg["topk_candidates_per_level"],
                                         nms_thresh=float(cfg["nms_thresh"]),
                                         detections_per_img=cfg["detections_per_img"])
    if cfg["infer_patch_size"] is not None:
        detector.set_sliding_window_inferer(roi_size=cfg["infer_patch_size"], sw_batch_size=1,
                                            overlap=float(cfg["sw_overlap"]), mode="constant")
    return detector


def _state_dict(obj, path: Path) -> Dict[str, Any]:
    """The network state dict inside a checkpoint (plain, or under 'model'/'state_dict'/'network')."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "network"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ModelError(f"{path}: not a state dict of a RetinaNet network")
    keys = list(obj)
    if all(k.startswith("network.") for k in keys):
        obj = {k[len("network."):]: v for k, v in obj.items()}
    return dict(obj)


def _sidecar_config(path: Path) -> Path:
    for candidate in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if candidate.is_file():
            return candidate
    raise ModelError(f"{path}: no configuration found next to the TorchScript file "
                     f"(expected {path.name}.json or {path.with_suffix('.json').name})")


class MonaiRetinaNetDetector:
    """A MONAI RetinaNet detector from a local bundle folder or a TorchScript file.

    See the module docstring for the files and the configuration. The model is loaded when the
    detector is made (a missing or mismatching file raises :class:`ModelError`). ``detect``
    reorients/resamples/scales the volume as configured, runs the network on ``device`` and maps
    the boxes back to voxel indices; class indices are named by the configuration's ``labels``.
    """

    def __init__(self, path: PathLike, device: str = "cpu"):
        import torch

        self.path = Path(path)
        self.device = torch.device(device)
        if self.path.is_dir():
            config_path = self.path / "configs" / "detector.json"
            weights = self.path / "models" / "model.pt"
            script = self.path / "models" / "model.ts"
            self.config = load_retinanet_config(config_path)
            if weights.is_file():
                network = self._load_state_dict(weights)
            elif script.is_file():
                network = self._load_script(script)
            else:
                raise ModelError(f"{self.path}: bundle has neither models/model.pt nor models/model.ts")
        elif self.path.is_file():
            self.config = load_retinanet_config(_sidecar_config(self.path))
            network = self._load_script(self.path)
        else:
            raise ModelError(f"{self.path}: no such bundle folder or TorchScript file")
        self._detector = build_retinanet(self.config, network).to(self.device).eval()
        self.labels: Tuple[str, ...] = tuple(self.config["labels"][n] for n in range(self.config["num_classes"]))

    def _load_state_dict(self, weights: Path):
        import torch

        try:
            obj = torch.load(weights, map_location=self.device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad checkpoint
            raise ModelError(f"{weights}: cannot load the checkpoint: {exc}") from None
        detector = build_retinanet(self.config)
        try:
            missing, unexpected = detector.network.load_state_dict(_state_dict(obj, weights), strict=False)
        except RuntimeError as exc:  # tensor shape mismatches
            raise ModelError(f"{weights}: does not match the configured network: {exc}") from None
        if missing or unexpected:
            raise ModelError(f"{weights}: does not match the configured network "
                             f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                             f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
        return detector.network

    def _load_script(self, script: Path):
        import torch

        try:
            return torch.jit.load(str(script), map_location=self.device)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive
            raise ModelError(f"{script}: not a loadable TorchScript file: {exc}") from None

    def detect(self, array_kji: np.ndarray, ijk_to_ras) -> List[Detection]:
        """Detections (score, class name, IJK box) of the network on the volume."""
        import torch

        arr = np.asarray(array_kji)
        if arr.ndim != 3:
            raise InputError(f"the image must be a 3D [k, j, i] array, got shape {arr.shape}")
        frame = ModelFrame.build(arr.shape, ijk_to_ras, self.config["orientation"], self.config["spacing"])
        model_xyz = _scale_intensity(frame.to_model(arr), self.config["intensity"])
        image = torch.from_numpy(np.ascontiguousarray(model_xyz, dtype=np.float32))[None].to(self.device)
        use_inferer = self.config["infer_patch_size"] is not None
        with torch.no_grad():
            result = self._detector([image], use_inferer=use_inferer)[0]
        boxes = result[self._detector.target_box_key].detach().cpu().numpy()
        classes = result[self._detector.target_label_key].detach().cpu().numpy()
        scores = result[self._detector.pred_score_key].detach().float().cpu().numpy()
        out = [Detection(self.labels[int(c)], float(s), box_ijk=frame.box_to_ijk(b))
               for b, c, s in zip(boxes, classes, scores)]
        log.info("%s: %d detection(s) (model frame %s)", self.path, len(out), frame.size)
        return out


def _from_spec(path: str, options: Mapping[str, str], spec: str) -> MonaiRetinaNetDetector:
    return MonaiRetinaNetDetector(path, device=options.get("device") or "cpu")


KIND = DetectorKind("monai", _from_spec, (r"device=[\w:]+",), help="""\
  monai:PATH[:device=DEV]
      a MONAI RetinaNet: a bundle folder (configs/detector.json + models/model.pt or model.ts)
      or a TorchScript file with a sidecar PATH.json configuration.""")
