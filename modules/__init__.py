"""LightningModules and the plain networks they train."""

from plugguide.modules.classifier import TimmClassifier, load_classifier
from plugguide.modules.classifier_pretraining import ClassifierPretraining
from plugguide.modules.diffusion_pretraining import DiffusionPretraining
from plugguide.modules.guided_sampling import GuidedSampling


__all__ = ["GuidedSampling", "ClassifierPretraining", "DiffusionPretraining", "TimmClassifier", "load_classifier"]
