"""One evaluation of training-free guidance (`TFG`): the score shift and the clean-image update, shared by
`GuidedDiffusionPipeline` and `guided`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from plugguide.pipelines.guidance.training_free import TFG
from plugguide.pipelines.model_family import ModelFamily, NoiseLevel
from plugguide.pipelines.recurrence import check_recurrence
from plugguide.pipelines.score_shift import guide_decoder, noise_shift


@dataclass(frozen=True)
class TrainingFreeUpdate:
    """What one evaluation of `TFG` changes.

    Args:
        noise_shift (`torch.Tensor | None`): the eps shift (rho's, and Delta_0's under "keep_sample"); None: none.
        clean_shift (`torch.Tensor | None`): Delta_0 to apply with the noise kept (the sample moves); None: none.
    """

    noise_shift: torch.Tensor | None
    clean_shift: torch.Tensor | None


def signal_ratios(family: ModelFamily) -> list[float]:
    """alpha_i = abar_i / abar_{i+1} of every step i of the run the family's scheduler is set to (abar = alpha^2 of
    the step's first evaluation; the step after the last is the clean image, abar = 1), for TFG's schedules."""
    timesteps = family.scheduler.timesteps
    per_step = family.evaluations_per_step
    abars = [family.noise_level(index, timesteps[index]).alpha ** 2 for index in range(0, len(timesteps), per_step)]
    abars.append(1.0)
    return [abars[i] / abars[i + 1] if abars[i + 1] > 0 else 0.0 for i in range(len(abars) - 1)]


def smoothing_draws(guidance: TFG, level: NoiseLevel, x0: torch.Tensor, generator) -> torch.Tensor | None:
    """(n, B, ...) draws sigma~_t z_k from the run's generator, one tensor per draw as TFG's `get_noise` takes them
    (so a generator seeded alike gives the authors' draws); None where sigma~_t = 0."""
    spread = guidance.smoothing_at(level)
    if spread == 0:
        return None
    draws = [
        randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) for _ in range(guidance.mc_draws)
    ]
    return spread * torch.stack(draws)


def finite(grad: torch.Tensor, guidance: TFG, level: NoiseLevel, term: str) -> torch.Tensor:
    """`grad`, or a clear error where it is not finite."""
    if not bool(torch.isfinite(grad).all()):
        raise FloatingPointError(
            f"{type(guidance).__name__}'s {term} gradient is not finite at timestep {level.timestep}; lower "
            f"`classifier_scale` or `{term}`."
        )
    return grad


def training_free_update(
    guidance: TFG,
    x_t: torch.Tensor,
    x0_hat: torch.Tensor,
    level: NoiseLevel,
    targets: torch.Tensor,
    scale: float,
    ratios: list[float],
    generator,
    *,
    vae=None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    gradient_checkpointing: bool = False,
) -> TrainingFreeUpdate:
    """The rho and mu terms of `TFG` at one evaluation.

    Args:
        guidance (`TFG`): the method.
        x_t (`torch.Tensor`): the VP sample, a leaf that requires grad where `guidance.through_denoiser`.
        x0_hat (`torch.Tensor`): the denoiser's clean estimate of x_t, with its graph back to `x_t` where it requires
            grad (after CFG and the sampler's clipping).
        level (`NoiseLevel`): the evaluation's noise level.
        targets (`torch.Tensor`): one target per sample.
        scale (`float`): s, `classifier_scale`.
        ratios (`list[float]`): the run's `signal_ratios`, for the schedules.
        generator: the run's generator(s), for the smoothing draws.
        vae (*optional*): the decoder the guide reads latents through (`guide_decoder`); None in pixel space.
        decode (*optional*): latents -> pixels in place of `vae.decode` (a pipeline with packed latents).
        gradient_checkpointing (`bool`, defaults to False): checkpoint the decoder's blocks in the backward passes.
    """
    timesteps = torch.full((x_t.shape[0],), level.timestep, device=x_t.device)
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        guide_decoder(vae, decode, gradient_checkpointing) as decode,
    ):
        draws = smoothing_draws(guidance, level, x0_hat, generator)
        shift = None
        rho = guidance.rho_at(level, ratios)
        if guidance.through_denoiser and rho > 0:
            log_likelihood = guidance.smoothed_log_likelihood(x0_hat, timesteps, targets, draws, decode)
            (grad,) = torch.autograd.grad(log_likelihood.sum(), x_t)
            if guidance.normalize_by_loss:  # DPS: the step divided by the guide's loss, per sample
                grad = grad / log_likelihood.detach().abs().clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))
            shift = noise_shift(finite(grad, guidance, level, "rho"), level, scale * rho)
        clean = None
        mu = guidance.mu_at(level, ratios)
        if guidance.updates_clean_estimate and mu > 0:
            start = x0_hat.detach()
            clean = start
            for _ in range(guidance.iterations):
                leaf = clean.detach().requires_grad_(True)
                log_likelihood = guidance.smoothed_log_likelihood(leaf, timesteps, targets, draws, decode)
                (grad,) = torch.autograd.grad(log_likelihood.sum(), leaf)
                clean = clean + scale * mu * finite(grad, guidance, level, "mu")
            clean = clean - start
    if (
        clean is not None and guidance.x0_update == "keep_sample"
    ):  # UGD: x_t kept, eps' = eps - (alpha / sigma) Delta_0
        sample_shift = -(level.alpha / level.sigma) * clean
        return TrainingFreeUpdate(sample_shift if shift is None else shift + sample_shift, None)
    return TrainingFreeUpdate(shift, clean)


def apply_update(
    family: ModelFamily, output: torch.Tensor, x: torch.Tensor, level: NoiseLevel, update: TrainingFreeUpdate
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the sampler's state, the network output) the step takes: the output shifted by the eps shift
    (`ModelFamily.shift_output`), then, for Delta_0 with the noise kept, the state moved by scale alpha Delta_0 and the
    output re-derived so it predicts x0_hat + Delta_0 with the same eps there."""
    if update.noise_shift is not None:
        output = family.shift_output(output, update.noise_shift.to(output.dtype), x, level)
    if update.clean_shift is None:
        return x, output
    clean = family.predicted_clean(output, x, level) + update.clean_shift
    x = x + (level.scale * level.alpha) * update.clean_shift.to(x.dtype)
    return x, family.output_from_clean(clean, x, level)


def check_training_free(guidance: TFG, family: ModelFamily, guidance_batch_size: int | None = None) -> None:
    """Fails, naming the setting, on what a `TFG` run cannot take: recurrence on a multi-evaluation step
    (`check_recurrence`), or `guidance_batch_size` (its gradients run through the denoiser's whole batch)."""
    check_recurrence(family, guidance.recurrence)
    if guidance_batch_size is not None:
        raise ValueError(
            f"`guidance_batch_size`={guidance_batch_size} chunks a guidance gradient taken after the denoiser, but "
            f"{type(guidance).__name__} differentiates through the denoiser's batch at once; leave it None."
        )
