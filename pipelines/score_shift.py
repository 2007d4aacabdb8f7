"""The classifier-guidance score shift of one denoiser evaluation, shared by `GuidedDiffusionPipeline` and `guided`.

At one evaluation (a `NoiseLevel` of `ModelFamily`), guidance takes its gradient on x_t or on x0_hat, through the VAE
decoder for latent models (Ma et al., 2023, section 5.3: the decoder is part of the classifier), and shifts the score,
eps' = eps - s sigma grad (Dhariwal & Nichol, 2021, "condition_score"); `ModelFamily.shift_output` turns the shift into
the network's own output.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from plugguide.pipelines.guidance.base import Guidance
from plugguide.pipelines.model_family import ModelFamily, NoiseLevel


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] (unclipped) of latents through the VAE decoder, `vae.decode(latents / scaling + shift)`, in
    the VAE's dtype (float32 inside `upcast_decoder` for a float16 VAE that sets `force_upcast`); the shift
    (`shift_factor`, SD3 and Flux) only where the VAE has one; the identity without a VAE."""
    if vae is None:
        return latents
    latents = latents.to(vae.dtype) / getattr(vae.config, "scaling_factor", 1.0)
    shift = getattr(vae.config, "shift_factor", None)
    return vae.decode(latents if shift is None else latents + shift).sample


@contextlib.contextmanager
def upcast_decoder(vae) -> Iterator[None]:
    """A float16 VAE whose config sets `force_upcast` (SDXL's) in float32 for the block, float16 again after it.

    diffusers' SDXL pipeline decodes so because that decoder's activations overflow float16 (inf, then NaN after its
    group norms); a guidance gradient through it needs the same, for the forward pass and for the backward pass
    (which re-runs checkpointed blocks), so the block holds both. The cast is exact both ways (every float16 is a
    float32). Any other VAE, or None, is left as it is.
    """
    if vae is None or vae.dtype != torch.float16 or not getattr(vae.config, "force_upcast", False):
        yield
        return
    vae.to(torch.float32)
    try:
        yield
    finally:
        vae.to(torch.float16)


def check_decoder_options(
    vae,
    *,
    guidance_batch_size: int | None = None,
    guidance_vae=None,
    decoder_gradient_checkpointing: bool = False,
) -> None:
    """Fails, naming the setting, on memory options the guidance gradient cannot take (arguments as for `guided`).

    `guidance_vae` must decode the pipeline's latents: the same latent channels as `vae` (a tiny autoencoder of the
    same latent space, e.g. TAESD for SD 1.x, TAESDXL for SDXL; two spaces with the same channels cannot be told apart
    here). Gradient checkpointing needs a decoder that supports it (diffusers' `_supports_gradient_checkpointing`).
    """
    if guidance_batch_size is not None and (
        isinstance(guidance_batch_size, bool) or not isinstance(guidance_batch_size, int) or guidance_batch_size < 1
    ):
        raise ValueError(
            f"Expected `guidance_batch_size` to be an integer >= 1 (samples per guidance pass) or None (the whole "
            f"batch at once), but got {guidance_batch_size!r}."
        )
    if vae is None:
        for name, value in (
            ("guidance_vae", guidance_vae),
            ("decoder_gradient_checkpointing", decoder_gradient_checkpointing),
        ):
            if value not in (None, False):
                raise ValueError(
                    f"`{name}` acts on the VAE decoder of a latent model, but there is no `vae`: a pixel-space "
                    f"guidance gradient has no decoder."
                )
        return
    if guidance_vae is not None:
        channels, guidance_channels = (
            getattr(module.config, "latent_channels", None) for module in (vae, guidance_vae)
        )
        if channels != guidance_channels:
            raise ValueError(
                f"`guidance_vae` {type(guidance_vae).__name__} decodes latents of {guidance_channels} channels, but the "
                f"pipeline's `vae` {type(vae).__name__} has {channels}; give a tiny autoencoder of the same latent "
                f"space (e.g. `AutoencoderTiny` madebyollin/taesd for SD 1.x, madebyollin/taesdxl for SDXL)."
            )
    decoder = vae if guidance_vae is None else guidance_vae
    if decoder_gradient_checkpointing and not getattr(decoder, "_supports_gradient_checkpointing", False):
        raise ValueError(
            f"`decoder_gradient_checkpointing` needs a decoder that supports gradient checkpointing (diffusers' "
            f"`enable_gradient_checkpointing`), but {type(decoder).__name__} does not."
        )


_MISSING = object()


