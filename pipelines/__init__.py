"""diffusers-style sampling pipelines; they hold no training code and run without Lightning."""

from plugguide.pipelines.guided_diffusion import GuidedDiffusionPipeline, GuidedSamplesOutput

__all__ = ["GuidedDiffusionPipeline", "GuidedSamplesOutput"]
