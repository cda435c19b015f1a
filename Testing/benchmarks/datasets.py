"""The shared real data (../shared/data) as benchmark structures: volumes, ground-truth masks, slices.

Used by the benchmarks and the data tests; nothing here is copied into the repository.
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
for _lib in (REPO / "MedFMSegment", REPO / "MedFMTrain"):
    if str(_lib) not in sys.path:
        sys.path.insert(0, str(_lib))

# Dice, the inscribed-ellipse baseline and the padded prompt box: the engine's own evaluation helpers
from MedFMTrainLib.evaluate import dice, ellipse_in_box, padded_box  # noqa: E402,F401
DATA = Path(os.environ.get("MEDFM_SHARED_DATA", REPO.parent / "shared" / "data"))

# AAL label values (aal.nii.txt); cerebellum = every Cerebelum_*_{L,R} label
AAL = {"Thalamus_L": [77], "Thalamus_R": [78], "Putamen_L": [73], "Putamen_R": [74],
       "Caudate_L": [71], "Caudate_R": [72], "Pallidum_L": [75], "Pallidum_R": [76],
       "Hippocampus_L": [37], "Hippocampus_R": [38], "Amygdala_L": [41], "Amygdala_R": [42],
       "Cerebellum_L": list(range(91, 109, 2)), "Cerebellum_R": list(range(92, 109, 2))}
DEEP_GREY = [n for n in AAL if not n.startswith("Cerebellum")]

# The four datasets of the shared data, by volume key: (dataset name, modality). Leave-one-dataset-out
# evaluations hold out one of these at a time.
DATASETS = {"mri": ("colin27", "mr"), "ct": ("head_ct", "ct"), "chest_ct": ("chest_ct", "ct"),
            "tumour_mr": ("tumour_mr", "mr")}
# Descending thoracic aorta (one tube on every axial slice): the 3D benchmark's aorta slab
AORTA_SLAB = (20, 49)
# 20 axial slices of the head CT's whole head (the 3D benchmarks' head CT object; ROI and propagation stay in it)
HEAD_SLAB = (44, 63)


def available() -> bool:
    return (DATA / "colin27" / "ch2.nii.gz").is_file() and (DATA / "cranium_ct" / "cranium_ct.nrrd").is_file()


def read(path) -> Tuple[np.ndarray, np.ndarray]:
    """(array_kji, ijk_to_ras) via SimpleITK, independent of the engine's own reader."""
    img = sitk.ReadImage(str(path))
    d = np.array(img.GetDirection()).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d * np.array(img.GetSpacing())[None, :]
    m[:3, 3] = img.GetOrigin()
    m = np.diag([-1.0, -1.0, 1.0, 1.0]) @ m  # LPS -> RAS
    return sitk.GetArrayFromImage(img), m


@dataclass
class Structure:
    name: str
    volume: str  # a key of DATASETS: "mri", "ct", "chest_ct", "tumour_mr"
    mask: np.ndarray  # uint8 [k, j, i]
    axes: Tuple[str, ...] = ("axial", "coronal", "sagittal")
    slab: Optional[Tuple[int, int]] = None  # a slab of a larger object: 3D benchmarks stay on these axial slices

    @property
    def dataset(self) -> str:
        return DATASETS[self.volume][0]

    @property
    def modality(self) -> str:
        return DATASETS[self.volume][1]


@functools.lru_cache(maxsize=None)
def volumes() -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    return {"mri": read(DATA / "colin27" / "ch2.nii.gz"), "ct": read(DATA / "cranium_ct" / "cranium_ct.nrrd"),
            "chest_ct": read(DATA / "chest_ct" / "chest_ct.nii.gz"),
            "tumour_mr": read(DATA / "brain_tumour_mr" / "brain1_image.nrrd")}


def _intracranial(bone: np.ndarray) -> np.ndarray:
    """Inside of the skull ring, axial slice by slice: hole-filled bone minus bone, largest component."""
    out = np.zeros_like(bone)
    for k in range(bone.shape[0]):
        sl = sitk.GetImageFromArray(bone[k])
        filled = sitk.GetArrayFromImage(sitk.BinaryFillhole(sl))
        inner = (filled > 0) & (bone[k] == 0)
        if inner.sum() < 200:
            continue
        lab = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(inner.astype(np.uint8)))))
        out[k] = lab == 1
    return out


