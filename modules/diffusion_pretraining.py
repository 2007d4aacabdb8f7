"""Training the embedded diffusion models: unconditional, and class-conditional with label dropout for CFG."""

from __future__ import annotations

import copy

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMPipeline, SchedulerMixin, UNet2DConditionModel
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from plugguide.datamodules.resumable_loader import step_generator
from plugguide.models.diffusion_model import load_unet
from plugguide.models.saving import save_atomically
from plugguide.pipelines.guided_diffusion import GuidedDiffusionPipeline
from plugguide.pipelines.model_family import ModelFamily

EXPORT_DTYPES = ("float32", "float16")


class DiffusionPretraining(L.LightningModule):
    """Denoising score matching (Ho et al., 2020): minimise ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)||^2,
    or rectified flow (Liu et al., 2022): ||(eps - x0) - v_theta((1 - s) x0 + s eps, s T)||^2.

    The noise schedule chooses: a `DDPMScheduler` trains its `prediction_type` (eps, v or x0), a
    `FlowMatchEulerDiscreteScheduler` the flow velocity (`ModelFamily.training_example` holds both forward processes).

    A `UNet2DModel` gives the unconditional model. A `UNet2DConditionModel` with
    `num_class_embeds = num_classes + 1` gives the class-conditional one: labels are replaced by the
    null class (the last index) with probability `label_dropout`, so one network learns eps(x, c) and
    eps(x, null) for classifier-free guidance. EMA weights come from Lightning's `EMAWeightAveraging`
    callback (configs/pretrain/); `export` writes a diffusers pipeline directory.

    Args:
        unet: the denoiser.
        noise_scheduler: the forward process (`DDPMScheduler`: betas, T; `FlowMatchEulerDiscreteScheduler`: flow), saved with the model.
        optimizer: optimiser factory.
        num_classes: number of real classes for a class-conditional UNet; None for unconditional.
        label_dropout: probability of training a sample on the null class.
        pretrained_path: diffusers pipeline directory whose UNet weights initialise `unet` (fine-tuning); the
            architectures must match.
        seed: seed of the training steps' noise, timesteps and label dropout (with the step and the rank), so
            that a resumed run draws exactly what an uninterrupted one would.
        export_dtype: the dtype the exported UNet weights are stored in: "float32", or "float16" for half the bytes
            (diffusers loads them back as float32; measured for flow-uncond in the README).
    """

    def __init__(
        self,
        unet: nn.Module,
        noise_scheduler: SchedulerMixin,
        optimizer: OptimizerCallable = torch.optim.AdamW,
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
            raise ValueError(f"`num_classes`={num_classes} is only for a UNet2DConditionModel, but the UNet is {type(unet).__name__}.")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"Expected `label_dropout` to be in [0, 1), but got {label_dropout}.")
        if seed < 0:
            raise ValueError(f"Expected `seed` to be >= 0, but got {seed}.")
        if export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"Expected `export_dtype` to be one of {EXPORT_DTYPES}, but got {export_dtype!r}.")
        self.save_hyperparameters(ignore=["unet", "noise_scheduler", "optimizer"])
        if pretrained_path is not None:
            unet.load_state_dict(load_unet(pretrained_path, "pretrained_path").state_dict())
        self.unet = unet
        self.family = ModelFamily(noise_scheduler)
        if not (self.family.ancestral or self.family.kind == "flow"):
            raise ValueError(f"Expected `noise_scheduler` to be a DDPMScheduler or FlowMatchEulerDiscreteScheduler (the forward process), but got {type(noise_scheduler).__name__}.")
        self.noise_scheduler = noise_scheduler
        self.optimizer = optimizer

    def _step(self, batch: dict, stage: str, generator: torch.Generator | None = None) -> torch.Tensor:
        images = batch["image"]
        noise = torch.randn(images.shape, generator=generator, device=images.device)
        draws = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (images.shape[0],), generator=generator, device=images.device)
        noisy, timesteps, target = self.family.training_example(images, noise, draws)
        if self.conditional:
            labels = batch["label"]
            if stage == "train":
                dropped = torch.rand(labels.shape, generator=generator, device=labels.device) < self.hparams.label_dropout
                labels = torch.where(dropped, torch.full_like(labels, self.hparams.num_classes), labels)
            prediction = self.unet(noisy, timesteps, None, class_labels=labels).sample
        else:
            prediction = self.unet(noisy, timesteps).sample
        loss = F.mse_loss(prediction, target)
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=stage != "train")
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", step_generator(self.hparams.seed, self.global_step, self.global_rank, batch["image"].device))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Fixed noise and timesteps, so validation losses of different epochs compare.
        self._step(batch, "val", torch.Generator(batch["image"].device).manual_seed(batch_idx))

    def configure_optimizers(self):
        return self.optimizer(self.unet.parameters())

    def sampling_pipeline(self) -> GuidedDiffusionPipeline:
        """The current model with a DDIM sampler (flow models: their own Euler sampler), for sample grids."""
        sampler = DDIMScheduler if self.family.kind == "vp" else type(self.noise_scheduler)
        return GuidedDiffusionPipeline(self.unet, sampler.from_config(self.noise_scheduler.config))

    def export(self, directory: str) -> None:
        """Writes a diffusers pipeline directory (unet/, scheduler/), the layout of hub DDPM models, in `export_dtype`."""
        unet = self.unet if self.hparams.export_dtype == "float32" else copy.deepcopy(self.unet).half()
        save_atomically(directory, DDPMPipeline(unet=unet, scheduler=self.noise_scheduler).save_pretrained)
