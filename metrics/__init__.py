"""The one place that turns samples and predictions into numbers: guided accuracy, FID, IS, ECE."""

from plugguide.metrics.calibration import accuracy, expected_calibration_error
from plugguide.metrics.generation import EvaluatorFeatures, GenerationMetrics

__all__ = ["EvaluatorFeatures", "GenerationMetrics", "accuracy", "expected_calibration_error"]
