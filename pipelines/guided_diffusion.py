"""Guided sampling for any diffusers UNet and scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import PIL.Image
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from plugguide.pipelines.finite import check_finite_samples, check_scale
from plugguide.pipelines.guidance.base import Guidance


@dataclass
class GuidedSamplesOutput(BaseOutput):
    """Samples of a guided run.

    Args:
        images: PIL images, a (B, H, W, C) numpy array in [0, 1], or a (B, C, H, W) tensor in [0, 1].
        class_labels: the target class of each sample, -1 where none.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    class_labels: torch.Tensor


LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


def step_variance(scheduler, timestep: int, predicted_variance: torch.Tensor | None = None) -> float | torch.Tensor:
    """Variance Sigma_t of the ancestral DDPM step t -> previous timestep.

    Fixed-variance schedulers: beta tilde ("fixed_small"), a number. Learned-variance UNets (ADM, DiT; the
    scheduler's `variance_type` "learned_range" or "learned") predict it per pixel: "learned_range" interpolates
    log beta tilde and log beta_t with `frac = (v + 1) / 2` (Nichol & Dhariwal, 2021, eq. 15), as diffusers'
    `DDPMScheduler.step` samples it; "learned" is the variance itself.
    """
    prev = scheduler.previous_timestep(timestep) if hasattr(scheduler, "previous_timestep") else timestep - 1
    abar_t = scheduler.alphas_cumprod[timestep]
    abar_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
    beta_t = 1 - abar_t / abar_prev
    beta_tilde = (1 - abar_prev) / (1 - abar_t) * beta_t
    variance_type = getattr(scheduler.config, "variance_type", None)
    if predicted_variance is None or variance_type not in LEARNED_VARIANCE_TYPES:
        return float(beta_tilde)
    if variance_type == "learned":
        return predicted_variance
    frac = (predicted_variance + 1) / 2
    beta_tilde, beta_t = beta_tilde.to(predicted_variance), beta_t.to(predicted_variance)
    return torch.exp(frac * beta_t.log() + (1 - frac) * beta_tilde.clamp_min(1e-20).log())


