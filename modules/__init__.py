"""LightningModules and the plain networks they train."""

from plugguide.modules.classifier import TimmClassifier, load_classifier
from plugguide.modules.classifier_pretraining import ClassifierPretraining
from plugguide.modules.diffusion_pretraining import DiffusionPretraining
from plugguide.modules.guided_sampling import GuidedSampling
from plugguide.modules.expert_distillation import ExpertDistillation
from plugguide.modules.multi_expert_classifier import MultiExpertClassifier
from plugguide.modules.calibration_evaluation import CalibrationEvaluation
from plugguide.modules.guides import FullGuide, TinyGuide, load_guide
from plugguide.modules.guide_distillation import GuideDistillation
from plugguide.modules.progressive_halving import ProgressiveHalving


__all__ = ["FullGuide", "GuideDistillation", "ProgressiveHalving", "TinyGuide", "load_guide", "CalibrationEvaluation", "ExpertDistillation", "MultiExpertClassifier", "GuidedSampling", "ClassifierPretraining", "DiffusionPretraining", "TimmClassifier", "load_classifier"]
