"""Detector-to-SAM chaining, kept importable here: the code is in :mod:`MedFMSegmentLib.detectors.chaining`.

```python
from MedFMSegmentLib import chain, detectors
det = detectors.detector_from_spec("labelmap:atlas.nii.gz")
masks, report = chain.detect_and_segment(session, det, array_kji, ijk_to_ras)
```
"""
from .detectors.chaining import detect_and_segment

__all__ = ["detect_and_segment"]
