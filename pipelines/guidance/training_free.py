"""Training-free guidance, the design space of TFG (Ye et al., 2024): one class holding every piece."""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import torch
from torch import nn

from plugguide.pipelines.finite import check_scale
from plugguide.pipelines.guidance.base import GuidanceStep
from plugguide.pipelines.guidance.classifier import ClassifierGuidance
from plugguide.pipelines.guidance.training_free_schedule import (
    SMOOTHING_SCHEDULES,
    STRENGTH_SCHEDULES,
    SmoothingSchedule,
    StrengthSchedule,
    check_schedule,
    smoothing_weight,
    strength_weight,
)
from plugguide.pipelines.tasks import Task

CleanUpdate = Literal["keep_noise", "keep_sample"]


def check_count(setting: str, value: int, minimum: int) -> None:
    """Fails, naming `setting`, on a count that is no integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected `{setting}` to be an integer >= {minimum}, but got {value!r}.")


class TFG(ClassifierGuidance):
    """Training-free guidance with an off-the-shelf model (Ye et al., 2024, "TFG: Unified Training-Free Guidance").

    One evaluation at x_t = alpha x0 + sigma eps, with the denoiser's clean estimate x0_hat(x_t) and the guide's
    smoothed likelihood

        p~(y | x0) = 1/n sum_k p(y | x0 + sigma~_t z_k),   z_k ~ N(0, I)   (n = `mc_draws`, sigma~_t: `sigma`),

    takes two gradient terms, each scaled by the pipeline's `classifier_scale` s (s = 0: unguided):

    - rho, through the denoiser: g = d/dx_t log p~(y | x0_hat(x_t)) (the Jacobian of x0_hat included: DPS, FreeDoM,
      UGD's forward term), applied as the score shift of every other guidance here, eps' = eps - s rho_t sigma g.
      At s rho_t = 1 that is the score of p(x_t) p~(y | x0_hat(x_t)), DPS's approximation of p(x_t | y).
    - mu, on x0_hat itself: `iterations` ascent steps x0 <- x0 + s mu_t d/dx0 log p~(y | x0) from x0_hat give
      Delta_0 (MPGD, UGD's backward term). With `x0_update="keep_noise"` (TFG, MPGD) the step then starts from
      x0_hat + Delta_0 with the predicted noise unchanged, i.e. the sample moves by alpha Delta_0 and eps stays;
      with "keep_sample" (UGD) x_t stays and eps is re-derived, eps' = eps - (alpha / sigma) Delta_0, a score shift.

    TFG writes both on DDIM: x_prev = DDIM(x_t, x0_hat) + Delta_t / sqrt(alpha_t) + sqrt(abar_prev) Delta_0, with
    Delta_t = rho^TFG_t g and alpha_t = abar_t / abar_prev. An eps shift d moves DDIM's x_prev by c_t d,
    c_t = sqrt(1 - abar_prev) - sqrt(abar_prev) sigma / alpha (< 0), so TFG's Delta_t is the shift
    d = -s rho sigma g with s rho = rho^TFG / (-c_t sigma sqrt(alpha_t)): TFG's rho is a displacement per step,
    which depends on the step size, while s rho here multiplies the log-likelihood's gradient in the score, which
    does not, so one setting means the same on DDIM, DDPM, DPM-Solver, Euler, EDM and flow samplers. Its "keep_noise"
    Delta_0 is TFG's exactly (the DDIM step from x0_hat + Delta_0 with eps kept adds sqrt(abar_prev) Delta_0).

    `recurrence` N repeats each step N times, re-noising x_prev back to the step's level between repeats
    (x_t = sqrt(alpha_t) x_prev + sqrt(1 - alpha_t) z: FreeDoM's and UGD's time travel; `pipelines/recurrence.py`).
    `rho_schedule` and `mu_schedule` spread the strength over the run as TFG does (`strength_weight`); `sigma_schedule`
    "decrease" smooths with sigma~_t = `sigma` sqrt(1 - abar_t) (LGD). `normalize_by_loss` divides g by |log p~| per
    sample (DPS's normalisation of the step by the guide's loss).

    The pipeline runs the step (`GuidedDiffusionPipeline`, or `guided` for the pieces that are score shifts). The
    named methods are presets of this class (`training_free_presets.py`); `training_free_cost` counts their calls.

    Args:
        classifier (`nn.Module | str`): the off-the-shelf guide (logits, per-pixel logits or maps), or its path;
            it reads clean images (x0_hat, decoded by the VAE for latent models).
        task (`Task | None`, *optional*): how a target is scored; None: the model's own (`ClassifierGuidance`).
        rho (`float`, defaults to 1.0): mean strength of the gradient through the denoiser (0: off).
        mu (`float`, defaults to 0.0): mean step size of the ascent on x0_hat (0: off).
        sigma (`float`, defaults to 0.0): standard deviation of the Monte-Carlo smoothing of the guide (0: off).
        mc_draws (`int`, defaults to 1): n, the draws of the smoothing (TFG's `eps_bsz`).
        recurrence (`int`, defaults to 1): N, how often each step runs (1: no time travel).
        iterations (`int`, defaults to 1): ascent steps on x0_hat per evaluation (with mu > 0).
        rho_schedule (`str`, defaults to "constant"): "constant", "increase" or "decrease".
        mu_schedule (`str`, defaults to "constant"): "constant", "increase" or "decrease".
        sigma_schedule (`str`, defaults to "constant"): "constant" or "decrease".
        normalize_by_loss (`bool`, defaults to False): divide the rho gradient by |log p~(y | x0_hat)|.
        x0_update (`str`, defaults to "keep_noise"): how Delta_0 enters the step, "keep_noise" or "keep_sample".
    """

    def __init__(
        self,
        classifier: nn.Module | str,
        task: Task | None = None,
        *,
        rho: float = 1.0,
        mu: float = 0.0,
        sigma: float = 0.0,
        mc_draws: int = 1,
        recurrence: int = 1,
        iterations: int = 1,
        rho_schedule: StrengthSchedule = "constant",
        mu_schedule: StrengthSchedule = "constant",
        sigma_schedule: SmoothingSchedule = "constant",
        normalize_by_loss: bool = False,
        x0_update: CleanUpdate = "keep_noise",
    ) -> None:
        super().__init__(classifier, input="x0_hat", task=task)
        for setting, value in (("rho", rho), ("mu", mu), ("sigma", sigma)):
            check_scale(setting, value)
        for setting, value, minimum in (("mc_draws", mc_draws, 1), ("recurrence", recurrence, 1)):
            check_count(setting, value, minimum)
        check_count("iterations", iterations, 0)
        check_schedule("rho_schedule", rho_schedule, STRENGTH_SCHEDULES)
        check_schedule("mu_schedule", mu_schedule, STRENGTH_SCHEDULES)
        check_schedule("sigma_schedule", sigma_schedule, SMOOTHING_SCHEDULES)
        check_schedule("x0_update", x0_update, ("keep_noise", "keep_sample"))
        self.rho, self.mu, self.sigma = float(rho), float(mu), float(sigma)
        self.mc_draws, self.recurrence, self.iterations = mc_draws, recurrence, iterations
        self.rho_schedule, self.mu_schedule, self.sigma_schedule = rho_schedule, mu_schedule, sigma_schedule
        self.normalize_by_loss = normalize_by_loss
        self.x0_update = x0_update

    @property
    def through_denoiser(self) -> bool:
        """True where the method differentiates through the denoiser (rho > 0): the pipeline then evaluates it with
        autograd on and hands over x0_hat(x_t) with its graph."""
        return self.rho > 0

    @property
    def updates_clean_estimate(self) -> bool:
        """True where the method takes ascent steps on x0_hat (mu > 0 and at least one iteration)."""
        return self.mu > 0 and self.iterations > 0

    @property
    def moves_sample(self) -> bool:
        """True where the step itself changes beyond a score shift: recurrence, or Delta_0 with the noise kept."""
        return self.recurrence > 1 or (self.updates_clean_estimate and self.x0_update == "keep_noise")

    def rho_at(self, step: GuidanceStep, signal_ratios: Sequence[float]) -> float:
        """rho_t of this step (`strength_weight`)."""
        return self.rho * strength_weight(self.rho_schedule, signal_ratios, step.index)

    def mu_at(self, step: GuidanceStep, signal_ratios: Sequence[float]) -> float:
        """mu_t of this step (`strength_weight`)."""
        return self.mu * strength_weight(self.mu_schedule, signal_ratios, step.index)

    def smoothing_at(self, step: GuidanceStep) -> float:
        """sigma~_t, the standard deviation of the smoothing draws at this step (`smoothing_weight`)."""
        return self.sigma * smoothing_weight(self.sigma_schedule, step.sigma)

    def smoothed_log_likelihood(
        self,
        x0: torch.Tensor,
        timesteps: torch.Tensor,
        targets: torch.Tensor,
        draws: torch.Tensor | None = None,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """log p~(y | x0) = logsumexp_k log p(y | decode(x0 + draws_k)) - log n per sample, shape (B,).

        Args:
            x0 (`torch.Tensor`): clean estimates (B, ...), in the denoiser's space (latents for latent models).
            timesteps (`torch.Tensor`): (B,) train timesteps.
            targets (`torch.Tensor`): one target per sample.
            draws (`torch.Tensor`, *optional*): (n, B, ...) scaled noise, sigma~_t z_k; None: no smoothing.
            decode (*optional*): x0 -> the guide's input (the VAE decoder of a latent model); None: the identity.
        """
        n = 1 if draws is None else draws.shape[0]
        inputs = x0 if draws is None else (x0[None] + draws).flatten(0, 1)
        pixels = inputs if decode is None else decode(inputs)
        log_likelihood = self.log_likelihood(
            pixels, timesteps.repeat(n), targets.repeat(n, *[1] * (targets.dim() - 1))
        )
        return log_likelihood.view(n, -1).logsumexp(0) - math.log(n)
