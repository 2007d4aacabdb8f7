"""Gradient guidance distilled into a one-pass guide: the frozen denoiser plus a small network reproduce a guided step."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable

from plugguide.models import load_scheduler, load_unet, load_vae, prompt_conditioning, save_atomically
from plugguide.models.shift_guide import ShiftGuide, check_scale_range
from plugguide.modules.frozen_networks import FrozenNetworksModule
from plugguide.modules.guide_training_steps import GuideTrainingSteps
from plugguide.pipelines import GuidedDiffusionPipeline
from plugguide.pipelines.finite import check_scale
from plugguide.pipelines.guidance import DistilledGuidance, Guidance
from plugguide.pipelines.guidance.base import GuidanceStep
from plugguide.pipelines.guidance.distilled import describe_teacher
from plugguide.pipelines.score_shift import guidance_gradient, guided_clean_estimate


class FrozenDenoiserShiftTraining(GuideTrainingSteps, FrozenNetworksModule):
    """What guidance distillation and its halving stages share: a frozen eps denoiser (+ VAE, prompt), one `ShiftGuide`.

    Batches are `{"image": (B, C, H, W) in [-1, 1]}`, clean images the frozen model generated
    (`SynthesizedImageDataModule`); no labels are read: targets y ~ U{0..K-1} and scales s ~ U[scale_range] are drawn
    per example. With `vae` set, training runs on `vae.encode(image) * scaling_factor`, the latents the denoiser
    sees (`encode`). Subclasses set `self.guide` and implement `_loss(batch, generator)`.

    Args:
        diffusion_model (`str`, defaults to `"assets/digits/ddpm-uncond"`): diffusers pipeline directory or hub id of
            the frozen denoiser, which predicts eps (its learned-variance channels, if any, are ignored).
        num_classes (`int`, defaults to 10): target classes K of the guide.
        scale_range (`tuple[float, float]`, defaults to `(1.0, 10.0)`): (low, high) of the guidance scale s the guide
            learns, drawn uniformly per example; saved with the guide, whose sampler refuses scales outside it.
        optimizer (`OptimizerCallable`, defaults to `torch.optim.AdamW`): optimiser factory, applied to the guide only.
        scheduler (`str`, defaults to `"DDIMScheduler"`): the sampler of grids and of `sampling_pipeline()`.
        scheduler_config (`dict`, *optional*): entries replacing the sampler's saved config, e.g.
            `{"timestep_spacing": "trailing"}` (halving stages follow the sampler's timesteps).
        num_inference_steps (`int`, defaults to 32): the sampling steps the trained guide is meant for; names its
            export `shift/steps-<n>`.
        classifier_scale (`float`, defaults to 4.0): s of the grids, 0 or within `scale_range`.
        vae (`str`, *optional*): latent models: the `AutoencoderKL`'s pipeline directory or hub id (`vae/` inside).
        prompt (`str`, *optional*): text-conditional denoisers sample under this prompt (None: the empty prompt).
        evaluator_path (`str`, *optional*): independent classifier whose agreement with the grids' rows is logged.
    """

    frozen_networks = ("unet", "vae", "teacher")

    def __init__(
        self,
        diffusion_model: str = "assets/digits/ddpm-uncond",
        num_classes: int = 10,
        scale_range: tuple[float, float] = (1.0, 10.0),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: str = "DDIMScheduler",
        scheduler_config: dict | None = None,
        num_inference_steps: int = 32,
        classifier_scale: float = 4.0,
        vae: str | None = None,
        prompt: str | None = None,
        evaluator_path: str | None = None,
    ) -> None:
        super().__init__()
        check_scale_range(scale_range, "model.scale_range")
        if num_inference_steps < 1:
            raise ValueError(f"Expected `model.num_inference_steps` to be >= 1, but got {num_inference_steps}.")
        if num_classes < 1:
            raise ValueError(f"Expected `model.num_classes` to be >= 1, but got {num_classes}.")
        check_scale("classifier_scale", classifier_scale)
        if classifier_scale > 0 and not scale_range[0] <= classifier_scale <= scale_range[1]:
            raise ValueError(
                f"`model.classifier_scale`={classifier_scale}, the grids' scale, lies outside `model.scale_range`="
                f"{list(scale_range)}, the scales the guide learns; choose one inside it."
            )
        self.optimizer = optimizer
        self.num_inference_steps = num_inference_steps
        self.unet = load_unet(diffusion_model, "model.diffusion_model").requires_grad_(False).eval()
        self.noise_scheduler = load_scheduler(
            diffusion_model, "DDPMScheduler", "model.diffusion_model", "model.diffusion_model"
        )
        if self.noise_scheduler.config.prediction_type != "epsilon":
            raise ValueError(
                f"`model.diffusion_model`={diffusion_model!r} predicts {self.noise_scheduler.config.prediction_type!r}; "
                "guidance distillation learns a shift of eps and needs an 'epsilon' model."
            )
        self.sampler = load_scheduler(
            diffusion_model, scheduler, "model.scheduler", "model.diffusion_model", scheduler_config
        )
        self.vae = load_vae(vae, "model.vae").requires_grad_(False).eval() if vae is not None else None
        self.conditioning = prompt_conditioning(diffusion_model, self.unet, prompt, "model.prompt")
        self.denoiser = self.denoiser_pipeline(None)  # the frozen denoiser's predictions, for every family of UNet
        self.teacher: Guidance | None = None
        self.guide: ShiftGuide | None = None

    def new_guide(self, block_out_channels: list[int], layers_per_block: int) -> ShiftGuide:
        """A fresh `ShiftGuide` for the frozen denoiser's sample shape, whose config names `scale_range` and the teacher."""
        config = self.unet.config
        return ShiftGuide(
            config.sample_size,
            config.in_channels,
            self.hparams.num_classes,
            block_out_channels,
            layers_per_block,
            scale_range=[float(value) for value in self.hparams.scale_range],
            distilled_from=describe_teacher(self.teacher),
        )

    def denoiser_pipeline(self, guidance: Guidance | None) -> GuidedDiffusionPipeline:
        return GuidedDiffusionPipeline(self.unet, self.sampler, guidance, self.vae, **self.conditioning)

    # -- training data ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """x0 in the denoiser's space: the images, or their latents for a latent model."""
        if self.vae is None:
            return images
        return self.vae.encode(images).latent_dist.sample(generator) * self.vae.config.scaling_factor

    def draw_targets(self, batch_size: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(y ~ U{0..K-1}, s ~ U[scale_range]) per example: no label is read."""
        low, high = self.hparams.scale_range
        y = torch.randint(0, self.hparams.num_classes, (batch_size,), generator=generator, device=self.device)
        return y, low + (high - low) * torch.rand(batch_size, generator=generator, device=self.device)

    @torch.no_grad()
    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0_hat) of the frozen denoiser at the variance-preserving z_t and train timesteps t (B,)."""
        eps, _ = self.denoiser.predict_output(z_t, t, None, 0.0)
        alpha, sigma = self.coefficients(t)
        x0_hat = (z_t - sigma * eps) / alpha
        return eps, guided_clean_estimate(self.vae, x0_hat)

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) of the training schedule at train timesteps t (B,), shaped for broadcasting."""
        abar = self.noise_scheduler.alphas_cumprod.to(self.device)[t].float().view(-1, 1, 1, 1)
        return abar.sqrt(), (1 - abar).sqrt()

    # -- sampling and export ----------------------------------------------------------------------
    @property
    def guidance(self) -> DistilledGuidance:
        """The guide being trained, as a `Guidance` (it keeps training)."""
        return DistilledGuidance(self.guide)

    def sampling_pipeline(self) -> GuidedDiffusionPipeline:
        """The frozen denoiser steered by the current guide: one denoiser pass and one guide pass per step."""
        return self.denoiser_pipeline(self.guidance)

    def export(self, directory: str) -> None:
        """Writes the guide (config.json + model.safetensors) to `<directory>/shift/steps-<num_inference_steps>`; its
        config carries the scale range it was trained on and what it was distilled from."""
        save_atomically(
            os.path.join(directory, "shift", f"steps-{self.num_inference_steps}"), self.guide.save_pretrained
        )


class GuidanceDistillation(FrozenDenoiserShiftTraining):
    """Distils a gradient guidance into a `ShiftGuide`, so that guided sampling needs no classifier and no backward pass.

    The teacher is any score-shifting `Guidance` of the project (PPAP experts, calibrated off-the-shelf guidance,
    plain classifier guidance). For x0 from the frozen model's own samples, t ~ U{0..T-1},
    `z_t = alpha_t x0 + sigma_t eps`, y ~ U{0..K-1} and s ~ U[scale_range], the guide regresses the teacher's shift of
    eps (Dhariwal & Nichol, 2021, "condition_score"; the shift every non-ancestral sampler of the project applies):

        L = || G(z_t, x0_hat, s; t, y) - ( -s sigma_t grad_{z_t} log p_teacher(y | z_t, x0_hat) ) ||^2,

    with x0_hat the frozen denoiser's clean estimate at z_t, the one the step has anyway. This joins PPAP's
    data-free distillation (no label, only the model's own images) with Hsiao et al.'s guide models (CVPR 2024), who
    distil classifier-free guidance only; the halving stages (`GuidanceHalving`) then cut the steps.

    Args:
        guidance (`Guidance`): the teacher, e.g. `ExpertGuidance` of the main job's exported experts. Its scale must
            not depend on the step (`step_scale(s) = s`: a schedule ties the shift to one run's step count) and it must
            shift the score (not EluCD's EDM sample displacement).
        diffusion_model (`str`, defaults to `"assets/digits/ddpm-uncond"`): the frozen eps denoiser.
        num_classes (`int`, defaults to 10): target classes K.
        scale_range (`tuple[float, float]`, defaults to `(1.0, 10.0)`): (low, high) of s.
        block_out_channels (`list[int]`, defaults to `(16, 32)`): the guide's widths (`ShiftGuide`).
        layers_per_block (`int`, defaults to 1): the guide's residual blocks per level.
        optimizer (`OptimizerCallable`, defaults to `torch.optim.AdamW`): optimiser factory for the guide.
        scheduler (`str`, defaults to `"DDIMScheduler"`): the sampler of grids.
        scheduler_config (`dict`, *optional*): entries replacing the sampler's saved config.
        num_inference_steps (`int`, defaults to 32): the steps of grids and the export's name (the first halving
            teacher).
        classifier_scale (`float`, defaults to 4.0): s of the grids.
        vae (`str`, *optional*): latent models: the `AutoencoderKL`; the teacher's gradient flows through its decoder
            (the guide itself works on latents and decodes nothing).
        prompt (`str`, *optional*): text-conditional denoisers: the prompt they sample under.
        evaluator_path (`str`, *optional*): independent classifier scoring the grids.
    """

    def __init__(
        self,
        guidance: Guidance,
        diffusion_model: str = "assets/digits/ddpm-uncond",
        num_classes: int = 10,
        scale_range: tuple[float, float] = (1.0, 10.0),
        block_out_channels: list[int] | tuple[int, ...] = (16, 32),
        layers_per_block: int = 1,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: str = "DDIMScheduler",
        scheduler_config: dict | None = None,
        num_inference_steps: int = 32,
        classifier_scale: float = 4.0,
        vae: str | None = None,
        prompt: str | None = None,
        evaluator_path: str | None = None,
    ) -> None:
        super().__init__(
            diffusion_model,
            num_classes,
            scale_range,
            optimizer,
            scheduler,
            scheduler_config,
            num_inference_steps,
            classifier_scale,
            vae,
            prompt,
            evaluator_path,
        )
        self.save_hyperparameters(ignore=["guidance", "optimizer"])
        check_teacher(guidance, self.noise_scheduler.config.num_train_timesteps)
        self.teacher = guidance.requires_grad_(False).eval()
        self.guide = self.new_guide(list(block_out_channels), layers_per_block)

    def teacher_shift(self, z_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor, y, s) -> torch.Tensor:
        """The teacher's eps shift `-s sigma_t grad log p(y | .)`, through the VAE decoder for latent models."""
        grad = guidance_gradient(self.teacher, self.vae, z_t, t, x0_hat, y)
        _, sigma = self.coefficients(t)
        return -s.view(-1, 1, 1, 1) * sigma * grad

    def _loss(self, batch: dict, generator: torch.Generator | None) -> torch.Tensor:
        x0 = self.encode(batch["image"], generator)
        batch_size = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator, device=self.device
        )
        y, s = self.draw_targets(batch_size, generator)
        z_t = self.noise_scheduler.add_noise(x0, noise, t)
        _, x0_hat = self.predict_noise(z_t, t)
        target = self.teacher_shift(z_t, x0_hat, t, y, s)
        return F.mse_loss(self.guide(z_t, x0_hat, t, y, s), target)


def check_teacher(guidance: Guidance, num_train_timesteps: int) -> None:
    """Refuses, naming `model.guidance`, a teacher whose shift is not `-s sigma grad` at every train timestep."""
    if isinstance(guidance, DistilledGuidance):
        raise ValueError(
            "`model.guidance` is already a distilled guide; distil a gradient guidance (e.g. ExpertGuidance)."
        )
    if guidance.shifts != "score":
        raise ValueError(
            f"`model.guidance` {type(guidance).__name__} displaces the sample (EluCD's EDM algorithm), which a shift of "
            "eps cannot express; distil a score-shifting guidance."
        )
    for timestep in (0, num_train_timesteps // 2, num_train_timesteps - 1):
        step = GuidanceStep(timestep, 0, 1, 1.0, 0.0, 0.0, num_train_timesteps)
        if guidance.step_scale(1.0, step) != 1.0:
            raise ValueError(
                f"`model.guidance` {type(guidance).__name__} scales its gradient by the step (a schedule): the guide "
                "learns one shift per (x_t, t, y, s); use the guidance without its schedule (e.g. schedule: ddpm)."
            )