@contextlib.contextmanager
def decoder_checkpointing(vae) -> Iterator[None]:
    """Gradient checkpointing of `vae`'s blocks inside the block, and `vae` exactly as it was after it.

    diffusers' `enable_gradient_checkpointing` sets `gradient_checkpointing` and `_gradient_checkpointing_func` on
    every submodule that has the flag; its decoders checkpoint when the flag is set and `torch.is_grad_enabled()`,
    whatever `self.training` says, so it takes effect on a VAE in eval mode under the guidance's `enable_grad`. A VAE
    that already checkpoints is left alone.
    """
    if vae.is_gradient_checkpointing:
        yield
        return
    modules = [module for module in vae.modules() if hasattr(module, "gradient_checkpointing")]
    saved = [(module, vars(module).get("_gradient_checkpointing_func", _MISSING)) for module in modules]
    vae.enable_gradient_checkpointing()
    try:
        yield
    finally:
        for module, function in saved:
            module.gradient_checkpointing = False
            if function is _MISSING:
                del module._gradient_checkpointing_func
            else:
                module._gradient_checkpointing_func = function


@contextlib.contextmanager
def guide_decoder(vae, decode=None, gradient_checkpointing: bool = False) -> Iterator:
    """latents -> the guide's pixels, decoded and clipped to [-1, 1] as `guidance_gradient` reads them, for a block
    that differentiates through the decoder (float32 for a `force_upcast` VAE, checkpointed where asked); in pixel
    space (no `vae`) `decode` as given (None: the guide reads x as it is)."""
    if vae is None:
        yield decode
        return
    decode = decode or (lambda latents: decode_latents(vae, latents))
    checkpointing = decoder_checkpointing(vae) if gradient_checkpointing else contextlib.nullcontext()
    with checkpointing, upcast_decoder(vae):
        yield lambda latents: decode(latents).clamp(-1, 1)


def guidance_gradient(
    guidance: Guidance,
    vae,
    x: torch.Tensor,
    t: torch.Tensor,
    x0_hat: torch.Tensor,
    targets: torch.Tensor,
    *,
    decode=None,
    batch_size: int | None = None,
    gradient_checkpointing: bool = False,
) -> torch.Tensor:
    """The guidance gradient w.r.t. x_t's space; through the VAE decoder for latent models (a vector-Jacobian product).

    The gradient of sum_i log p(y_i | x_i) is per sample, d/dx_i log p(y_i | x_i), so a batch taken in chunks of
    `batch_size` gives the same gradient as one pass (for a guide in eval mode, whose samples do not see each other)
    with the decoder's activations of one chunk in memory at a time.

    Args:
        guidance (`Guidance`): the `Guidance`.
        vae: the decoder the gradient goes through, an `AutoencoderKL` (or an `AutoencoderTiny` of the same latent
            space) for latent models, or None in pixel space.
        x (`torch.Tensor`): x_t (B, ...).
        t (`torch.Tensor`): the train timestep, a 0-d tensor.
        x0_hat (`torch.Tensor`): the predicted clean image (clipped to [-1, 1] in pixel space).
        targets (`torch.Tensor`): one target per sample.
        decode: latents -> pixels; None: `decode_latents(vae, .)` (a pipeline whose latents are packed passes its own).
        batch_size (`int`, *optional*): samples per decode + guide + backward pass; None: the whole batch at once.
        gradient_checkpointing (`bool`, defaults to False): recompute the decoder's block activations in the backward
            pass instead of keeping them (`decoder_checkpointing`), for this call only.
    """
    check_decoder_options(vae, guidance_batch_size=batch_size, decoder_gradient_checkpointing=gradient_checkpointing)
    if batch_size is not None and batch_size < x.shape[0]:
        with upcast_decoder(vae):  # once for all chunks
            return torch.cat(
                [
                    guidance_gradient(
                        guidance,
                        vae,
                        x[start : start + batch_size],
                        t,
                        x0_hat[start : start + batch_size],
                        targets[start : start + batch_size],
                        decode=decode,
                        gradient_checkpointing=gradient_checkpointing,
                    )
                    for start in range(0, x.shape[0], batch_size)
                ]
            )
    timesteps = t.expand(x.shape[0])
    if vae is None:
        return guidance.gradient(x, timesteps, x0_hat, targets)
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        guide_decoder(vae, decode, gradient_checkpointing) as pixels_of,
    ):
        latent = (x if guidance.input == "x_t" else x0_hat).detach().clone().requires_grad_(True)
        pixels = pixels_of(latent)
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
    batch_size: int | None = None,
    gradient_checkpointing: bool = False,
) -> torch.Tensor:
    """grad log p(y | .) at one evaluation: on x_t = x / scale, or on x0_hat (`guided_clean_estimate`), at the level's
    train timestep (`batch_size`, `gradient_checkpointing`: as for `guidance_gradient`)."""
    return guidance_gradient(
        guidance,
        vae,
        x / level.scale,
        torch.tensor(level.timestep, device=x.device),
        guided_clean_estimate(vae, x0_hat),
        targets,
        decode=decode,
        batch_size=batch_size,
        gradient_checkpointing=gradient_checkpointing,
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
