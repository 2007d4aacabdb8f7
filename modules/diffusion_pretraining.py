"""Training the embedded diffusion models: unconditional, and class-conditional with label dropout for CFG."""

from __future__ import annotations

import copy

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMPipeline, SchedulerMixin, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from plugguide.models.diffusion_model import load_unet
from plugguide.models.saving import save_atomically
from plugguide.models.seeding import step_generator
from plugguide.pipelines.guided_diffusion import GuidedDiffusionPipeline
from plugguide.pipelines.model_family import ModelFamily

EXPORT_DTYPES = ("float32", "float16")


def training_example(
    family: ModelFamily, x0: torch.Tensor, noise: torch.Tensor, draws: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy input, timesteps, regression target) of denoising training at integer `draws` in [0, T), for a
    `DDPMScheduler` or `FlowMatchEulerDiscreteScheduler` that has not been `set_timesteps` (its training table).

    vp: t = draw, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, target eps / v / x0 by `prediction_type`
    (Ho et al., 2020; Salimans & Ho, 2022). flow: entry `draw` of the scheduler's training table (s, t = s T),
    x = (1 - s) x0 + s eps, target the velocity eps - x0 (rectified flow, Liu et al., 2022; as diffusers' SD3 training).

    Args:
        family (`ModelFamily`): the forward process's family, built on the training scheduler.
        x0 (`Tensor`): clean images (B, C, H, W).
        noise (`Tensor`): standard-normal noise of the same shape.
        draws (`Tensor`): integer draws in [0, T), one per image.
    """
    if family.kind == "flow":
        timesteps = family.scheduler.timesteps.to(x0.device)[draws]
        s = family.scheduler.sigmas.to(x0.device)[draws].view(-1, *[1] * (x0.dim() - 1))
        return (1 - s) * x0 + s * noise, timesteps, noise - x0
    target = {"epsilon": noise, "sample": x0}.get(family.prediction_type)
    if target is None:
        target = family.scheduler.get_velocity(x0, noise, draws)
    return family.scheduler.add_noise(x0, noise, draws), draws, target


class DiffusionPretraining(L.LightningModule):
    """Denoising score matching (Ho et al., 2020): minimise ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)||^2,
    or rectified flow (Liu et al., 2022): ||(eps - x0) - v_theta((1 - s) x0 + s eps, s T)||^2.

    The noise schedule chooses: a `DDPMScheduler` trains its `prediction_type` (eps, v or x0), a
    `FlowMatchEulerDiscreteScheduler` the flow velocity (`training_example` holds both forward processes).

    A `UNet2DModel` gives the unconditional model. A `UNet2DConditionModel` with
    `num_class_embeds = num_classes + 1` gives the class-conditional one: labels are replaced by the
    null class (the last index) with probability `label_dropout`, so one network learns eps(x, c) and
    eps(x, null) for classifier-free guidance. EMA weights come from Lightning's `EMAWeightAveraging`
    callback (configs/pretrain/); `export` writes a diffusers pipeline directory.

    With `min_snr_gamma` the per-example loss is weighted by `min(SNR_t, gamma) / SNR_t` (Hang et al., 2023,
    "Efficient Diffusion Training via Min-SNR Weighting Strategy", eps-prediction form): the many nearly clean
    timesteps, whose eps is hard to predict and matters little to samples, stop dominating the gradient (for v- and
    x0-prediction, divided by SNR + 1 and 1, as in diffusers' training examples).

    Args:
        unet (`nn.Module`): the denoiser.
        noise_scheduler (`SchedulerMixin`): the forward process (`DDPMScheduler`: betas, T;
            `FlowMatchEulerDiscreteScheduler`: flow), saved with the model.
        optimizer (`OptimizerCallable`, defaults to `torch.optim.AdamW`): optimiser factory.
        lr_scheduler (`LRSchedulerCallable`, *optional*): optional learning-rate schedule factory, stepped every
            optimizer step (e.g. `OneCycleLR`).
        min_snr_gamma (`float`, *optional*): gamma of Min-SNR loss weighting; None trains on the plain eps-MSE.
        num_classes (`int`, *optional*): number of real classes for a class-conditional UNet; None for unconditional.
        label_dropout (`float`, defaults to 0.1): probability of training a sample on the null class.
        pretrained_path (`str`, *optional*): diffusers pipeline directory whose UNet weights initialise `unet`
            (fine-tuning); the architectures must match.
        seed (`int`, defaults to 0): seed of the training steps' noise, timesteps and label dropout (with the step and
            the rank), so that a resumed run draws exactly what an uninterrupted one would.
        export_dtype (`str`, defaults to `"float32"`): the dtype the exported UNet weights are stored in: "float32", or
            "float16" for half the bytes (diffusers loads them back as float32; flow-uncond's quality in
            docs/results/assets.md).
    """

    def __init__(
        self,
        unet: nn.Module,
        noise_scheduler: SchedulerMixin,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        min_snr_gamma: float | None = None,
        num_classes: int | None = None,
        label_dropout: float = 0.1,
        pretrained_path: str | None = None,
        seed: int = 0,
        export_dtype: str = "float32",
    ) -> None:
        super().__init__()
        self.conditional = isinstance(unet, UNet2DConditionModel)
        if self.conditional:
            if num_classes is None or unet.config.num_class_embeds != num_classes + 1:
                raise ValueError(
                    f"A class-conditional UNet needs `unet.num_class_embeds` = `num_classes` + 1 (the null class); "
                    f"got num_class_embeds={unet.config.num_class_embeds}, num_classes={num_classes}."
                )
        elif num_classes is not None:
            raise ValueError(
                f"`num_classes`={num_classes} is only for a UNet2DConditionModel, but the UNet is {type(unet).__name__}."
            )
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"Expected `label_dropout` to be in [0, 1), but got {label_dropout}.")
        if seed < 0:
            raise ValueError(f"Expected `seed` to be >= 0, but got {seed}.")
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise ValueError(f"Expected `min_snr_gamma` to be > 0 or None, but got {min_snr_gamma}.")
        if export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"Expected `export_dtype` to be one of {EXPORT_DTYPES}, but got {export_dtype!r}.")
        self.save_hyperparameters(ignore=["unet", "noise_scheduler", "optimizer", "lr_scheduler"])
        if pretrained_path is not None:
            unet.load_state_dict(load_unet(pretrained_path, "pretrained_path").state_dict())
        self.unet = unet
        self.family = ModelFamily(noise_scheduler)
        if not (self.family.ancestral or self.family.kind == "flow"):
            raise ValueError(
                f"Expected `noise_scheduler` to be a DDPMScheduler or FlowMatchEulerDiscreteScheduler (the forward process), but got {type(noise_scheduler).__name__}."
            )
        if min_snr_gamma is not None and self.family.kind == "flow":
            raise ValueError(
                "`min_snr_gamma` weights a DDPMScheduler's timesteps by their SNR; the flow objective has no such weighting here: set it to None."
            )
        self.noise_scheduler = noise_scheduler
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler

    def _step(self, batch: dict, stage: str, generator: torch.Generator | None = None) -> torch.Tensor:
        images = batch["image"]
        noise = torch.randn(images.shape, generator=generator, device=images.device)
        draws = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (images.shape[0],),
            generator=generator,
            device=images.device,
        )
        noisy, timesteps, target = training_example(self.family, images, noise, draws)
        if self.conditional:
            labels = batch["label"]
            if stage == "train":
                dropped = (
                    torch.rand(labels.shape, generator=generator, device=labels.device) < self.hparams.label_dropout
                )
                labels = torch.where(dropped, torch.full_like(labels, self.hparams.num_classes), labels)
            prediction = self.unet(noisy, timesteps, None, class_labels=labels).sample
        else:
            prediction = self.unet(noisy, timesteps).sample
        loss = F.mse_loss(prediction, target, reduction="none").flatten(1).mean(1)
        if self.hparams.min_snr_gamma is not None:
            loss = loss * self.min_snr_weight(timesteps)
        loss = loss.mean()
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=stage != "train")
        return loss

    def min_snr_weight(self, timesteps: torch.Tensor) -> torch.Tensor:
        """min(SNR, gamma) divided by the SNR's factor in the trained target's loss: SNR for eps, SNR + 1 for v, 1 for x0."""
        snr = compute_snr(self.noise_scheduler, timesteps)
        clipped = snr.clamp(max=self.hparams.min_snr_gamma)
        prediction_type = self.noise_scheduler.config.prediction_type
        return clipped / {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[prediction_type]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(
            batch,
            "train",
            step_generator(self.hparams.seed, self.global_step, self.global_rank, batch["image"].device),
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Fixed noise and timesteps, so validation losses of different epochs compare.
        self._step(batch, "val", torch.Generator(batch["image"].device).manual_seed(batch_idx))

    def configure_optimizers(self):
        optimizer = self.optimizer(self.unet.parameters())
        if self.lr_scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"},
        }

    def sampling_pipeline(self) -> GuidedDiffusionPipeline:
        """The current model with a DDIM sampler (flow models: their own Euler sampler), for sample grids."""
        sampler = DDIMScheduler if self.family.kind == "vp" else type(self.noise_scheduler)
        return GuidedDiffusionPipeline(self.unet, sampler.from_config(self.noise_scheduler.config))

    def export(self, directory: str) -> None:
        """Writes a diffusers pipeline directory (unet/, scheduler/), the layout of hub DDPM models, in `export_dtype`."""
        unet = self.unet if self.hparams.export_dtype == "float32" else copy.deepcopy(self.unet).half()
        save_atomically(directory, DDPMPipeline(unet=unet, scheduler=self.noise_scheduler).save_pretrained)
