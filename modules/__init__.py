"""The top floor below the CLI: LightningModules, the training and evaluation jobs. Their networks live in `models/`."""

from plugguide.modules.autoencoder_pretraining import AutoencoderPretraining
from plugguide.modules.calibration_evaluation import CalibrationEvaluation
from plugguide.modules.classifier_pretraining import ClassifierPretraining
from plugguide.modules.dense_pretraining import DensePretraining
from plugguide.modules.diffusion_pretraining import DiffusionPretraining
from plugguide.modules.embedder_pretraining import EmbedderPretraining
from plugguide.modules.expert_distillation import ExpertDistillation
from plugguide.modules.guidance_distillation import GuidanceDistillation
from plugguide.modules.guidance_halving import GuidanceHalving
from plugguide.modules.guide_distillation import GuideDistillation
from plugguide.modules.guided_sampling import GuidedSampling
from plugguide.modules.progressive_halving import ProgressiveHalving

__all__ = [
    "AutoencoderPretraining",
    "CalibrationEvaluation",
    "ClassifierPretraining",
    "DensePretraining",
    "DiffusionPretraining",
    "EmbedderPretraining",
    "ExpertDistillation",
    "GuideDistillation",
    "GuidanceDistillation",
    "GuidanceHalving",
    "GuidedSampling",
    "ProgressiveHalving",
]
