"""Stage 2 of plug-and-play distillation: progressive halving of a guide's sampling steps (Salimans & Ho, 2022)."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Callable, NamedTuple

import torch
from diffusers import DDIMScheduler
from lightning.pytorch.cli import OptimizerCallable

from plugguide.models.grid_ddim import check_grid, halved_grid, halving_offset
from plugguide.models.guides import load_guide
from plugguide.modules.guide_distillation import FrozenUNetGuideTraining

LOSS_WEIGHTINGS = ("snr_truncation", "x", "eps")


def ddim_step(
    z_t: torch.Tensor, eps: torch.Tensor, alpha_t, sigma_t, alpha_s, sigma_s, clip: float | None = None
) -> torch.Tensor:
    """Deterministic DDIM step z_t -> z_s = alpha_s x0_hat + sigma_s eps, as diffusers' `DDIMScheduler` (eta = 0).

    `x0_hat = (z_t - sigma_t eps) / alpha_t`, clipped to [-clip, clip] when `clip` is set (the scheduler's
    `clip_sample`); like diffusers, eps itself is not recomputed after clipping.
    """
    x0_hat = (z_t - sigma_t * eps) / alpha_t
    if clip is not None:
        x0_hat = x0_hat.clamp(-clip, clip)
    return alpha_s * x0_hat + sigma_s * eps


def halving_target(z_t: torch.Tensor, z_s: torch.Tensor, alpha_t, sigma_t, alpha_s, sigma_s) -> torch.Tensor:
    """The x that one DDIM step t -> s must predict to land on the teacher's z_s (Salimans & Ho, 2022, Algorithm 2).

    `x_target = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)`; when z_s is a DDIM
    step of z_t's own x0_hat (the last step) this is that x0_hat, for any final (alpha_s, sigma_s).
    """
    ratio = sigma_s / sigma_t
    return (z_s - ratio * z_t) / (alpha_s - ratio * alpha_t)


class HalvingStep(NamedTuple):
    """One student step per example: t -> s, the teacher's midpoint t' (-1: the end of sampling) and z_t."""

    t: torch.Tensor
    t_mid: torch.Tensor
    s: torch.Tensor
    z_t: torch.Tensor


class StepHalving:
    """What every halving stage shares: the student's DDIM timesteps, and the loss that makes one student step land
    where two teacher steps land (Salimans & Ho, 2022, Algorithm 2), for any way of predicting eps.

    A LightningModule mixes it in and calls `setup_halving` in its constructor.
    """

    def setup_halving(
        self, scheduler_config, teacher_steps: int, teacher_timesteps: Sequence[int] | None = None
    ) -> None:
        """Registers the teacher's and the student's DDIM timesteps and the schedule's abar; reads the sampler's
        clipping.

        The teacher samples on `teacher_timesteps`, the grid its guide was halved on (a halving stage's export), or,
        for a first-stage guide (trained at every timestep), diffusers' `DDIMScheduler.set_timesteps(teacher_steps)`
        on the model's schedule. The student's grid is every other one of those (`halved_grid`), so the teacher is
        only ever queried where it was taught; the exported student samples with `GridDDIMScheduler` on that grid.
        """
        sampler = DDIMScheduler.from_config(scheduler_config)
        if teacher_timesteps is None:
            sampler.set_timesteps(teacher_steps)
            teacher_timesteps = sampler.timesteps.tolist()
        teacher_timesteps = check_grid(teacher_timesteps, sampler.config.num_train_timesteps, "teacher timesteps")
        if len(teacher_timesteps) != teacher_steps:
            raise ValueError(
                f"`teacher_steps`={teacher_steps}, but the teacher guide was halved on {len(teacher_timesteps)} "
                f"timesteps {teacher_timesteps}; set `teacher_steps` to {len(teacher_timesteps)}."
            )
        self.teacher_steps = teacher_steps
        # The student's t_i = teacher[2i + o] (o = `halving_offset`): the teacher steps to teacher[2i + o + 1] and
        # teacher[2i + o + 2]; -1 past the grid's end is the end of sampling.
        padded = torch.tensor(teacher_timesteps + [-1, -1])
        self.register_buffer("teacher_timesteps", padded, persistent=False)
        spacing = sampler.config.timestep_spacing
        self.halving_offset = halving_offset(spacing)
        self.register_buffer(
            "student_timesteps", torch.tensor(halved_grid(teacher_timesteps, spacing)), persistent=False
        )
        self.register_buffer("alphas_cumprod", sampler.alphas_cumprod.clone().float(), persistent=False)
        self.final_alpha_cumprod = float(sampler.final_alpha_cumprod)
        self.clip = float(sampler.config.clip_sample_range) if sampler.config.clip_sample else None

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) shaped for broadcasting; t < 0 is the end of sampling (abar = `final_alpha_cumprod`)."""
        abar = torch.where(
            t >= 0,
            self.alphas_cumprod[t.clamp(min=0)],
            torch.full_like(t, self.final_alpha_cumprod, dtype=torch.float),
        )
        abar = abar.view(-1, 1, 1, 1)
        return abar.sqrt(), (1 - abar).sqrt()

    def halving_start(self, x0: torch.Tensor, noise: torch.Tensor, index: torch.Tensor) -> HalvingStep:
        """The student's step `index` (per example): its timesteps, the teacher's midpoint on the teacher's grid
        (`setup_halving`), and z_t = alpha_t x0 + sigma_t noise."""
        t, t_mid, s = (self.teacher_timesteps[2 * index + self.halving_offset + k] for k in range(3))
        alpha_t, sigma_t = self.alpha_sigma(t)
        return HalvingStep(t, t_mid, s, alpha_t * x0 + sigma_t * noise)

    def step_halving_loss(
        self,
        step: HalvingStep,
        teacher_eps: torch.Tensor,
        teacher_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        student_eps: torch.Tensor,
        loss_weighting: str,
    ) -> torch.Tensor:
        """The student's loss at `step`: its one step t -> s must land where the teacher's two land, t -> t' -> s.

        `teacher_eps` and `student_eps` are both predictions of eps at (z_t, t) (the caller may share what they have
        in common, such as a frozen denoiser's pass); `teacher_noise(z, t)` gives the teacher's eps at its midpoint.
        At the student's last step under leading spacing the teacher's midpoint is already the end of sampling
        (t' < 0): the teacher's one step lands on z_s = z_t' = alpha_final x0_hat + sigma_final eps, and the general
        target with those (alpha_s, sigma_s) is exactly the teacher's x0_hat, whatever the scheduler's final abar (1
        with `set_alpha_to_one`, abar_0 = 0.99915 without, as Stable Diffusion's scheduler).
        """
        z_t = step.z_t
        alpha_t, sigma_t = self.alpha_sigma(step.t)
        alpha_mid, sigma_mid = self.alpha_sigma(step.t_mid)
        alpha_s, sigma_s = self.alpha_sigma(step.s)
        with torch.no_grad():
            z_mid = ddim_step(z_t, teacher_eps, alpha_t, sigma_t, alpha_mid, sigma_mid, self.clip)
            last = (step.t_mid < 0).view(-1, 1, 1, 1)
            eps_mid = teacher_noise(z_mid, step.t_mid.clamp(min=0))
            z_s = torch.where(
                last, z_mid, ddim_step(z_mid, eps_mid, alpha_mid, sigma_mid, alpha_s, sigma_s, self.clip)
            )
            x_target = halving_target(z_t, z_s, alpha_t, sigma_t, alpha_s, sigma_s)
        x_student = (z_t - sigma_t * student_eps) / alpha_t
        x_mse = (x_student - x_target).pow(2).flatten(1).mean(1)
        eps_mse = x_mse * (alpha_t / sigma_t).flatten() ** 2  # eps-MSE = SNR * x-MSE at fixed z_t
        if loss_weighting == "x":
            return x_mse.mean()
        if loss_weighting == "eps":
            return eps_mse.mean()
        return torch.maximum(x_mse, eps_mse).mean()


def check_halving(teacher_steps: int, loss_weighting: str) -> None:
    """Refuses a teacher step count that cannot be halved and an unknown loss weighting, by name."""
    if teacher_steps < 2 or teacher_steps % 2:
        raise ValueError(
            f"Expected `teacher_steps` to be an even number >= 2 (a halving stage goes N -> N/2), but got {teacher_steps}."
        )
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"Unknown `loss_weighting`={loss_weighting!r}; allowed: {', '.join(LOSS_WEIGHTINGS)}.")


