"""Recreate Resources/Sample/colin27_t1_deepgrey.nrrd from ../shared/data (provenance of the demo sample)."""
import sys
from pathlib import Path

import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import datasets as D  # noqa: E402

LO, HI = (43, 79, 47), (126, 165, 109)  # inclusive i, j, k bounds of the crop


def main():
    img = sitk.ReadImage(str(D.DATA / "colin27" / "ch2.nii.gz"))
    crop = img[LO[0]:HI[0] + 1, LO[1]:HI[1] + 1, LO[2]:HI[2] + 1]
    out = HERE.parents[1] / "Resources" / "Sample" / "colin27_t1_deepgrey.nrrd"
    sitk.WriteImage(crop, str(out), useCompression=True)
    print(out, crop.GetSize())


if __name__ == "__main__":
    main()
