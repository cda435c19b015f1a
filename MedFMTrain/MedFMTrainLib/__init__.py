"""MedFMTrainLib: few-shot tuning of organ adapters on top of MedFMSegmentLib (no Slicer imports)."""
import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
