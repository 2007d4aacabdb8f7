"""diffusers-style sampling pipelines; they hold no training code and run without Lightning."""

from plugguide.pipelines.guided_diffusion import GuidedDiffusionPipeline, GuidedSamplesOutput
from plugguide.pipelines.guide_distilled import GuideDistilledPipeline


__all__ = ["GuideDistilledPipeline", "GuidedDiffusionPipeline", "GuidedSamplesOutput"]