@functools.lru_cache(maxsize=None)
def structures() -> Dict[str, Structure]:
    aal, _ = read(DATA / "colin27" / "aal.nii.gz")
    brain, _ = read(DATA / "colin27" / "ch2bet.nii.gz")
    out = {name: Structure(name, "mri", np.isin(aal, labels).astype(np.uint8)) for name, labels in AAL.items()}
    out["Brain"] = Structure("Brain", "mri", (brain > 0).astype(np.uint8))
    head, _ = read(DATA / "cranium_ct" / "cranium_head_thr-142.nrrd")
    bone, _ = read(DATA / "cranium_ct" / "cranium_bone_thr226.nrrd")
    out["CT_head"] = Structure("CT_head", "ct", (head > 0).astype(np.uint8))
    out["CT_skull"] = Structure("CT_skull", "ct", (bone > 0).astype(np.uint8))
    head_slab = np.zeros_like(out["CT_head"].mask)
    head_slab[HEAD_SLAB[0]:HEAD_SLAB[1] + 1] = out["CT_head"].mask[HEAD_SLAB[0]:HEAD_SLAB[1] + 1]
    out["CT_head_slab"] = Structure("CT_head_slab", "ct", head_slab, axes=("axial",), slab=HEAD_SLAB)
    out["CT_intracranial"] = Structure("CT_intracranial", "ct", _intracranial((bone > 0).astype(np.uint8)),
                                       axes=("axial",))
    aorta = (read(DATA / "chest_ct" / "aorta.nii.gz")[0] > 0).astype(np.uint8)
    out["Aorta"] = Structure("Aorta", "chest_ct", aorta)
    slab = np.zeros_like(aorta)
    slab[AORTA_SLAB[0]:AORTA_SLAB[1] + 1] = aorta[AORTA_SLAB[0]:AORTA_SLAB[1] + 1]
    out["Aorta_descending"] = Structure("Aorta_descending", "chest_ct", slab, axes=("axial",))
    out["T12"] = Structure("T12", "chest_ct", (read(DATA / "chest_ct" / "vertebrae_T12.nii.gz")[0] > 0).astype(np.uint8))
    out["Tumour"] = Structure("Tumour", "tumour_mr",
                              (read(DATA / "brain_tumour_mr" / "brain1_label.nrrd")[0] > 0).astype(np.uint8))
    return out


def sample_slices(mask: np.ndarray, axis: str, n: int = 5, min_area: int = 20) -> List[int]:
    """n slices evenly spread over the central 60% of the slices where the structure has min_area."""
    a = {"axial": 0, "coronal": 1, "sagittal": 2}[axis]
    area = mask.sum(axis=tuple(x for x in range(3) if x != a))
    idx = np.nonzero(area >= min_area)[0]
    if idx.size == 0:
        return []
    picks = np.quantile(idx, np.linspace(0.2, 0.8, n)).round().astype(int)
    return sorted({int(idx[np.argmin(np.abs(idx - p))]) for p in picks})


def ellipsoid_in_box(shape, lo_kji, hi_kji) -> np.ndarray:
    c = [(a + b) / 2 for a, b in zip(lo_kji, hi_kji)]
    r = [(b - a + 1) / 2 for a, b in zip(lo_kji, hi_kji)]
    kk, jj, ii = np.ogrid[:shape[0], :shape[1], :shape[2]]
    return ((((kk - c[0]) / r[0]) ** 2 + ((jj - c[1]) / r[1]) ** 2 + ((ii - c[2]) / r[2]) ** 2) <= 1).astype(np.uint8)


def prompt_box(mask2d: np.ndarray, spacing_yx, pad_px: int = 5, pad_mm: float = 5.0):
    """The benchmark's box prompt: the tight box + ``pad_px`` pixels, at most ``pad_mm`` (at least 1 px)
    along each slice axis, so thick-slice rows (6.5 mm) are not padded by 3 cm."""
    x0, y0, x1, y1 = padded_box(mask2d, 0)
    h, w = mask2d.shape
    py, px = (max(1, min(pad_px, int(round(pad_mm / s)))) for s in spacing_yx)
    return max(x0 - px, 0), max(y0 - py, 0), min(x1 + px, w - 1), min(y1 + py, h - 1)
