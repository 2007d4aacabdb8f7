"""Classifier-type guidance as a diffusers guider, for the modular pipelines (`diffusers.modular_pipelines`)."""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers.guiders import ClassifierFreeGuidance

from plugguide.pipelines.guidance.base import Guidance
from plugguide.pipelines.guided_denoiser import guided_denoiser


class GradientGuidance(ClassifierFreeGuidance):
    """diffusers' classifier-free guidance plus the score shift of a `Guidance` (Dhariwal & Nichol, 2021), as a guider.

    A guider only combines predictions: `BaseGuidance.__call__` hands `forward` the denoiser's outputs and nothing of
    the sample, the scheduler or the VAE, which a gradient needs. Its one hook on the network,
    `prepare_models(denoiser)` before each of the denoise step's batches and `cleanup_models(denoiser)` after it (PAG
    and skip-layer guidance patch attention there), installs the guided forward of `guided`
    (pipelines/guided_denoiser.py) for that call and takes it away: the denoiser's output carries the shift d of the
    step, computed once at the conditional batch (the first) and reused at the unconditional one (the same state), so
    CFG combines shifted predictions, `(eps_u + d) + g ((eps_c + d) - (eps_u + d)) = eps_u + g (eps_c - eps_u) + d`.
    The pipeline (its scheduler places each call, its VAE decodes) is handed over at construction; this guider is
    therefore not saved or loaded by config.

    Args:
        pipe: the modular pipeline (with `unet` or `transformer`, `scheduler`, and `vae` for latent models).
        guidance (`Guidance`): a score-shifting `Guidance` (see `guided`).
        classifier_scale (`float`): the guidance gradient scale s >= 0.
        targets (`Sequence | torch.Tensor`): one target per sample of the pipeline's batch.
        guidance_scale (`float`, defaults to 7.5): the CFG weight g (1 = off), as `ClassifierFreeGuidance`.
        guidance_rescale (`float`, defaults to 0.0): see `ClassifierFreeGuidance`.
    """

    def __init__(
        self,
        pipe,
        guidance: Guidance,
        classifier_scale: float,
        targets: Sequence | torch.Tensor,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
    ) -> None:
        super().__init__(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)
        self.guided_forward = guided_denoiser(pipe, guidance, classifier_scale, targets)
        if self.guided_forward.clip_first:
            raise ValueError(
                f"`scheduler` {type(pipe.scheduler).__name__} clips x0_hat inside its step; a guider cannot make it "
                f"step "
                "unclipped after the shift (use `guided` on a stock pipeline, or a scheduler without clip_sample)."
            )

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        super().prepare_models(denoiser)
        self.guided_forward.install()

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        self.guided_forward.uninstall()
        super().cleanup_models(denoiser)
