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


def step_variance(scheduler, timestep: int) -> float:
    """Variance of the ancestral DDPM step t -> previous timestep (beta tilde, "fixed_small")."""
    prev = scheduler.previous_timestep(timestep) if hasattr(scheduler, "previous_timestep") else timestep - 1
    abar_t = scheduler.alphas_cumprod[timestep]
    abar_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
    return float((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))


class GuidedDiffusionPipeline(DiffusionPipeline):
    """Samples a UNet with a diffusers scheduler, optionally with CFG and with a classifier-type guidance.

    Guidance is applied as in Dhariwal & Nichol (2021): for ancestral `DDPMScheduler` steps the mean is
    shifted, `mean += s * Sigma_t * grad`; for every other (eps-consuming) scheduler the noise is,
    `eps -= s * sqrt(1 - abar_t) * grad`, so DDIM, DPM-Solver++ and friends come from diffusers as they are.

    Class-conditional UNets (`UNet2DConditionModel` with `num_class_embeds` = classes + 1, the last index
    being the null class) use classifier-free guidance `eps = (1 + w) eps(c) - w eps(null)` when
    `cfg_scale` w > 0.

    Args:
        unet: `UNet2DModel` (unconditional) or class-conditional `UNet2DConditionModel`.
        scheduler: a variance-preserving diffusers scheduler (see `SUPPORTED_SCHEDULERS`).
        guidance: a `Guidance`, or None for unguided / CFG-only sampling.
    """

    def __init__(self, unet, scheduler, guidance: Guidance | None = None) -> None:
        super().__init__()
        if getattr(scheduler, "init_noise_sigma", 1.0) != 1.0:
            raise ValueError(f"`scheduler` {type(scheduler).__name__} works in sigma space; use a variance-preserving one (DDPM, DDIM, DPM-Solver, UniPC).")
        self.register_modules(unet=unet, scheduler=scheduler)
        self.guidance = guidance

    @property
    def is_class_conditional(self) -> bool:
        return isinstance(self.unet, UNet2DConditionModel) and self.unet.config.num_class_embeds is not None

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None, cfg_scale: float) -> torch.Tensor:
        """eps_theta(x_t, t[, c]), with classifier-free guidance when `cfg_scale` > 0."""
        timesteps = t.expand(x.shape[0])
        if not self.is_class_conditional:
            eps = self.unet(x, timesteps).sample
        else:
            null = torch.full_like(timesteps, self.unet.config.num_class_embeds - 1)
            labels = null if class_labels is None else torch.where(class_labels >= 0, class_labels, null)
            if cfg_scale > 0:
                both = self.unet(torch.cat([x, x]), torch.cat([timesteps, timesteps]), None, class_labels=torch.cat([labels, null])).sample
                cond, uncond = both.chunk(2)
                eps = (1 + cfg_scale) * cond - cfg_scale * uncond
            else:
                eps = self.unet(x, timesteps, None, class_labels=labels).sample
        return eps[:, : x.shape[1]]  # learned-variance UNets put the variance in the second half

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | torch.Tensor | None = None,
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
            class_labels: target class per sample (-1: none). Targets of the guidance and, for
                class-conditional UNets, their condition.
            batch_size: number of samples when `class_labels` is None.
            num_inference_steps: sampler steps.
            guidance_scale: classifier-guidance scale s (0: no classifier guidance).
            cfg_scale: classifier-free guidance weight w, for class-conditional UNets.
            generator: torch generator(s) for the initial noise and stochastic steps.
            output_type: "pil", "np" (B, H, W, C) in [0, 1], or "pt" (B, C, H, W) in [0, 1].
            return_dict: return a `GuidedSamplesOutput` instead of a tuple.
        """
        if guidance_scale < 0:
            raise ValueError(f"Expected `guidance_scale` to be >= 0, but got {guidance_scale}.")
        if cfg_scale < 0:
            raise ValueError(f"Expected `cfg_scale` to be >= 0, but got {cfg_scale}.")
        if cfg_scale > 0 and not self.is_class_conditional:
            raise ValueError(f"`cfg_scale`={cfg_scale} needs a class-conditional UNet2DConditionModel, but the UNet is {type(self.unet).__name__}.")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"Expected `output_type` to be 'pil', 'np' or 'pt', but got {output_type!r}.")
        device = self.unet.device
        if class_labels is None:
            if batch_size is None:
                raise ValueError("Give `class_labels` or `batch_size`.")
            labels = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        else:
            labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).flatten()
        guided = self.guidance is not None and guidance_scale > 0
        if guided and bool((labels < 0).any()):
            raise ValueError("Classifier guidance needs a target class for every sample; `class_labels` has -1 entries.")
        if guided:
            num_classes = getattr(self.guidance, "num_classes", None)
            if num_classes is not None and int(labels.max()) >= num_classes:
                raise ValueError(f"`class_labels` has class {int(labels.max())}, but the guidance classifier has only {num_classes} classes.")
            self.guidance.to(device)

        config = self.unet.config
        shape = (labels.shape[0], config.in_channels, config.sample_size, config.sample_size)
        x = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        ancestral = isinstance(self.scheduler, DDPMScheduler)
        alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        num_train = self.scheduler.config.num_train_timesteps
        for t in self.progress_bar(self.scheduler.timesteps):
            eps = self.predict_noise(self.scheduler.scale_model_input(x, t), t, labels, cfg_scale)
            shift = None
            if guided:
                abar = alphas_cumprod[t]
                x0_hat = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
                grad = self.guidance.gradient(x, t.expand(x.shape[0]), x0_hat, labels)
                variance = step_variance(self.scheduler, int(t))
                scale = guidance_scale * self.guidance.scale_multiplier(int(t), variance, num_train)
                if ancestral:
                    shift = scale * variance * grad
                else:
                    eps = eps - scale * (1 - abar).sqrt() * grad
            x = self.scheduler.step(eps, t, x, generator=generator).prev_sample
            if shift is not None:
                x = x + shift

        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).float().cpu().numpy()
        elif output_type == "pil":
            images = self.numpy_to_pil(images.permute(0, 2, 3, 1).float().cpu().numpy())
        if not return_dict:
            return (images, labels)
        return GuidedSamplesOutput(images=images, class_labels=labels)
