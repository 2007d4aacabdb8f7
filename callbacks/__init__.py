"""Callbacks: everything that only observes training (grids, calibration curves, export)."""

from plugguide.callbacks.export import ExportPretrained
from plugguide.callbacks.sample_grid import GuidedSampleGrid
from plugguide.callbacks.sample_writer import SampleWriter


__all__ = ["SampleWriter", "ExportPretrained", "GuidedSampleGrid"]
