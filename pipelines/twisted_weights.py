"""Twisted SMC's weights on the ancestral DDPM step (TDS, Wu et al., 2023).

Particles move by a proposal q(x_(t-1) | x_t, y), the guided step, and are weighted toward the target
p(x_(0:T)) p~(y | x_0) with twisting functions p~_t(y | x_t) that approximate p(y | x_t) along the way:

    w_t = p(x_(t-1) | x_t) p~(y | x_(t-1)) / ( q(x_(t-1) | x_t, y) p~(y | x_t) ),

and at the last step w_0 = p(y | x_0) / p~(y | x_1). The twist here is any project guide's log-likelihood times
the guidance scale s, log p~ = s log p(y | .) (`particle_potentials.guidance_log_likelihood`), so at s = 1 the target
is p(x) p(y | x), and with an exact classifier the class-conditional distribution, however coarse the proposal.
(The authors temper the classifier's logits instead, softmax(s logits); the two agree at s = 1.)

The proposal is `GuidedDiffusionPipeline`'s guided DDPM step, N(mu + d, Sigma_t) with the mean shift d = s Sigma_t
grad (Dhariwal & Nichol); the authors shift x0_hat by (1 - abar_t) / sqrt(abar_t) grad instead, i.e. the mean by
beta_t / sqrt(alpha_t) grad. Any shift is a valid proposal: the weight corrects for it through the two Gaussian
densities of the same variance,

    log p(x' | x_t) - log q(x' | x_t, y) = ( |x' - mu - d|^2 - |x' - mu|^2 ) / (2 Sigma_t).

Only the ancestral step has these densities. A deterministic sampler (DDIM at eta = 0, DPM-Solver, Euler, Heun,
flow Euler) maps x_t to one x_(t-1): its proposal has no density, and TDS's weight is undefined; those samplers take
potentials only (`particle_potentials.FKPotential`). The last DDPM step draws no noise (diffusers' `step` at t = 0):
like the authors, whose last step is the mean, it adds no correction.
"""

from __future__ import annotations

import torch

from plugguide.pipelines.model_family import ModelFamily


def check_twisted_sampler(family: ModelFamily) -> None:
    """Fails, naming the sampler, where TDS's proposal correction has no step density to read."""
    if not family.ancestral:
        raise ValueError(
            f"`potential`='twisted' corrects the guided proposal by the ancestral step's Gaussian densities, but "
            f"{type(family.scheduler).__name__} has none (a deterministic step has no density): sample with "
            "DDPMScheduler, or weigh particles by an FK potential ('max', 'add', 'diff', 'rt')."
        )


def transition_log_ratio(
    x_next: torch.Tensor, mean: torch.Tensor, mean_shift: torch.Tensor | None, variance: float | torch.Tensor
) -> torch.Tensor:
    """log p(x' | x_t) - log q(x' | x_t, y) per sample (B,): the unguided step N(mean, Sigma) against the guided one
    N(mean + mean_shift, Sigma), at the state `x_next` the guided step drew; 0 without a shift."""
    if mean_shift is None:
        return torch.zeros(x_next.shape[0], device=x_next.device)
    x_next, mean, mean_shift = x_next.double(), mean.double(), mean_shift.double()
    variance = torch.as_tensor(variance, device=x_next.device, dtype=torch.float64)
    ratio = ((x_next - mean - mean_shift).pow(2) - (x_next - mean).pow(2)) / (2 * variance)
    return ratio.flatten(1).sum(1).float()


def twisted_log_weight(
    log_twist: torch.Tensor, previous_log_twist: torch.Tensor | None, transition: torch.Tensor | None
) -> torch.Tensor:
    """log w_t = log p~(y | x_(t-1)) - log p~(y | x_t) + log p(x_(t-1) | x_t) - log q(x_(t-1) | x_t, y): the twist
    at the new state over the twist at the old one (None at the first state, where x_T is drawn from p(x_T) itself),
    times the `transition` ratio of the step between them (`transition_log_ratio`; None: the first state)."""
    weight = log_twist if previous_log_twist is None else log_twist - previous_log_twist
    return weight if transition is None else weight + transition
