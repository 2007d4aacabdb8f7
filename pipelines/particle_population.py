"""A population of K weighted particles per requested sample: its weights, when it resamples, and the final pick.

Shared by `ParticleDiffusionPipeline` (the project's sampler, every family) and `ParticleResampling` (a stock
pipeline's `callback_on_step_end`): both evaluate the potential themselves and hand the rewards (or TDS's twists)
here; the population accumulates log-weights, resamples within each group of K, and picks one particle per group.

Weights accumulate between resamplings and restart at zero after one, as in TDS's `smc_FK` (Chopin &
Papaspiliopoulos, 2020): with `ess_threshold` None every scheduled step resamples (FK steering's default, TDS's
`ess_threshold: null`); with a threshold, a scheduled step resamples only where a group's effective sample size is
below `ess_threshold * K` (adaptive resampling), and the other groups carry their weights on. FK's authors, when
adaptive, drop the weights of a step that does not resample; here they carry, so the weights stay those of the target.

Deterministic samplers (DDIM at eta = 0, DPM-Solver, Euler, Heun, flow Euler): resampling copies particles, and
copies of one state stay identical to the end, since nothing but the state decides the next one; the population
then only prunes. FK's authors sample DDIM with eta = 1 (their `--eta 1.0`), i.e. with the step's own noise, so
copies part again; here the ancestral `DDPMScheduler` (DDIM's eta = 1) or `EulerAncestralDiscreteScheduler` do that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from plugguide.pipelines.particle_potentials import FK_POTENTIALS, FKPotential
from plugguide.pipelines.resampling import (
    RESAMPLING_METHODS,
    ResamplingMethod,
    effective_sample_size,
    flat_indices,
    group_uniforms,
    inverse_cdf,
    normalized_weights,
    resample_indices,
)
from plugguide.pipelines.twisted_weights import twisted_log_weight

POTENTIALS = (*FK_POTENTIALS, "twisted")
FINAL_PICKS = ("weight", "best")


@dataclass(frozen=True)
class ParticleSettings:
    """How a particle sampler weighs, resamples and picks (the number of particles K is the call's `num_particles`).

    Args:
        potential (`str`, defaults to "diff"): FK steering's "max", "add", "diff" or "rt" of the reward r = log p(y | .)
            of the guide, or "twisted" (TDS: the guided step proposes, the weight corrects it; ancestral DDPM only).
        lmbda (`float`, defaults to 1.0): FK's lambda, the target p(x) exp(lambda r(x)); unused by "twisted", whose
            target is p(x) p(y | x)^s with s the run's `classifier_scale`.
        resampling (`str`, defaults to "systematic"): "multinomial" or "systematic" (`pipelines.resampling`).
        ess_threshold (`float`, *optional*): None resamples at every scheduled step; a value in (0, 1] resamples a
            group only where its effective sample size is below `ess_threshold * K` (FK's adaptive runs use 0.5).
        resample_interval (`int`, *optional*, defaults to 1): resample every this many sampler steps from
            `resample_start` to `resample_end`; None never resamples before the final pick (best-of-N).
        resample_start (`int`, defaults to 0): the first sampler step (0-based) that may resample.
        resample_end (`int`, *optional*): the last one; None: the last step.
        final_pick (`str`, defaults to "weight"): one particle per sample, drawn by its final weight ("weight", the
            sampler's estimate of its target), or the one whose final sample has the highest reward ("best").
    """

    potential: Literal["max", "add", "diff", "rt", "twisted"] = "diff"
    lmbda: float = 1.0
    resampling: ResamplingMethod = "systematic"
    ess_threshold: float | None = None
    resample_interval: int | None = 1
    resample_start: int = 0
    resample_end: int | None = None
    final_pick: Literal["weight", "best"] = "weight"

    def __post_init__(self) -> None:
        if self.potential not in POTENTIALS:
            raise ValueError(f"Expected `potential` to be one of {', '.join(POTENTIALS)}, but got {self.potential!r}.")
        if self.resampling not in RESAMPLING_METHODS:
            raise ValueError(
                f"Expected `resampling` to be one of {', '.join(RESAMPLING_METHODS)}, but got {self.resampling!r}."
            )
        if self.final_pick not in FINAL_PICKS:
            raise ValueError(
                f"Expected `final_pick` to be one of {', '.join(FINAL_PICKS)}, but got {self.final_pick!r}."
            )
        if self.ess_threshold is not None and not 0 < self.ess_threshold <= 1:
            raise ValueError(f"Expected `ess_threshold` to be None or in (0, 1], but got {self.ess_threshold}.")
        if self.resample_interval is not None and self.resample_interval < 1:
            raise ValueError(f"Expected `resample_interval` to be None or >= 1, but got {self.resample_interval}.")
        if self.resample_start < 0:
            raise ValueError(f"Expected `resample_start` to be >= 0, but got {self.resample_start}.")
        if self.potential == "twisted" and self.resample_interval != 1:
            raise ValueError(
                "`potential`='twisted' weighs every step (the proposal's correction), so it resamples with "
                f"`resample_interval`=1; got {self.resample_interval}."
            )

    @classmethod
    def best_of_n(cls) -> "ParticleSettings":
        """Best-of-N: K independent samples, no resampling, the one whose final sample has the highest reward."""
        return cls(potential="rt", resample_interval=None, final_pick="best")

    @classmethod
    def random_search(cls) -> "ParticleSettings":
        """Random search over the initial noise (Ma et al., 2025): K initial noises, each run to its sample, the noise
        whose sample scores best kept (the output's `initial_noise`). On a deterministic sampler, their setting, the
        sample is a function of its noise and this is best-of-N; on a stochastic one the step noise is searched too."""
        return cls.best_of_n()

    @property
    def fk_potential(self) -> FKPotential | None:
        return None if self.potential == "twisted" else FKPotential(self.potential, self.lmbda)

    def weighs_at(self, step: int, num_steps: int) -> bool:
        """Whether sampler step `step` of `num_steps` reads the potential and may resample (TDS: every step)."""
        if self.potential == "twisted":
            return True
        if self.resample_interval is None or step < self.resample_start:
            return False
        end = num_steps - 1 if self.resample_end is None else self.resample_end
        return step <= end and (step - self.resample_start) % self.resample_interval == 0


@dataclass
class ParticleTrace:
    """Per sampler step: the effective sample size of each group after the step's weights, and which groups
    resampled (`(num_steps, B)` tensors once stacked)."""

    ess: list[torch.Tensor] = field(default_factory=list)
    resampled: list[torch.Tensor] = field(default_factory=list)


class ParticlePopulation:
    """The weights of B groups of K particles, flattened as B * K in group order (sample b's at b K ... b K + K - 1).

    Args:
        settings (`ParticleSettings`): the potential, resampling and pick.
        num_groups (`int`): B, the requested samples.
        num_particles (`int`): K per sample.
        generator (`torch.Generator | list[torch.Generator] | None`): the resampling draws: one generator per group
            (a list of B), one for all, or None (the global one).
        device (`torch.device`): where the weights live.
        twist_scale (`float`, defaults to 1.0): s of the twist s log p(y | .) ("twisted" only).
    """

    def __init__(
        self,
        settings: ParticleSettings,
        num_groups: int,
        num_particles: int,
        generator: torch.Generator | list[torch.Generator] | None,
        device: torch.device | str,
        twist_scale: float = 1.0,
    ) -> None:
        self.settings = settings
        self.num_groups, self.num_particles = num_groups, num_particles
        self.generator = generator
        self.twist_scale = twist_scale
        self.log_weights = torch.zeros(num_groups, num_particles, device=device)
        self.ancestors = torch.arange(num_groups * num_particles, device=device)  # each particle's initial noise
        self.history: torch.Tensor | None = None  # FK: the rewards the next potential reads
        self.log_product = torch.zeros(num_groups * num_particles, device=device)  # FK: sum of applied log G_t
        self.log_twist: torch.Tensor | None = None  # TDS: s log p~(y | x) at the particles' current state
        self.transition: torch.Tensor | None = None  # TDS: log p - log q of the step that led to the current state
        self.trace = ParticleTrace()
        self.picked_ancestors: torch.Tensor | None = None  # after `finish`: the initial noise of each pick

    def _add(self, log_increment: torch.Tensor) -> None:
        self.log_weights = self.log_weights + log_increment.view(self.num_groups, self.num_particles).to(
            self.log_weights
        )

    def reweigh(self, log_likelihood: torch.Tensor) -> None:
        """Multiplies the weights by this step's potential of the particles' log p(y | .) (B * K,): an FK potential,
        or TDS's twist ratio times the transition ratio of the step just taken (`set_transition`)."""
        fk = self.settings.fk_potential
        if fk is None:
            twist = self.twist_scale * log_likelihood
            self._add(twisted_log_weight(twist, self.log_twist, self.transition))
            self.log_twist, self.transition = twist, None
            return
        log_potential, self.history = fk.log_potential(log_likelihood, self.history)
        self.log_product = self.log_product + log_potential
        self._add(log_potential)

    def set_transition(self, transition: torch.Tensor) -> None:
        """TDS: log p(x' | x) - log q(x' | x, y) of the step just taken, read by the next `reweigh`."""
        self.transition = transition

    def resample(self) -> torch.Tensor | None:
        """Resamples the groups that need it (all, or those under the ESS threshold); returns the flat indices the
        caller's per-particle tensors are to be taken at, or None where no group resampled. Records the step's ESS."""
        ess = effective_sample_size(self.log_weights)
        threshold = self.settings.ess_threshold
        needs = torch.ones_like(ess, dtype=torch.bool) if threshold is None else ess < threshold * self.num_particles
        self.trace.ess.append(ess.cpu())
        self.trace.resampled.append(needs.cpu())
        if not bool(needs.any()):
            return None
        drawn = resample_indices(self.log_weights, self.settings.resampling, self.generator)
        keep = torch.arange(self.num_particles, device=drawn.device).expand_as(drawn)
        indices = flat_indices(torch.where(needs[:, None], drawn, keep))
        self.log_weights = torch.where(needs[:, None], torch.zeros_like(self.log_weights), self.log_weights)
        self.take(indices)
        return indices

    def take(self, indices: torch.Tensor) -> None:
        """Every per-particle record at the flat `indices` (the population after resampling)."""
        self.ancestors = self.ancestors[indices]
        self.log_product = self.log_product[indices]
        if self.history is not None:
            self.history = self.history[indices]
        if self.log_twist is not None:
            self.log_twist = self.log_twist[indices]
        if self.transition is not None:
            self.transition = self.transition[indices]

    def finish(self, final_log_likelihood: torch.Tensor) -> torch.Tensor:
        """The flat index of the particle picked for each group (B,), after the final potential of the particles'
        final samples: lambda r_0 over the product of the past potentials (FK), or p(y | x_0)^s over the last twist
        (TDS). "weight" draws it by the final weights (with the population's generator), "best" takes the highest r_0."""
        fk = self.settings.fk_potential
        if fk is None:
            self._add(twisted_log_weight(self.twist_scale * final_log_likelihood, self.log_twist, self.transition))
        else:
            self._add(fk.final_log_potential(final_log_likelihood, self.history, self.log_product))
        if self.settings.final_pick == "best":
            picked = final_log_likelihood.view(self.num_groups, self.num_particles).argmax(-1)
        else:
            uniforms = group_uniforms("multinomial", self.num_groups, 1, self.generator, self.log_weights.device)
            picked = inverse_cdf(normalized_weights(self.log_weights), uniforms)[:, 0]
        picked = picked + self.num_particles * torch.arange(self.num_groups, device=picked.device)
        self.picked_ancestors = self.ancestors[picked]
        return picked


def reorder_sampler_state(scheduler, indices: torch.Tensor, state: torch.Tensor) -> None:
    """Takes, at `indices`, every per-sample tensor a multistep sampler keeps between steps (DPM-Solver's and UniPC's
    `model_outputs`, PNDM's `ets`, Heun's `sample`, `last_sample`, ...): the tensors, or tensors in lists, with the
    state's shape, so a resampled particle continues with its ancestor's history."""
    batch = state.shape[0]

    def reordered(value):
        if isinstance(value, torch.Tensor) and value.dim() == state.dim() and value.shape[0] == batch:
            return value[indices.to(value.device)]
        return value

    for name, value in list(vars(scheduler).items()):
        if isinstance(value, list):
            setattr(scheduler, name, [reordered(entry) for entry in value])
        elif isinstance(value, torch.Tensor):
            setattr(scheduler, name, reordered(value))
