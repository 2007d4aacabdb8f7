"""Callbacks: everything that only observes training (grids, calibration curves, export)."""

from plugguide.callbacks.export import ExportPretrained
from plugguide.callbacks.sample_grid import GuidedSampleGrid
from plugguide.callbacks.sample_writer import SampleWriter
from plugguide.callbacks.calibration_curve import CalibrationCurve
from plugguide.callbacks.guide_grid import GuideSampleGrid


__all__ = ["GuideSampleGrid", "CalibrationCurve", "SampleWriter", "ExportPretrained", "GuidedSampleGrid"]
