"""The guidance interface every method implements: a gradient of a log-likelihood, and where it was taken."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from plugguide.pipelines.finite import check_scale

GuidanceInput = Literal["x_t", "x0_hat"]
GuidanceShift = Literal["score", "sample"]


@dataclass(frozen=True)
class GuidanceStep:
    """Where one guided denoiser evaluation sits in its sampling run, the same for every model family.

    Args:
        timestep (`int`): the discrete train timestep of this noise level (PPAP experts route by it).
        index (`int`): the sampler step i (0-based; both evaluations of a Heun step share it).
        num_steps (`int`): N, the sampler steps of the run.
        alpha (`float`): signal coefficient of the variance-preserving x_t = alpha x0 + sigma eps.
        sigma (`float`): its noise coefficient (alpha^2 + sigma^2 = 1).
        variance (`float`): Sigma_t of an ancestral DDPM step (the pipeline fills it in); 0 on every other sampler.
        num_train_timesteps (`int`): T.
        max_variance (`float`, defaults to 0.0): the largest Sigma_t of the run so far, this step's included (the pipeline keeps it, so a
            guidance that reads it, EluCD's sine term, holds no state between calls); 0 on every other sampler.
    """

    timestep: int
    index: int
    num_steps: int
    alpha: float
    sigma: float
    variance: float
    num_train_timesteps: int
    max_variance: float = 0.0


class Guidance(nn.Module, ABC):
    """Gradient of a guidance log-likelihood `log p(y | input(x_t, t))` for classifier guidance.

    The target y is a class, or for dense guides a map per sample (a label map, a depth map), as the method's task
    says (`pipelines.tasks`).

    A method implements `log_likelihood` on its input, which is either the noisy sample `x_t` or the
    predicted clean image `x0_hat` (`input`); the pipeline decides how a scheduler applies the gradient
    (mean shift for ancestral DDPM, a shift of the score for the rest, pipelines/model_family.py),
    the same way for every method and every model family.

    `shifts` says what the gradient moves: "score" (every method but one), or "sample" for EluCD's EDM algorithm
    (Ma et al., 2023, Algorithm 2), which displaces the sample itself before the denoiser sees it; the pipeline
    then hands the method the sample in EDM's space, x_t / alpha = x0 + (sigma / alpha) eps.

    Args:
        input (`GuidanceInput`, defaults to 'x_t'): `"x_t"` or `"x0_hat"`, the tensor the log-likelihood is differentiated against.
        clip_gradient (`float | None`, *optional*): if set, gradients are clipped to this L2 norm per sample; non-finite gradients
            then become zero instead of raising.
    """

    def __init__(self, input: GuidanceInput = "x_t", clip_gradient: float | None = None) -> None:
        super().__init__()
        if input not in ("x_t", "x0_hat"):
            raise ValueError(f"Expected `input` to be 'x_t' or 'x0_hat', but got {input!r}.")
        if clip_gradient is not None:
            check_scale("clip_gradient", clip_gradient, positive=True)
        self.input = input
        self.clip_gradient = clip_gradient

    @abstractmethod
    def log_likelihood(self, inputs: torch.Tensor, timesteps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample log p(target | inputs) at `timesteps`, shape (B,)."""

    @property
    def shifts(self) -> GuidanceShift:
        return "score"

    def step_scale(self, scale: float, step: GuidanceStep) -> float:
        """The guidance scale at this step of the run; `scale` itself for methods without a schedule."""
        return scale

    def variance_offset(self, step: GuidanceStep) -> float:
        """A uniform value added to Sigma_t in the mean shift `s (Sigma_t + offset) grad` (EluCD's sine term); 0 here."""
        return 0.0

    predicts_shift = False  # True for a method that overrides `predicted_shift`
    # The sampler grid the method was made for (a halved distilled guide's DDIM timesteps); None: any sampler.
    timesteps: list[int] | None = None
    # True: the ancestral DDPM mean shift uses PPAP's batch-normalised gradient (guided_diffusion.batch_normalized_gradient)
    normalize_gradient = False

    def predicted_shift(
        self, x_t: torch.Tensor, step: GuidanceStep, x0_hat: torch.Tensor, targets: torch.Tensor, scale: float
    ) -> torch.Tensor | None:
        """The eps shift of this evaluation when the method predicts it in one pass (a distilled guide, no gradient);
        None, the default: the pipeline differentiates `log_likelihood` and shifts eps by `-s sigma grad` itself."""
        return None

    def check_targets(self, targets: torch.Tensor) -> None:
        """Fails, naming the problem, on targets `log_likelihood` cannot take; the pipeline calls it before sampling."""

    def check_classifier_scale(self, scale: float, setting: str = "classifier_scale") -> None:
        """Fails, naming `setting`, on a scale s > 0 this method cannot serve (a distilled guide outside the scales it
        was trained on); the pipeline calls it once per run, before sampling."""

    def gradient(
        self, x_t: torch.Tensor, timesteps: torch.Tensor, x0_hat: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """d/d(input) of the summed log-likelihood, with a clear error if it is not finite."""
        # Samplers often run under inference mode (Lightning's test/predict loops): leave it and clone,
        # since inference tensors cannot take part in autograd.
        with torch.inference_mode(False), torch.enable_grad():
            inputs = (x_t if self.input == "x_t" else x0_hat).detach().clone().requires_grad_(True)
            log_likelihood = self.log_likelihood(inputs, timesteps.clone(), targets.clone()).sum()
            (grad,) = torch.autograd.grad(log_likelihood, inputs)
        finite = torch.isfinite(grad)
        if self.clip_gradient is not None:
            grad = torch.where(finite, grad, torch.zeros_like(grad))
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))
            return grad * (self.clip_gradient / norm).clamp(max=1.0)
        if not bool(finite.all()):
            raise FloatingPointError(
                f"{type(self).__name__} produced a non-finite guidance gradient at timestep {int(timesteps.flatten()[0])}; "
                "set `clip_gradient` to clip it (non-finite values become zero) or lower the guidance scale."
            )
        return grad
