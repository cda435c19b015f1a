"""MedFMSegmentLib: the pure-Python engine of MedFM (numpy + torch, no Slicer, Qt or VTK).

Only ``MedFMSegmentLib.mrml`` talks to Slicer's MRML; every other module works on numpy arrays
indexed ``[k, j, i]`` plus a 4x4 IJK-to-RAS matrix.
"""
import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
