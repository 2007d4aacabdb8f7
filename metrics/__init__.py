"""The one place that turns samples and predictions into numbers: guided accuracy, FID, IS, ECE curves."""

from plugguide.metrics.calibration import calibration_curve, calibration_timesteps, expected_calibration_error, read_curves_csv, write_curves_csv
from plugguide.metrics.figures import calibration_figure
from plugguide.metrics.feature_spaces import AutoencoderLatents, PooledPixels
from plugguide.metrics.generation import GenerationMetrics, frechet_distance, inception_score, kernel_distance

__all__ = [
    "AutoencoderLatents", "GenerationMetrics", "PooledPixels", "calibration_curve", "calibration_figure", "calibration_timesteps", "expected_calibration_error",
    "frechet_distance", "inception_score", "kernel_distance", "read_curves_csv", "write_curves_csv",
]
