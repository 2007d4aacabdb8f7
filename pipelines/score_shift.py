"""The classifier-guidance score shift of one denoiser evaluation, shared by `GuidedDiffusionPipeline` and `guided`.

At one evaluation (a `NoiseLevel` of `ModelFamily`), guidance takes its gradient on x_t or on x0_hat, through the VAE
decoder for latent models (Ma et al., 2023, section 5.3: the decoder is part of the classifier), and shifts the score,
eps' = eps - s sigma grad (Dhariwal & Nichol, 2021, "condition_score"); `ModelFamily.shift_output` turns the shift into
the network's own output.
"""

from __future__ import annotations

import torch

from plugguide.pipelines.guidance.base import Guidance
from plugguide.pipelines.model_family import ModelFamily, NoiseLevel


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] (unclipped) of latents through the VAE decoder, `vae.decode(latents / scaling + shift)`, in
    the VAE's dtype; the shift (`shift_factor`, SD3 and Flux) only where the VAE has one; the identity without a VAE."""
    if vae is None:
        return latents
    latents = latents.to(vae.dtype) / getattr(vae.config, "scaling_factor", 1.0)
    shift = getattr(vae.config, "shift_factor", None)
    return vae.decode(latents if shift is None else latents + shift).sample


def guidance_gradient(
    guidance: Guidance,
    vae,
    x: torch.Tensor,
    t: torch.Tensor,
    x0_hat: torch.Tensor,
    targets: torch.Tensor,
    *,
    decode=None,
) -> torch.Tensor:
    """The guidance gradient w.r.t. x_t's space; through the VAE decoder for latent models (a vector-Jacobian product).

    Args:
        guidance (`Guidance`): the `Guidance`.
        vae: an `AutoencoderKL` for latent models, or None in pixel space.
        x (`torch.Tensor`): x_t (B, ...).
        t (`torch.Tensor`): the train timestep, a 0-d tensor.
        x0_hat (`torch.Tensor`): the predicted clean image (clipped to [-1, 1] in pixel space).
        targets (`torch.Tensor`): one target per sample.
        decode: latents -> pixels; None: `decode_latents(vae, .)` (a pipeline whose latents are packed passes its own).
    """
    timesteps = t.expand(x.shape[0])
    if vae is None:
        return guidance.gradient(x, timesteps, x0_hat, targets)
    decode = decode or (lambda latents: decode_latents(vae, latents))
    with torch.inference_mode(False), torch.enable_grad():
        latent = (x if guidance.input == "x_t" else x0_hat).detach().clone().requires_grad_(True)
        pixels = decode(latent).clamp(-1, 1)
        pixel_grad = guidance.gradient(pixels, timesteps, pixels, targets)
        (grad,) = torch.autograd.grad(pixels, latent, pixel_grad)
    return grad


def clean_estimate(
    family: ModelFamily, output: torch.Tensor, x: torch.Tensor, level: NoiseLevel, clip_first: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, output): with `clip_first` (a sampler that clips x0_hat, stepping as its unclipped copy) x0_hat is
    clipped as the sampler would and the output re-derived from it, guided-diffusion's order (clip, then shift)."""
    x0_hat = family.predicted_clean(output, x, level)
    if clip_first:
        x0_hat = family.clip(x0_hat)
        output = family.output_from_clean(x0_hat, x, level)
    return x0_hat, output


def level_gradient(
    guidance: Guidance,
    vae,
    x: torch.Tensor,
    level: NoiseLevel,
    x0_hat: torch.Tensor,
    targets: torch.Tensor,
    *,
    decode=None,
) -> torch.Tensor:
    """grad log p(y | .) at one evaluation: on x_t = x / scale, or on x0_hat (`guided_clean_estimate`), at the level's
    train timestep."""
    return guidance_gradient(
        guidance,
        vae,
        x / level.scale,
        torch.tensor(level.timestep, device=x.device),
        guided_clean_estimate(vae, x0_hat),
        targets,
        decode=decode,
    )


def guided_clean_estimate(vae, x0_hat: torch.Tensor) -> torch.Tensor:
    """x0_hat as guidance reads it: clipped to [-1, 1] in pixel space; latents have no fixed range (their decoded
    pixels are clipped)."""
    return x0_hat if vae is not None else x0_hat.clamp(-1, 1)


def predicted_shift(
    guidance: Guidance,
    vae,
    x: torch.Tensor,
    level: NoiseLevel,
    x0_hat: torch.Tensor,
    targets: torch.Tensor,
    scale: float,
) -> torch.Tensor | None:
    """The eps shift a guidance predicts in one pass (`Guidance.predicted_shift`), from x_t = x / scale and x0_hat
    (`guided_clean_estimate`, as the gradient path sees it), or None for a guidance that takes a gradient."""
    return guidance.predicted_shift(x / level.scale, level, guided_clean_estimate(vae, x0_hat), targets, scale)


def noise_shift(grad: torch.Tensor, level: NoiseLevel, scale: float) -> torch.Tensor:
    """The score shift in eps units, s * (-sigma grad): eps' = eps + this."""
    return scale * (-level.sigma * grad)
