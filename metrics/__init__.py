"""The one place that turns samples and predictions into numbers: guided accuracy, FID, IS, ECE curves, map IoU and error."""

from plugguide.metrics.calibration import (
    calibration_curve,
    calibration_timesteps,
    expected_calibration_error,
    read_curves_csv,
    write_curves_csv,
)
from plugguide.metrics.dense import DenseMapMetrics
from plugguide.metrics.feature_spaces import AutoencoderLatents, PooledPixels
from plugguide.metrics.figures import calibration_figure
from plugguide.metrics.generation import GenerationMetrics, frechet_distance, inception_score, kernel_distance
from plugguide.metrics.guided_scores import GuidedSampleScores
from plugguide.metrics.pixel_maps import digit_segmentation, distance_to_stroke, majority_digit, stroke_mask

__all__ = [
    "AutoencoderLatents",
    "DenseMapMetrics",
    "GenerationMetrics",
    "GuidedSampleScores",
    "PooledPixels",
    "calibration_curve",
    "calibration_figure",
    "calibration_timesteps",
    "expected_calibration_error",
    "digit_segmentation",
    "distance_to_stroke",
    "frechet_distance",
    "inception_score",
    "kernel_distance",
    "majority_digit",
    "read_curves_csv",
    "stroke_mask",
    "write_curves_csv",
]
