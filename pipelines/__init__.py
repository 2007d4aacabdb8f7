"""diffusers-style sampling pipelines; they hold no training code and run without Lightning."""

from plugguide.pipelines.gradient_guider import GradientGuidance
from plugguide.pipelines.guide_distilled import GuideDistilledPipeline
from plugguide.pipelines.guided_denoiser import guided
from plugguide.pipelines.guided_diffusion import GuidedDiffusionPipeline, GuidedSamplesOutput
from plugguide.pipelines.particle_callback import ParticleResampling
from plugguide.pipelines.particle_population import ParticleSettings
from plugguide.pipelines.particle_sampling import ParticleDiffusionPipeline, ParticleSamplesOutput
from plugguide.pipelines.seeded_sampling import sample_batch, sample_trajectory
from plugguide.pipelines.training_free_cost import TrainingFreeCost, training_free_cost

__all__ = [
    "GradientGuidance",
    "GuideDistilledPipeline",
    "GuidedDiffusionPipeline",
    "GuidedSamplesOutput",
    "ParticleDiffusionPipeline",
    "ParticleResampling",
    "ParticleSamplesOutput",
    "ParticleSettings",
    "TrainingFreeCost",
    "guided",
    "sample_batch",
    "sample_trajectory",
    "training_free_cost",
]
