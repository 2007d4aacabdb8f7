"""Callbacks: everything that only observes training (grids, target-map grids, calibration curves, export, the non-finite guard)."""

from plugguide.callbacks.calibration_curve import CalibrationCurve
from plugguide.callbacks.export import ExportPretrained
from plugguide.callbacks.guide_grid import GuideSampleGrid
from plugguide.callbacks.non_finite_guard import NonFiniteGuard
from plugguide.callbacks.sample_grid import GuidedSampleGrid
from plugguide.callbacks.sample_writer import SampleWriter
from plugguide.callbacks.target_map_grid import TargetMapGrid

__all__ = [
    "GuideSampleGrid",
    "CalibrationCurve",
    "SampleWriter",
    "ExportPretrained",
    "GuidedSampleGrid",
    "NonFiniteGuard",
    "TargetMapGrid",
]