class GuidedDiffusionPipeline(DiffusionPipeline):
    """Samples a UNet with a diffusers scheduler, optionally with CFG and with a classifier-type guidance.

    Guidance is applied as in Dhariwal & Nichol (2021): for ancestral `DDPMScheduler` steps the mean is
    shifted, `mean += s * Sigma_t * grad`; for every other (eps-consuming) scheduler the noise is,
    `eps -= s * sqrt(1 - abar_t) * grad`, so DDIM, DPM-Solver++ and friends come from diffusers as they are.

    Class-conditional UNets (`UNet2DConditionModel` with `num_class_embeds` = classes + 1, the last index
    being the null class) use classifier-free guidance `eps = (1 + w) eps(c) - w eps(null)` when
    `cfg_scale` w > 0. With `cfg_guidance="normalized"` classifier guidance joins CFG as in the DiT setting
    of Ma et al. (2023, Algorithm 3): the classifier's eps direction `g = -sqrt(1 - abar_t) * grad` is
    rescaled to the norm of the CFG difference `d = eps(c) - eps(null)` and added to it,
    `eps = eps(null) + (1 + w) * (d + s * g * ||d|| / ||g||)` (per sample; the schedule multiplies s).

    Latent diffusion (Stable Diffusion, DiT-style): with a `vae` (diffusers `AutoencoderKL`) the UNet works on
    latents; the pixel-space classifier sees `vae.decode(x0_hat / scaling_factor)` (or the decoded x_t),
    clipped to [-1, 1], and its gradient flows back through the decoder to the latent (Ma et al., 2023,
    section 5.3: the decoder is part of the classifier). Outputs are decoded images.

    Args:
        unet: `UNet2DModel` (unconditional), class-conditional `UNet2DConditionModel`, or a class-conditional
            DiT (`DiTTransformer2DModel`, null class `num_embeds_ada_norm`).
        scheduler: a variance-preserving diffusers scheduler (see `SUPPORTED_SCHEDULERS`).
        guidance: a `Guidance`, or None for unguided / CFG-only sampling.
        vae: an `AutoencoderKL` for latent UNets, or None for pixel-space UNets.
        cfg_guidance: how classifier guidance combines with CFG: `"shift"` (the usual mean / eps shift on
            the CFG noise) or `"normalized"` (the DiT rule above; needs `cfg_scale` > 0).
    """

    def __init__(self, unet, scheduler, guidance: Guidance | None = None, vae=None, cfg_guidance: str = "shift") -> None:
        super().__init__()
        if getattr(scheduler, "init_noise_sigma", 1.0) != 1.0:
            raise ValueError(f"`scheduler` {type(scheduler).__name__} works in sigma space; use a variance-preserving one (DDPM, DDIM, DPM-Solver, UniPC).")
        if isinstance(scheduler, DDPMScheduler) and scheduler.config.variance_type in LEARNED_VARIANCE_TYPES and unet.config.out_channels != 2 * unet.config.in_channels:
            raise ValueError(
                f"`scheduler` has variance_type={scheduler.config.variance_type!r}, which reads a predicted variance from the UNet, "
                f"but the UNet has {unet.config.out_channels} output channels for {unet.config.in_channels} input channels (expected twice as many)."
            )
        if cfg_guidance not in ("shift", "normalized"):
            raise ValueError(f"Expected `cfg_guidance` to be 'shift' or 'normalized', but got {cfg_guidance!r}.")
        self.register_modules(unet=unet, scheduler=scheduler)
        if vae is not None:
            self.register_modules(vae=vae)
        else:
            self.vae = None
        self.guidance = guidance
        self.cfg_guidance = cfg_guidance

    @property
    def is_class_conditional(self) -> bool:
        if isinstance(self.unet, UNet2DConditionModel):
            return self.unet.config.num_class_embeds is not None
        return getattr(self.unet.config, "num_embeds_ada_norm", None) is not None  # DiT: class-conditional transformer

    @property
    def null_class(self) -> int:
        """Index of the null (unconditional) class: the last embedding of a UNet, index `num_embeds_ada_norm` of a DiT."""
        if isinstance(self.unet, UNet2DConditionModel):
            return self.unet.config.num_class_embeds - 1
        return self.unet.config.num_embeds_ada_norm

    def _conditional_noise(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(self.unet, UNet2DConditionModel):
            return self.unet(x, timesteps, None, class_labels=labels).sample
        return self.unet(x, timestep=timesteps, class_labels=labels).sample

    def predict_noise(
        self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None, cfg_scale: float, return_parts: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """(eps_theta(x_t, t[, c]), predicted variance), with classifier-free guidance when `cfg_scale` > 0.

        The variance is the extra output channels of learned-variance UNets (ADM, DiT: 2C outputs), taken from
        the conditional branch as diffusers' DiT pipeline does, and None for UNets with C outputs. With
        `return_parts` and `cfg_scale` > 0, returns (eps(null), eps(c) - eps(null), variance) instead.
        """
        timesteps = t.expand(x.shape[0])
        channels = x.shape[1]
        if not self.is_class_conditional:
            output = self.unet(x, timesteps).sample
        else:
            null = torch.full_like(timesteps, self.null_class)
            labels = null if class_labels is None else torch.where(class_labels >= 0, class_labels, null)
            if cfg_scale > 0:
                output, uncond_output = self._conditional_noise(torch.cat([x, x]), torch.cat([timesteps, timesteps]), torch.cat([labels, null])).chunk(2)
                cond, uncond = output[:, :channels], uncond_output[:, :channels]
                if return_parts:
                    return uncond, cond - uncond, self._variance(output, channels)
                output = torch.cat([(1 + cfg_scale) * cond - cfg_scale * uncond, output[:, channels:]], dim=1)
            else:
                output = self._conditional_noise(x, timesteps, labels)
        return output[:, :channels], self._variance(output, channels)

    @staticmethod
    def _variance(output: torch.Tensor, channels: int) -> torch.Tensor | None:
        return output[:, channels:] if output.shape[1] > channels else None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (unclipped) of latents through the VAE decoder; the identity without a VAE."""
        if self.vae is None:
            return latents
        return self.vae.decode(latents / getattr(self.vae.config, "scaling_factor", 1.0)).sample

    def guidance_gradient(self, x: torch.Tensor, t: torch.Tensor, x0_hat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The guidance gradient w.r.t. x_t's space; through the VAE decoder for latent UNets (a vector-Jacobian product)."""
        timesteps = t.expand(x.shape[0])
        if self.vae is None:
            return self.guidance.gradient(x, timesteps, x0_hat, labels)
        with torch.inference_mode(False), torch.enable_grad():
            latent = (x if self.guidance.input == "x_t" else x0_hat).detach().clone().requires_grad_(True)
            pixels = self.decode(latent).clamp(-1, 1)
            pixel_grad = self.guidance.gradient(pixels, timesteps, pixels, labels)
            (grad,) = torch.autograd.grad(pixels, latent, pixel_grad)
        return grad

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        batch_size: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 0.0,
        cfg_scale: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> GuidedSamplesOutput | tuple:
        """Generates one image per entry of `class_labels` (or `batch_size` unlabelled ones).

        Args:
            class_labels: target class per sample (-1: none). Targets of the guidance (unless `targets` are
                given) and, for class-conditional UNets, their condition.
            targets: the guidance's targets when they are not class labels, one per sample: the target maps of a
                dense guide, (B, H, W) label maps or depth maps (`pipelines.tasks`).
            batch_size: number of samples when `class_labels` and `targets` are None.
            num_inference_steps: sampler steps.
            guidance_scale: classifier-guidance scale s (0: no classifier guidance).
            cfg_scale: classifier-free guidance weight w, for class-conditional UNets.
            generator: torch generator(s) for the initial noise and stochastic steps.
            output_type: "pil", "np" (B, H, W, C) in [0, 1], or "pt" (B, C, H, W) in [0, 1].
            return_dict: return a `GuidedSamplesOutput` instead of a tuple.
        """
        check_scale("guidance_scale", guidance_scale)
        check_scale("cfg_scale", cfg_scale)
        if cfg_scale > 0 and not self.is_class_conditional:
            raise ValueError(f"`cfg_scale`={cfg_scale} needs a class-conditional UNet2DConditionModel, but the UNet is {type(self.unet).__name__}.")
        if self.cfg_guidance == "normalized" and guidance_scale > 0 and cfg_scale <= 0:
            raise ValueError(f"`cfg_guidance`='normalized' adds the classifier gradient to the CFG difference and needs `cfg_scale` > 0, but got {cfg_scale}.")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"Expected `output_type` to be 'pil', 'np' or 'pt', but got {output_type!r}.")
        device = self.unet.device
        if class_labels is None:
            batch_size = len(targets) if batch_size is None and targets is not None else batch_size
            if batch_size is None:
                raise ValueError("Give `class_labels`, `targets` or `batch_size`.")
            labels = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        else:
            labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).flatten()
        if self.is_class_conditional and labels.numel() and int(labels.max()) >= self.null_class:
            # The null class is the UNet's unconditional embedding, not a class: asking for it scores unconditional samples as a class.
            raise ValueError(
                f"`class_labels` has class {int(labels.max())}, but the class-conditional UNet knows classes 0..{self.null_class - 1} "
                f"(index {self.null_class} is its null class, used for classifier-free guidance)."
            )
        guided = self.guidance is not None and guidance_scale > 0
        guidance_targets = labels if targets is None else torch.as_tensor(targets, device=device)
        if len(guidance_targets) != len(labels):
            raise ValueError(f"Expected one target per sample, but got {len(guidance_targets)} `targets` for {len(labels)} samples.")
        if guided:
            self.guidance.check_targets(guidance_targets)  # a class per sample, or a map per sample: the guidance's task says
            self.guidance.to(device)

        config = self.unet.config
        shape = (labels.shape[0], config.in_channels, config.sample_size, config.sample_size)
        x = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        ancestral = isinstance(self.scheduler, DDPMScheduler)
        learned_variance = ancestral and self.scheduler.config.variance_type in LEARNED_VARIANCE_TYPES
        alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        num_train = self.scheduler.config.num_train_timesteps
        normalized = guided and self.cfg_guidance == "normalized"
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(x, t)
            if normalized:
                uncond, difference, predicted_variance = self.predict_noise(model_input, t, labels, cfg_scale, return_parts=True)
                eps = uncond + (1 + cfg_scale) * difference
            else:
                eps, predicted_variance = self.predict_noise(model_input, t, labels, cfg_scale)
            shift = None
            if guided:
                abar = alphas_cumprod[t]
                x0_hat = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
                if self.vae is None:
                    x0_hat = x0_hat.clamp(-1, 1)  # latents have no fixed range; their decoded pixels are clipped
                grad = self.guidance_gradient(x, t, x0_hat, guidance_targets)
                variance = step_variance(self.scheduler, int(t), predicted_variance)
                scale = guidance_scale * self.guidance.scale_multiplier(int(t), float(torch.as_tensor(variance).mean()), num_train)
                if normalized:
                    direction = -(1 - abar).sqrt() * grad
                    ratio = difference.flatten(1).norm(dim=1) / direction.flatten(1).norm(dim=1).clamp_min(1e-12)
                    eps = uncond + (1 + cfg_scale) * (difference + scale * ratio.view(-1, *[1] * (x.dim() - 1)) * direction)
                elif ancestral:
                    shift = scale * variance * grad
                else:
                    eps = eps - scale * (1 - abar).sqrt() * grad
            # A learned-variance DDPM step reads the variance from the channels after eps, as diffusers splits them.
            output = torch.cat([eps, predicted_variance], dim=1) if learned_variance else eps
            x = self.scheduler.step(output, t, x, generator=generator).prev_sample
            if shift is not None:
                x = x + shift
            check_finite_samples(x, t, self.scheduler.timesteps)

        if self.vae is not None:
            x = self.decode(x)
        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).float().cpu().numpy()
        elif output_type == "pil":
            images = self.numpy_to_pil(images.permute(0, 2, 3, 1).float().cpu().numpy())
        if not return_dict:
            return (images, labels)
        return GuidedSamplesOutput(images=images, class_labels=labels)
