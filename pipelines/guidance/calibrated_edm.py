"""EluCD's guided EDM sampler (Ma et al., 2023, Algorithm 2): calibrated guidance that moves the sample itself."""

from __future__ import annotations

import math

import torch
from torch import nn

from plugguide.pipelines.guidance.base import GuidanceShift, GuidanceStep
from plugguide.pipelines.guidance.calibrated import CalibratedGuidance
from plugguide.pipelines.tasks import Task


class CalibratedEDMGuidance(CalibratedGuidance):
    """Algorithm 2 of Ma et al. (2023) as the authors wrote it (AlexMaOLS/EluCD `EDM/generate.py`).

    The calibrated classifier (Softplus, joint and marginal temperatures, as `CalibratedGuidance`) reads the sample in
    EDM's space, x = x0 + s eps = x_t / alpha, scaled to unit RMS where its RMS exceeds 1, `x / max(rms(x), 1)`; its
    gradient comes back rescaled to the sample's RMS, `grad * rms(x) / rms(grad)`, times

        g_i = max(s (N + 1 - i) / (N + 1), 1e-5) + sin(pi i / N) s gamma

    at step i of N, and is added to the sample before the denoiser sees it (`shifts = "sample"`), once per step: on
    Heun the corrector evaluation is not guided, as in their sampler. The pipeline hands it x_t / alpha. The authors'
    ImageNet-64 run: softplus_beta 5, marginal_discount 0 (the joint term alone), gamma 0.3, s = 0.004 at 10 and 18
    steps. `CalibratedGuidance(schedule="edm_continuous")` is the same schedule as a function of t on the usual score
    shift.

    Args:
        classifier (`nn.Module | str`): see `CalibratedGuidance`.
        softplus_beta (`float`, defaults to 3.0): see `CalibratedGuidance`.
        joint_temperature (`float`, defaults to 1.0): tau1.
        marginal_discount (`float`, defaults to 0.5): tau2 / tau1.
        sine_gamma (`float`, defaults to 0.3): gamma of g_i.
        clip_gradient (`float`, *optional*): see `Guidance`.
        task (`Task`, *optional*): see `ClassifierGuidance`.
    """

    def __init__(
        self,
        classifier: nn.Module | str,
        *,
        softplus_beta: float | None = 3.0,
        joint_temperature: float = 1.0,
        marginal_discount: float = 0.5,
        sine_gamma: float = 0.3,
        clip_gradient: float | None = None,
        task: Task | None = None,
    ) -> None:
        super().__init__(
            classifier,
            input="x_t",
            softplus_beta=softplus_beta,
            joint_temperature=joint_temperature,
            marginal_discount=marginal_discount,
            sine_gamma=sine_gamma,
            schedule="ddpm",
            clip_gradient=clip_gradient,
            task=task,
        )

    @property
    def shifts(self) -> GuidanceShift:
        return "sample"

    def gradient(
        self, x_t: torch.Tensor, timesteps: torch.Tensor, x0_hat: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """The normalised gradient of Algorithm 2 at the sample `x_t` (in EDM's space), per sample."""
        norm = x_t.square().flatten(1).mean(1).sqrt().view(-1, *[1] * (x_t.dim() - 1))
        inputs = x_t / norm.clamp_min(1.0)
        grad = super().gradient(inputs, timesteps, inputs, targets)
        grad_norm = grad.square().flatten(1).mean(1).sqrt().view_as(norm)
        return grad / grad_norm.clamp_min(1e-20) * norm

    def step_scale(self, scale: float, step: GuidanceStep) -> float:
        total = step.num_steps + 1  # the authors' len(t_steps): N levels and the final 0
        return (
            max(scale / total * (total - step.index), 1e-5)
            + math.sin(step.index / step.num_steps * math.pi) * scale * self.sine_gamma
        )

    def variance_offset(self, step: GuidanceStep) -> float:
        return 0.0
