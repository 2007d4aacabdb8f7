"""Recurrence ("time travel"): run a sampler step, re-noise its result back to the step's level, and run it again.

FreeDoM (Yu et al., 2023, Algorithm 1), UGD (Bansal et al., 2023) and TFG repeat each guided step N times: between
repeats x_prev is diffused back, x_t = sqrt(alpha_t) x_prev + sqrt(1 - alpha_t) z with alpha_t = abar_t / abar_prev,
so the guidance acts N times at one level while the sample stays on the model's marginal. In a sampler's own space
`x = scale x_t` (`ModelFamily`) that is x_t = scale_t (a x_prev / scale_prev + sqrt(1 - a^2) z), a = alpha_t /
alpha_prev of the VP coefficients, the same step for every family.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from diffusers.utils.torch_utils import randn_tensor

from plugguide.pipelines.model_family import ModelFamily, NoiseLevel


def next_level(family: ModelFamily, index: int) -> tuple[float, float]:
    """(alpha, scale) of the state the step at evaluation `index` leads to; (1, 1) after the last: the clean image."""
    timesteps = family.scheduler.timesteps
    following = index + family.evaluations_per_step
    if following >= len(timesteps):
        return 1.0, 1.0
    level = family.noise_level(following, timesteps[following])
    return level.alpha, level.scale


def renoise(family: ModelFamily, x_prev: torch.Tensor, level: NoiseLevel, index: int, generator) -> torch.Tensor:
    """The state x_prev of the step at evaluation `index` diffused back to that step's `level`, with the run's generator."""
    alpha_prev, scale_prev = next_level(family, index)
    ratio = level.alpha / alpha_prev
    noise = randn_tensor(x_prev.shape, generator=generator, device=x_prev.device, dtype=x_prev.dtype)
    return level.scale * (ratio * x_prev / scale_prev + math.sqrt(max(1 - ratio**2, 0.0)) * noise)


@contextlib.contextmanager
def repeatable_step(scheduler) -> Iterator[None]:
    """The scheduler as it was before the block, after it: a multistep solver's history (lists kept in place, e.g.
    DPM-Solver's `model_outputs`) and its step index are put back, so the step can run again at the same timestep."""
    saved = {key: list(value) if isinstance(value, list) else value for key, value in vars(scheduler).items()}
    try:
        yield
    finally:
        vars(scheduler).clear()
        vars(scheduler).update(
            {key: list(value) if isinstance(value, list) else value for key, value in saved.items()}
        )


def check_recurrence(family: ModelFamily, recurrence: int) -> None:
    """Fails, naming `recurrence`, on a sampler whose step spans several evaluations (Heun), which cannot be re-run
    from one evaluation's result."""
    if recurrence > 1 and family.evaluations_per_step > 1:
        raise ValueError(
            f"`recurrence`={recurrence} repeats one-evaluation steps, but {type(family.scheduler).__name__} takes "
            f"{family.evaluations_per_step} evaluations per step; use a first-order sampler (DDIM, DDPM, Euler, "
            f"EDMEuler, FlowMatchEuler, DPM-Solver) or `recurrence`=1."
        )
