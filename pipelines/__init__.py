"""diffusers-style sampling pipelines; they hold no training code and run without Lightning."""

from plugguide.pipelines.gradient_guider import GradientGuidance
from plugguide.pipelines.guide_distilled import GuideDistilledPipeline
from plugguide.pipelines.guided_denoiser import guided
from plugguide.pipelines.guided_diffusion import GuidedDiffusionPipeline, GuidedSamplesOutput
from plugguide.pipelines.particle_population import ParticleSettings
from plugguide.pipelines.particle_sampling import ParticleDiffusionPipeline, ParticleSamplesOutput
from plugguide.pipelines.seeded_sampling import sample_batch, sample_trajectory

__all__ = [
    "GradientGuidance",
    "GuideDistilledPipeline",
    "GuidedDiffusionPipeline",
    "GuidedSamplesOutput",
    "ParticleDiffusionPipeline",
    "ParticleSamplesOutput",
    "ParticleSettings",
    "guided",
    "sample_batch",
    "sample_trajectory",
]
