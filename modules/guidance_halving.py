"""Progressive halving of a distilled guidance's sampler: the guide learns to do in N/2 steps what it did in N."""

from __future__ import annotations

import os

import torch
from lightning.pytorch.cli import OptimizerCallable

from plugguide.models.shift_guide import load_shift_guide
from plugguide.modules.guidance_distillation import FrozenDenoiserShiftTraining
from plugguide.modules.progressive_halving import StepHalving, check_halving


class GuidanceHalving(StepHalving, FrozenDenoiserShiftTraining):
    """Progressive distillation (Salimans & Ho, 2022) of the guided sampler `eps + G(z_t, x0_hat, s; t, y)`, training only G.

    Teacher = frozen denoiser + frozen `ShiftGuide` run with N = `teacher_steps` DDIM steps; student = the same
    denoiser + a trainable copy of that guide, run with N/2 steps. For a student step t -> s the teacher takes two
    DDIM steps and the student's x-prediction is regressed on the x that lands one step on the teacher's z_s
    (`StepHalving.step_halving_loss`), with y ~ U{0..K-1} and s ~ U[scale_range] per example, so one guide keeps
    serving every target and scale. The frozen denoiser never changes, so the guide also carries the unguided
    sampler's halving: a halved guide is meant for DDIM with its own step count. As Hsiao et al. (CVPR 2024) halve
    their CFG guides (`ProgressiveHalving`), here for gradient guidance, with no classifier at any stage.

    Args:
        guide_root (`str`, defaults to `"runs/guidance-distillation/version_0/guides"`): the exported `guides/` of the
            run this stage starts from; the teacher is `<guide_root>/shift/steps-<teacher_steps>`, the student is
            exported as `shift/steps-<teacher_steps / 2>`.
        teacher_steps (`int`, defaults to 32): N, the teacher's DDIM steps; even, >= 2.
        diffusion_model (`str`, defaults to `"assets/digits/ddpm-uncond"`): the frozen eps denoiser.
        num_classes (`int`, defaults to 10): target classes K (the teacher guide's).
        scale_range (`tuple[float, float]`, defaults to `(1.0, 10.0)`): (low, high) of s, within the range the teacher
            guide was trained on (where its config records one); saved with the student.
        loss_weighting (`str`, defaults to `"snr_truncation"`): "snr_truncation", "x" or "eps" (`ProgressiveHalving`).
        scheduler_config (`dict`, *optional*): entries replacing the DDIM sampler's saved config; the student's
            timesteps are that sampler's, e.g. `{"timestep_spacing": "trailing"}` starts every step count at t = T - 1,
            from pure noise, where "leading" (diffusers' default) starts 4 steps at t = 750. Sample the halved guide
            with the same setting.
        optimizer (`OptimizerCallable`, defaults to `torch.optim.AdamW`): optimiser factory for the student guide.
        classifier_scale (`float`, defaults to 4.0): s of the grids.
        vae (`str`, *optional*): latent models: the `AutoencoderKL`.
        prompt (`str`, *optional*): text-conditional denoisers: the prompt they sample under.
        evaluator_path (`str`, *optional*): independent classifier scoring the grids.
    """

    def __init__(
        self,
        guide_root: str = "runs/guidance-distillation/version_0/guides",
        teacher_steps: int = 32,
        diffusion_model: str = "assets/digits/ddpm-uncond",
        num_classes: int = 10,
        scale_range: tuple[float, float] = (1.0, 10.0),
        loss_weighting: str = "snr_truncation",
        scheduler_config: dict | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        classifier_scale: float = 4.0,
        vae: str | None = None,
        prompt: str | None = None,
        evaluator_path: str | None = None,
    ) -> None:
        check_halving(teacher_steps, loss_weighting)
        super().__init__(
            diffusion_model,
            num_classes,
            scale_range,
            optimizer,
            "DDIMScheduler",
            scheduler_config,
            teacher_steps // 2,
            classifier_scale,
            vae,
            prompt,
            evaluator_path,
        )
        self.save_hyperparameters(ignore=["optimizer"])
        path = os.path.join(guide_root, "shift", f"steps-{teacher_steps}")
        self.teacher = load_shift_guide(path, "model.guide_root").requires_grad_(False).eval()
        if self.teacher.num_classes != num_classes:
            raise ValueError(
                f"`model.num_classes`={num_classes}, but the teacher guide at {path!r} knows {self.teacher.num_classes} classes."
            )
        trained = self.teacher.scale_range
        if trained is not None and not trained[0] <= scale_range[0] <= scale_range[1] <= trained[1]:
            raise ValueError(
                f"`model.scale_range`={list(scale_range)} reaches outside the scales the teacher guide at {path!r} was "
                f"trained on, {list(trained)}; halve within them."
            )
        self.setup_halving(self.sampler.config, teacher_steps, self.teacher.timesteps)
        self.guide = self.teacher.halving_student(scale_range, self.student_timesteps.tolist()).requires_grad_(True)

    def _loss(self, batch: dict, generator: torch.Generator | None) -> torch.Tensor:
        x0 = self.encode(batch["image"], generator)
        batch_size = x0.shape[0]
        index = torch.randint(0, self.teacher_steps // 2, (batch_size,), generator=generator, device=self.device)
        y, s = self.draw_targets(batch_size, generator)
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        step = self.halving_start(x0, noise, index)
        # The teacher's first step and the student both start from the frozen denoiser's one pass at z_t.
        eps, x0_hat = self.predict_noise(step.z_t, step.t)
        with torch.no_grad():
            teacher_eps = eps + self.teacher(step.z_t, x0_hat, step.t, y, s)

        def teacher_noise(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            """eps'(z) = eps(z) + G(z, x0_hat, s; t, y) at the teacher's midpoint."""
            eps_mid, x0_hat_mid = self.predict_noise(z, t)
            return eps_mid + self.teacher(z, x0_hat_mid, t, y, s)

        student_eps = eps + self.guide(step.z_t, x0_hat, step.t, y, s)
        return self.step_halving_loss(step, teacher_eps, teacher_noise, student_eps, self.hparams.loss_weighting)
