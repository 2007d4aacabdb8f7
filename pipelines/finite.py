"""Numbers that must stay finite while sampling: the scales a user sets, and the samples a sampler makes."""

from __future__ import annotations

import math

import torch


def check_scale(name: str, value: float, positive: bool = False) -> float:
    """`value` if it is a finite number >= 0 (> 0 with `positive`), else an error naming the setting `name`.

    NaN slips through a plain `value < 0` check (every comparison with NaN is false) and then fails every
    `scale > 0` test too, which switches guidance off without a word; inf makes every sample NaN.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise ValueError(f"Expected `{name}` to be a finite number {'> 0' if positive else '>= 0'}, but got {value}.")
    return value


def check_cfg_scale(value: float, name: str = "guidance_scale") -> float:
    """`value` if it is a finite classifier-free guidance weight g >= 1 (diffusers' `guidance_scale`; 1 = off), else an
    error naming `name`. diffusers switches CFG off silently below 1; here a value there is a mistake worth naming."""
    check_scale(name, value)
    if value < 1:
        raise ValueError(
            f"Expected `{name}` (the classifier-free guidance weight g, 1 = off) to be >= 1, but got {value}."
        )
    return value


def check_finite_samples(x: torch.Tensor, timestep: torch.Tensor, timesteps: torch.Tensor) -> None:
    """Fails naming the sampler step at which the samples stopped being finite, instead of scoring NaN images.

    Finite scales can still overflow (a huge scale, a guide whose gradients explode, a damaged model), and a
    NaN sample scores as a valid image of some class downstream. `timestep` is the step just taken, one of the
    scheduler's `timesteps`.
    """
    if not bool(torch.isfinite(x).all()):
        step = int((timesteps == timestep).nonzero()[0, 0]) + 1
        raise FloatingPointError(
            f"Sampling produced non-finite values at step {step} of {len(timesteps)} (timestep {int(timestep)}): lower "
            "`classifier_scale` / `guidance_scale` (or set the guidance's `clip_gradient`), or check the diffusion model's weights."
        )
