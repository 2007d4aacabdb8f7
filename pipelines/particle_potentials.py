"""What a particle is weighted by: any project `Guidance`'s log-likelihood, and FK steering's potentials built on it.

Every guide here is a log-likelihood `log p(y | input)` on x_t (naive classifier, PPAP experts) or on x0_hat
(classifier on the clean estimate, calibrated off-the-shelf classifier), so every guide is also a reward
r = log p(y | .) for a particle sampler: read at an evaluation's noise level, on the input the guide says, through the
VAE decoder for latent models as the gradient is (pipelines/score_shift.py).

Feynman-Kac steering (Singhal et al., 2025) resamples particles by potentials G_t of the intermediate rewards r_t
and corrects at the end so that the product of all potentials along a path is exp(lambda r_0), the target being
p(x_0) exp(lambda r(x_0)). Its four potentials, with lambda (`FKD.resample` in the authors' `fkd_class.py`):

    max    G_t = exp(lambda max(r_t, r_(t+1), ...))   the best reward along the path so far
    add    G_t = exp(lambda (r_t + r_(t+1) + ...))    the sum of the rewards so far
    diff   G_t = exp(lambda (r_t - r_(t+1)))           the reward's increase since the last potential
    rt     G_t = exp(lambda r_t)                       the current reward

and at the final step G_0 = exp(lambda r_0) / prod_t G_t for max, add and rt (diff's product telescopes to it already),
the paper's target; the authors' code divides exp(lambda max_t r_t) and exp(lambda sum_t r_t) there for max and add.
The authors start the history at `reward_min_value` = 0; here `max` starts from the first reward instead, since a
log-likelihood is <= 0 and max(r, 0) = 0 would make every max potential 1; diff and add start from 0 as theirs do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from plugguide.pipelines.guidance.base import Guidance
from plugguide.pipelines.model_family import NoiseLevel
from plugguide.pipelines.score_shift import guide_decoder, guided_clean_estimate

FKPotentialKind = Literal["max", "add", "diff", "rt"]
FK_POTENTIALS = ("max", "add", "diff", "rt")


def check_potential_guidance(guidance: Guidance | None, setting: str = "guidance") -> Guidance:
    """`guidance` if it has a log-likelihood to weigh particles by, else an error naming `setting`."""
    if guidance is None:
        raise ValueError(f"Particle weights read a guide's log-likelihood, but `{setting}` is not set.")
    if guidance.predicts_shift:
        raise ValueError(
            f"{type(guidance).__name__} predicts its shift in one pass and has no log-likelihood to weigh particles "
            f"by; use the guide it was distilled from (a classifier, PPAP experts) as the potential."
        )
    if guidance.shifts != "score":
        raise ValueError(
            f"{type(guidance).__name__} moves the sample before the denoiser sees it; particle weights are read off "
            "the guides that shift the score."
        )
    return guidance


@torch.no_grad()
def guidance_log_likelihood(
    guidance: Guidance,
    vae,
    x: torch.Tensor,
    level: NoiseLevel,
    x0_hat: torch.Tensor,
    targets: torch.Tensor,
    *,
    decode=None,
) -> torch.Tensor:
    """log p(y | .) per sample (B,) at one evaluation: on x_t = x / scale or on x0_hat (`guided_clean_estimate`), as
    `guidance.input` says, at the level's train timestep; latents are decoded (by `decode`, or `vae`) and clipped to
    [-1, 1] first by the gradient's own `guide_decoder`. A forward pass of the guide only: no gradient is taken."""
    inputs = x / level.scale if guidance.input == "x_t" else guided_clean_estimate(vae, x0_hat)
    timesteps = torch.full((x.shape[0],), level.timestep, device=x.device, dtype=torch.long)
    if vae is not None:
        with guide_decoder(vae, decode) as pixels_of:
            inputs = pixels_of(inputs)
    parameter = next(guidance.parameters(), None)
    if parameter is not None and parameter.is_floating_point():
        inputs = inputs.to(parameter.dtype)
    return guidance.log_likelihood(inputs, timesteps, targets).float()


@dataclass(frozen=True)
class FKPotential:
    """FK steering's potential of a reward (see the module docstring): `kind` and its lambda.

    Args:
        kind (`str`, defaults to "diff"): "max", "add", "diff" or "rt".
        lmbda (`float`, defaults to 1.0): lambda; the target is p(x_0) exp(lambda r(x_0)), so with r = log p(y | x_0)
            and lambda = 1 it is p(x_0) p(y | x_0), the class-conditional distribution of an exact classifier.
    """

    kind: FKPotentialKind = "diff"
    lmbda: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in FK_POTENTIALS:
            raise ValueError(f"Expected `potential` to be one of {', '.join(FK_POTENTIALS)}, but got {self.kind!r}.")

    def log_potential(self, reward: torch.Tensor, history: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log G_t, the history the next potential reads) of intermediate `reward`s, given the `history` of the
        particles' past rewards (None before the first potential): the running max, the running sum, or the last
        reward, as the kind keeps it (the authors' `population_rs`)."""
        if self.kind == "max":
            history = reward if history is None else torch.maximum(reward, history)
            return self.lmbda * history, history
        if self.kind == "add":
            history = reward if history is None else reward + history
            return self.lmbda * history, history
        if self.kind == "diff":
            return self.lmbda * (reward - (0 if history is None else history)), reward
        return self.lmbda * reward, reward

    def final_log_potential(
        self, reward: torch.Tensor, history: torch.Tensor | None, log_product: torch.Tensor
    ) -> torch.Tensor:
        """log G_0 of the final reward: lambda r_0 - sum_t log G_t (max, add, rt; `log_product` the sum of the
        particles' past log-potentials), or diff's last difference, so that every path's potentials multiply to
        exp(lambda r_0)."""
        if self.kind == "diff":
            return self.log_potential(reward, history)[0]
        return self.lmbda * reward - log_product
