"""Guidance methods, one per file, on the small `Guidance` base class."""

from plugguide.pipelines.guidance.base import Guidance
from plugguide.pipelines.guidance.calibrated import CalibratedGuidance, replace_relu_with_softplus
from plugguide.pipelines.guidance.calibrated_edm import CalibratedEDMGuidance
from plugguide.pipelines.guidance.classifier import ClassifierGuidance
from plugguide.pipelines.guidance.distilled import DistilledGuidance
from plugguide.pipelines.guidance.naive_classifier import NaiveClassifierGuidance
from plugguide.pipelines.guidance.ppap_experts import ExpertGuidance
from plugguide.pipelines.guidance.predicted_x0_classifier import PredictedCleanImageGuidance
from plugguide.pipelines.guidance.training_free import TFG
from plugguide.pipelines.guidance.training_free_presets import DPS, LGD, MPGD, UGD, FreeDoM

__all__ = [
    "DPS",
    "FreeDoM",
    "LGD",
    "MPGD",
    "TFG",
    "UGD",
    "CalibratedEDMGuidance",
    "CalibratedGuidance",
    "replace_relu_with_softplus",
    "ExpertGuidance",
    "ClassifierGuidance",
    "DistilledGuidance",
    "Guidance",
    "NaiveClassifierGuidance",
    "PredictedCleanImageGuidance",
]