class ProgressiveHalving(StepHalving, FrozenUNetGuideTraining):
    """Progressive distillation of a guide-steered UNet, "Plug-and-Play Diffusion Distillation" (Hsiao et al., CVPR 2024), Sec. 3.3.

    Teacher = frozen UNet + frozen trained guide run with N = `teacher_steps` DDIM steps; student = the same
    frozen UNet + a trainable copy of that guide, run with N/2 steps. For a student step t -> s, the teacher
    takes two DDIM steps z_t -> z_t' -> z_s (t' the teacher's midpoint, t - T//N) and the student's
    x-prediction is regressed on
    `x_target = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)`
    (Salimans & Ho, 2022); at the last step the target is the teacher's x0_hat. The guidance scale g ~
    U[guidance_range] per example (diffusers' `guidance_scale`; teacher and student guides read g - 1, as in
    `GuideDistillation`), so one guide keeps serving every g. Only the student guide trains; the exported student is
    the next stage's teacher.

    The student's timesteps are those of diffusers' `DDIMScheduler.set_timesteps(N/2)` on the UNet's
    schedule, and s = t - T//(N/2), exactly the transitions that `GuideDistilledPipeline` takes with DDIM.

    Args:
        guide_root (`str`, defaults to `"runs/guide-distillation/version_0/guides"`): folder of the guide chains: the
            exported `guides/` of the run this stage starts from (guide distillation's or the previous stage's).
        guide_name (`str`, defaults to `"tiny"`): the chain, "tiny" or "full": the teacher is
            `<guide_root>/<guide_name>/steps-<teacher_steps>` (written by `GuideDistillation` or the previous stage);
            the student is exported as `<guide_name>/steps-<teacher_steps/2>`.
        teacher_steps (`int`, defaults to 32): N, the teacher's DDIM steps; even, >= 2.
        diffusion_model (`str`, defaults to `"assets/digits/ddpm-cond"`): diffusers pipeline directory or hub id of the
            frozen conditional UNet.
        optimizer (`OptimizerCallable`, defaults to `torch.optim.AdamW`): optimiser factory for the student guide's
            parameters.
        guidance_range (`tuple[float, float]`, defaults to `(3.0, 10.0)`): (low, high) of the guidance scale g (1 = no
            guidance), as in `GuideDistillation`.
        loss_weighting (`str`, defaults to `"snr_truncation"`): "snr_truncation" (max of x- and eps-MSE, Salimans &
            Ho's truncated SNR weighting), "x" (x-MSE) or "eps" (eps-MSE, i.e. SNR-weighted x-MSE).
        scheduler_config (`dict`, *optional*): entries replacing the UNet's scheduler config for the student's DDIM
            timesteps, e.g. `{"timestep_spacing": "trailing"}`, which starts every step count at t = T - 1 (pure
            noise, as Salimans & Ho) where diffusers' default "leading" starts 4 steps at t = 750. Sample the halved
            guide with the same setting.
        vae (`str`, *optional*): latent models: sub-folder of the `AutoencoderKL`.
        text_encoder (`str`, *optional*): text-conditional models: sub-folder of the CLIP text model.
        tokenizer (`str`, *optional*, defaults to `"tokenizer"`): its tokenizer's sub-folder.
    """

    def __init__(
        self,
        guide_root: str = "runs/guide-distillation/version_0/guides",
        guide_name: str = "tiny",
        teacher_steps: int = 32,
        diffusion_model: str = "assets/digits/ddpm-cond",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        guidance_range: tuple[float, float] = (3.0, 10.0),
        loss_weighting: str = "snr_truncation",
        scheduler_config: dict | None = None,
        vae: str | None = None,
        text_encoder: str | None = None,
        tokenizer: str | None = "tokenizer",
    ) -> None:
        check_halving(teacher_steps, loss_weighting)
        super().__init__(diffusion_model, optimizer, guidance_range, teacher_steps // 2, vae, text_encoder, tokenizer)
        num_train = self.noise_scheduler.config.num_train_timesteps
        if teacher_steps > num_train:
            raise ValueError(
                f"Expected `teacher_steps` to be at most the {num_train} training timesteps, but got {teacher_steps}."
            )
        self.save_hyperparameters(ignore=["optimizer"])
        self.teacher = (
            load_guide(
                os.path.join(guide_root, guide_name, f"steps-{teacher_steps}"), self.unet, "guide_root/guide_name"
            )
            .requires_grad_(False)
            .eval()
        )
        self.setup_halving(
            {**self.noise_scheduler.config, **(scheduler_config or {})}, teacher_steps, self.teacher.timesteps
        )
        self.guide = copy.deepcopy(self.teacher).requires_grad_(True)
        self.guide.timesteps = self.student_timesteps.tolist()

    def _loss(self, batch: dict, generator: torch.Generator | None) -> torch.Tensor:
        x0, condition, _ = self.encode_batch(batch, generator)
        batch_size = x0.shape[0]
        index = torch.randint(
            0, self.hparams.teacher_steps // 2, (batch_size,), generator=generator, device=self.device
        )
        g = self.sample_guidance(batch_size, generator)
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        return self.halving_loss(x0, condition, index, g, noise)

    def halving_loss(
        self, x0: torch.Tensor, condition: dict, index: torch.Tensor, g: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """The student's loss at its step `index` (per example) from z_t = alpha_t x0 + sigma_t noise, guidance scale g."""
        step = self.halving_start(x0, noise, index)
        with torch.no_grad():
            teacher_eps = self.guided_noise(self.teacher, step.z_t, step.t, g, condition)
        return self.step_halving_loss(
            step,
            teacher_eps,
            lambda z, t: self.guided_noise(self.teacher, z, t, g, condition),
            self.guided_noise(self.guide, step.z_t, step.t, g, condition),
            self.hparams.loss_weighting,
        )
