"""DDIM on an explicit grid of timesteps: the sampler a halved guide was trained for."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, SchedulerMixin
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor


def check_grid(timesteps: Sequence[int], num_train_timesteps: int, setting: str = "timesteps") -> list[int]:
    """Fails, naming `setting`, unless `timesteps` fall strictly from below T to 0 or above."""
    values = [int(t) for t in timesteps]
    if (
        not values
        or values[0] >= num_train_timesteps
        or values[-1] < 0
        or any(b >= a for a, b in zip(values, values[1:]))
    ):
        raise ValueError(
            f"Expected `{setting}` to fall strictly within [0, {num_train_timesteps}) (first the noisiest), but got "
            f"{values}."
        )
    return values


def halving_offset(timestep_spacing: str) -> int:
    """Where a halved grid starts in its teacher's grid: 1 under "leading" spacing, 0 otherwise (`halved_grid`)."""
    return 1 if timestep_spacing == "leading" else 0


def halved_grid(timesteps: Sequence[int], timestep_spacing: str) -> list[int]:
    """Every other timestep of a sampler's grid: the grid of the sampler that takes one step where the given one
    takes two (progressive distillation, Salimans & Ho 2022).

    A step t_k -> t_{k+2} of the halved grid is two steps t_k -> t_{k+1} -> t_{k+2} of the full one (the end of
    sampling past the last), so a guide halved on it is only ever taught from timesteps its teacher sampled on. It
    keeps the end of the grid that the spacing pins: the last timestep under diffusers' "leading" spacing, whose
    grids end at `steps_offset`, the first (T - 1) under "trailing". Where diffusers' own grids nest, it is
    diffusers' N-step grid (T = 1000, leading: 32 -> 16 and 8 -> 4; trailing: every halving); where they do not it
    differs (leading 16 -> 8: {930, 868, ...} halves to {868, 744, ...}, where DDIM's own 8 steps are {875, 750, ...}).
    """
    return list(timesteps)[halving_offset(timestep_spacing) :: 2]


class GridDDIMScheduler(DDIMScheduler):
    """diffusers' `DDIMScheduler` that can also step on an explicit, descending grid of timesteps.

    `DDIMScheduler.step` goes from t to `t - T // N`, which stays on the grid only when the grid is evenly spaced by
    T // N. On a grid set with `set_timesteps(timesteps=...)` (as diffusers' pipelines pass custom timesteps), or with
    `use_grid` for pipelines that only pass a step count, each step goes to the grid's next timestep, and after the
    last to the end of sampling (`final_alpha_cumprod`), with DDIM's update (Song et al., 2021, eq. 12)

        x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z,   sigma = eta sigma_DDIM(t, prev).

    Without a grid it is `DDIMScheduler`, bit for bit.
    """

    grid: list[int] | None = None

    def use_grid(self, timesteps: Sequence[int] | None) -> "GridDDIMScheduler":
        """Makes `set_timesteps(len(timesteps))` (and `set_timesteps()`) run on `timesteps`; None: DDIM's own grids."""
        self.grid = None if timesteps is None else check_grid(timesteps, self.config.num_train_timesteps)
        return self

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """DDIM's `num_inference_steps` timesteps, or the explicit `timesteps` (or the grid of `use_grid`)."""
        if timesteps is None and self.grid is not None and num_inference_steps in (None, len(self.grid)):
            timesteps = self.grid
        if timesteps is None:
            self.custom_timesteps = False
            return super().set_timesteps(num_inference_steps, device)
        values = check_grid(timesteps, self.config.num_train_timesteps)
        if num_inference_steps is not None and num_inference_steps != len(values):
            raise ValueError(
                f"`num_inference_steps`={num_inference_steps}, but the scheduler's grid has {len(values)} timesteps "
                f"{values}; sample it with {len(values)} steps."
            )
        self.custom_timesteps = True
        self.num_inference_steps = len(values)
        self.timesteps = torch.tensor(values, dtype=torch.long, device=device)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The grid's next timestep after `timestep`, -1 (the end of sampling) after its last."""
        timestep = int(timestep)
        later = (self.timesteps < timestep).nonzero()
        return int(self.timesteps[later[0, 0]]) if len(later) else -1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        """`DDIMScheduler.step`, to the grid's next timestep when the timesteps are explicit."""
        if not getattr(self, "custom_timesteps", False):
            return super().step(
                model_output, timestep, sample, eta, use_clipped_model_output, generator, variance_noise, return_dict
            )
        timestep = int(timestep)
        prev_timestep = self.previous_timestep(timestep)
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        pred_original_sample, pred_epsilon = self.clean_and_noise(model_output, sample, alpha_prod_t)
        if self.config.thresholding:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif self.config.clip_sample:
            limit = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-limit, limit)
        if use_clipped_model_output:
            pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / (1 - alpha_prod_t) ** 0.5
        std_dev_t = eta * self._get_variance(timestep, prev_timestep) ** 0.5
        prev_sample = (
            alpha_prod_t_prev**0.5 * pred_original_sample
            + (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_epsilon
        )
        if eta > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            prev_sample = prev_sample + std_dev_t * variance_noise
        if not return_dict:
            return prev_sample, pred_original_sample
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def clean_and_noise(
        self, model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps) of the network's output under the scheduler's `prediction_type`."""
        beta_prod_t = 1 - alpha_prod_t
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            return (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5, model_output
        if prediction_type == "sample":
            return model_output, (sample - alpha_prod_t**0.5 * model_output) / beta_prod_t**0.5
        if prediction_type == "v_prediction":
            return (
                alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output,
                alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample,
            )
        raise ValueError(
            f"`prediction_type`={prediction_type!r} is not handled; allowed: epsilon, sample, v_prediction."
        )


def sampler_on_grid(
    scheduler: SchedulerMixin, timesteps: Sequence[int] | None, setting: str = "scheduler"
) -> SchedulerMixin:
    """The sampler for a guide: `scheduler` itself, or, for a guide halved on `timesteps`, a `GridDDIMScheduler` with
    `scheduler`'s config on that grid (a halved guide is a DDIM sampler's: other samplers are refused, naming
    `setting`)."""
    if timesteps is None:
        return scheduler
    if not isinstance(scheduler, DDIMScheduler):
        raise ValueError(
            f"The guide was halved for DDIM on timesteps {list(timesteps)}; `{setting}` {type(scheduler).__name__} "
            "cannot sample it: use DDIMScheduler."
        )
    return GridDDIMScheduler.from_config(scheduler.config).use_grid(timesteps)
