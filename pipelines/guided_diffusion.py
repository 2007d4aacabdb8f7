"""Guided sampling for any diffusers UNet and scheduler."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from plugguide.models.denoiser_speed import denoiser_autocast, parse_autocast_dtype
from plugguide.models.grid_ddim import sampler_on_grid
from plugguide.models.text_encoder import encode_prompts, is_text_conditional
from plugguide.pipelines.finite import check_cfg_scale, check_finite_samples, check_scale
from plugguide.pipelines.guidance.base import Guidance
from plugguide.pipelines.guidance.training_free import TFG
from plugguide.pipelines.model_family import ModelFamily, NoiseLevel
from plugguide.pipelines.recurrence import renoise, repeatable_step
from plugguide.pipelines.score_shift import (
    check_decoder_options,
    clean_estimate,
    decode_latents,
    guidance_gradient,
    level_gradient,
    noise_shift,
    predicted_shift,
)
from plugguide.pipelines.training_free_update import (
    apply_update,
    check_training_free,
    signal_ratios,
    training_free_update,
)

# Denoisers whose call this pipeline knows (SD3/Flux transformers take pooled projections and are not handled).
DENOISER_CLASSES = (UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel)


@dataclass
class GuidedSamplesOutput(BaseOutput):
    """Samples of a guided run.

    Args:
        images (`list[PIL.Image.Image] | np.ndarray | torch.Tensor`): PIL images, a (B, H, W, C) numpy array in [0, 1], or a (B, C, H, W) tensor in [0, 1].
        class_labels (`torch.Tensor`): the target class of each sample, -1 where none.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    class_labels: torch.Tensor


@dataclass
class SamplingRun:
    """What every denoiser evaluation of one sampling run shares, and the little it carries from step to step.

    Args:
        family (`ModelFamily`): the sampler's conversions (started for this run).
        labels (`Tensor`): the condition of a class-conditional denoiser per sample (-1: none).
        targets (`Tensor`): the guidance's targets per sample: classes, or a dense guide's maps.
        classifier_scale (`float`): s, the guidance's gradient scale (0: unguided).
        cfg_weight (`float`): w of `(1 + w) eps(c) - w eps(null)`, diffusers' `guidance_scale` - 1 (0: no CFG).
        generator (`torch.Generator | list[torch.Generator] | None`): the generator(s) of the stochastic steps.
        clip_first (`bool`, defaults to False): the sampler clips x0_hat and steps as its unclipped copy.
        max_variance (`float`, defaults to 0.0): the largest ancestral Sigma_t so far (EluCD's sine term reads it).
        signal_ratios (`list[float]`, defaults to []): abar_i / abar_{i+1} of each step, for `TFG`'s schedules.
    """

    family: ModelFamily
    labels: torch.Tensor
    targets: torch.Tensor
    classifier_scale: float
    cfg_weight: float
    generator: torch.Generator | list[torch.Generator] | None
    clip_first: bool = False
    max_variance: float = 0.0
    signal_ratios: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class DenoiserEvaluation:
    """What one denoiser evaluation hands to guidance.

    Args:
        level (`NoiseLevel`): where the evaluation sits: alpha, sigma, train timestep, step.
        x (`Tensor`): the sampler's state, `level.scale` x_t.
        denoiser_output (`Tensor`): the network's output in its own parametrisation (eps, v, x0 or velocity), after CFG.
        cfg_difference (`Tensor`, *optional*): `output(c) - output(null)` for `cfg_guidance="normalized"`, else None.
        predicted_variance (`Tensor`, *optional*): the variance channels of a learned-variance UNet, else None.
    """

    level: NoiseLevel
    x: torch.Tensor
    denoiser_output: torch.Tensor
    cfg_difference: torch.Tensor | None = None
    predicted_variance: torch.Tensor | None = None


@dataclass
class ProposedStep:
    """A denoiser evaluation and the scheduler step it proposes, before the step is taken: a particle sampler weighs
    and resamples particles between the two (`ParticleDiffusionPipeline`).

    Args:
        x (`Tensor`): the state the denoiser read.
        denoiser_output (`Tensor`): the network's output after CFG, before guidance.
        output (`Tensor`): the output the scheduler steps with (guided; a learned variance's channels appended).
        mean_shift (`Tensor`, *optional*): the ancestral step's guided mean shift, added after the step; else None.
        predicted_variance (`Tensor`, *optional*): the variance channels of a learned-variance UNet, else None.
    """

    x: torch.Tensor
    denoiser_output: torch.Tensor
    output: torch.Tensor
    mean_shift: torch.Tensor | None = None
    predicted_variance: torch.Tensor | None = None


LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


def step_coefficients(scheduler, timestep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(abar_t, abar_prev, beta_t) of the ancestral step t -> the scheduler's previous timestep (abar_prev = 1 past 0)."""
    prev = scheduler.previous_timestep(timestep) if hasattr(scheduler, "previous_timestep") else timestep - 1
    abar_t = scheduler.alphas_cumprod[timestep]
    abar_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
    return abar_t, abar_prev, 1 - abar_t / abar_prev


def step_variance(scheduler, timestep: int, predicted_variance: torch.Tensor | None = None) -> float | torch.Tensor:
    """Variance Sigma_t of the ancestral DDPM step t -> previous timestep, the one `DDPMScheduler.step` samples with.

    Dhariwal & Nichol's mean shift `mean += s Sigma_t grad` uses the step's own variance, so it follows the scheduler's
    `variance_type` as diffusers' `step` draws its noise: beta tilde = (1 - abar_prev) / (1 - abar_t) beta_t for
    "fixed_small" and "fixed_small_log" (the latter stores the standard deviation, the same variance), beta_t for
    "fixed_large". Learned-variance UNets (ADM, DiT) predict it per pixel: "learned_range" interpolates log beta tilde
    and log beta_t with `frac = (v + 1) / 2` (Nichol & Dhariwal, 2021, eq. 15); "learned" is the variance itself.
    Without a predicted variance, the learned types fall back to beta tilde. "fixed_large_log" is refused where the
    pipeline is built (`ModelFamily`): diffusers' `step` takes the square root of log beta_t < 0 and samples NaN.
    """
    abar_t, abar_prev, beta_t = step_coefficients(scheduler, timestep)
    beta_tilde = (1 - abar_prev) / (1 - abar_t) * beta_t
    variance_type = getattr(scheduler.config, "variance_type", None)
    if variance_type == "fixed_large":
        return float(beta_t)
    if predicted_variance is None or variance_type not in LEARNED_VARIANCE_TYPES:
        return float(beta_tilde)
    if variance_type == "learned":
        return predicted_variance
    frac = (predicted_variance + 1) / 2
    beta_tilde, beta_t = beta_tilde.to(predicted_variance), beta_t.to(predicted_variance)
    return torch.exp(frac * beta_t.log() + (1 - frac) * beta_tilde.clamp_min(1e-20).log())


def step_mean(scheduler, timestep: int, x0_hat: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """Mean of the ancestral DDPM step t -> previous timestep, as `DDPMScheduler.step` forms it from x0_hat:
    mu = sqrt(abar_prev) beta_t / (1 - abar_t) x0_hat + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x_t."""
    abar_t, abar_prev, beta_t = step_coefficients(scheduler, timestep)
    return (abar_prev.sqrt() * beta_t * x0_hat + (1 - beta_t).sqrt() * (1 - abar_prev) * x_t) / (1 - abar_t)


def batch_normalized_gradient(grad: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """PPAP's DeepFloyd rule (riiid/PPAP `condition_mean`): grad ||mu_1|| / ||grad||, the norms over the first sample's
    step mean and over the whole batch's gradient, so the scale no longer depends on the loss's magnitude. A sample's
    shift then depends on the rest of its batch, which no other guidance here does."""
    return grad * (mean[:1].norm() / grad.norm().clamp_min(1e-12))


class GuidedDiffusionPipeline(DiffusionPipeline):
    """Samples a denoiser with a diffusers scheduler of any model family, optionally with CFG and a classifier-type guidance.

    Every scheduler of `SCHEDULER_FAMILIES` works, whatever the network predicts (`prediction_type` epsilon, v or
    sample; flow velocity): `ModelFamily` (pipelines/model_family.py) turns each evaluation into the
    variance-preserving x_t, x0_hat and train timestep that guidance sees, and the guided score back into what
    `scheduler.step` consumes. Guidance is applied as in Dhariwal & Nichol (2021): the ancestral `DDPMScheduler`
    step shifts its mean, `mean += s * Sigma_t * grad`; every other sampler shifts the score,
    `eps -= s * sigma_t * grad` in VP terms, so DDIM, DPM-Solver++, Euler, Heun, EDM and flow-matching Euler come
    from diffusers as they are. Heun's two evaluations per step are both guided (EluCD's EDM sampler guides only
    the first; a `Guidance` that shifts the sample, their Algorithm 2, follows them). Samplers that clip or threshold
    x0_hat are guided in the order of guided-diffusion's `condition_score`: clip x0_hat, re-derive eps from it,
    shift eps, and step without clipping again.

    Class-conditional UNets (`UNet2DConditionModel` with `num_class_embeds` = classes + 1, the last index
    being the null class) use classifier-free guidance `eps = eps(null) + g (eps(c) - eps(null))` when
    `guidance_scale` g > 1, as in diffusers (1 = off). Text-conditional
    UNets (cross-attention, Stable Diffusion, DeepFloyd-IF) sample under a `prompt` (encoded by the pipeline's
    `text_encoder`) or its `prompt_embeds`: the empty prompt runs them unconditionally, as PPAP guides GLIDE; with
    `negative_prompt_embeds` (the empty prompt's) and g > 1, CFG on a prompt. With `cfg_guidance="normalized"`
    classifier guidance joins CFG as in the DiT setting of Ma et al. (2023, Algorithm 3): the classifier's eps
    direction `g = -sigma_t * grad` is rescaled to the norm of the CFG difference `d = eps(c) - eps(null)` and added
    to it, `eps = eps(null) + g_cfg * (d + s * g * ||d|| / ||g||)` (per sample; the schedule multiplies s).

    Latent diffusion (Stable Diffusion, DiT-style): with a `vae` (diffusers `AutoencoderKL`) the UNet works on
    latents; the pixel-space classifier sees `vae.decode(x0_hat / scaling_factor)` (or the decoded x_t),
    clipped to [-1, 1], and its gradient flows back through the decoder to the latent (Ma et al., 2023,
    section 5.3: the decoder is part of the classifier). Outputs are decoded images. That backward pass holds the
    decoder's activations for the whole batch; `guidance_batch_size`, `decoder_gradient_checkpointing` and a lighter
    `guidance_vae` bound them (docs/stock_pipelines.md, "Memory").

    Args:
        unet: `UNet2DModel` (unconditional), class- or text-conditional `UNet2DConditionModel`, or a class-conditional
            DiT (`DiTTransformer2DModel`, null class `num_embeds_ada_norm`).
        scheduler: a diffusers scheduler of `SCHEDULER_FAMILIES` (VP, sigma-space, EDM or flow matching).
        guidance (`Guidance | None`, *optional*): a `Guidance`, or None for unguided / CFG-only sampling.
        vae: an `AutoencoderKL` for latent UNets, or None for pixel-space UNets.
        cfg_guidance (`str`, defaults to 'shift'): how classifier guidance combines with CFG: `"shift"` (the usual mean / eps shift on
            the CFG noise) or `"normalized"` (the DiT rule above; needs `guidance_scale` > 1).
        prompt_embeds (`torch.Tensor | None`, *optional*): for a text-conditional UNet, the default text-encoder hidden states (1, L, D) it samples under
            (`models.prompt_conditioning`; the empty prompt's for unconditional sampling); a call's `prompt` or
            `prompt_embeds` replaces them for that call.
        negative_prompt_embeds (`torch.Tensor | None`, *optional*): the default null condition of CFG on a prompt (the empty prompt's), same shape.
        autocast_dtype (`str | None`, *optional*): "bfloat16" or "float16" runs the denoiser (only) under autocast; None: full precision.
        text_encoder: the text encoder of a text-conditional model (CLIP, T5), to encode a call's `prompt`; None: the
            pipeline takes embeddings only.
        tokenizer: the text encoder's tokenizer.
        guidance_batch_size (`int`, *optional*): samples per decode + guide + backward pass of the guidance gradient;
            the batch goes through in chunks of this size, with the same gradient (it is per sample). None: the whole
            batch at once.
        guidance_vae (*optional*): a lighter decoder of the same latent space for the gradient only, e.g. diffusers'
            `AutoencoderTiny` (madebyollin/taesd for SD 1.x, taesdxl for SDXL); `vae` still decodes the outputs.
        decoder_gradient_checkpointing (`bool`, defaults to False): recompute the decoder's block activations in the
            guidance's backward pass instead of keeping them (diffusers' `enable_gradient_checkpointing`, switched on
            for the guidance pass only).
    """

    # The tensors a `callback_on_step_end` may read and replace, as diffusers pipelines name them.
    _callback_tensor_inputs = ["latents"]
    # Components a pipeline may leave out: saved as null and loaded back as None.
    _optional_components = ["vae", "guidance_vae", "text_encoder", "tokenizer"]

    def __init__(
        self,
        unet,
        scheduler,
        guidance: Guidance | None = None,
        vae=None,
        *,
        cfg_guidance: str = "shift",
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        autocast_dtype: str | None = None,
        text_encoder=None,
        tokenizer=None,
        guidance_batch_size: int | None = None,
        guidance_vae=None,
        decoder_gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_decoder_options(
            vae,
            guidance_batch_size=guidance_batch_size,
            guidance_vae=guidance_vae,
            decoder_gradient_checkpointing=decoder_gradient_checkpointing,
        )
        self.autocast_dtype = parse_autocast_dtype(autocast_dtype)
        ModelFamily(scheduler)  # refuses, by name, a sampler or prediction type it cannot convert
        if not isinstance(unet, DENOISER_CLASSES):
            raise ValueError(
                f"`unet` {type(unet).__name__} is not handled; allowed: {', '.join(c.__name__ for c in DENOISER_CLASSES)}."
            )
        if (
            isinstance(scheduler, DDPMScheduler)
            and scheduler.config.variance_type in LEARNED_VARIANCE_TYPES
            and unet.config.out_channels != 2 * unet.config.in_channels
        ):
            raise ValueError(
                f"`scheduler` has variance_type={scheduler.config.variance_type!r}, which reads a predicted variance from the UNet, "
                f"but the UNet has {unet.config.out_channels} output channels for {unet.config.in_channels} input channels (expected twice as many)."
            )
        if cfg_guidance not in ("shift", "normalized"):
            raise ValueError(f"Expected `cfg_guidance` to be 'shift' or 'normalized', but got {cfg_guidance!r}.")
        if cfg_guidance == "normalized" and getattr(guidance, "predicts_shift", False):
            raise ValueError(
                f"`cfg_guidance`='normalized' rescales a gradient to the CFG difference, but {type(guidance).__name__} "
                "predicts its shift, which it learned at its own scale: use cfg_guidance='shift'."
            )
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, guidance_vae=guidance_vae)
        self.guidance_batch_size = guidance_batch_size
        self.decoder_gradient_checkpointing = decoder_gradient_checkpointing
        self.guidance = guidance
        self.cfg_guidance = cfg_guidance
        if (prompt_embeds is not None or negative_prompt_embeds is not None) and not self.is_text_conditional:
            raise ValueError(
                f"`prompt_embeds` condition a text-conditional UNet (cross-attention), but the UNet is {type(unet).__name__} without one."
            )
        self.prompt_embeds = prompt_embeds
        self.negative_prompt_embeds = negative_prompt_embeds
        self._run_prompt_embeds = (
            prompt_embeds,
            negative_prompt_embeds,
        )  # what this run's denoiser calls condition on

    @property
    def is_class_conditional(self) -> bool:
        if isinstance(self.unet, UNet2DConditionModel):
            return self.unet.config.num_class_embeds is not None
        return getattr(self.unet.config, "num_embeds_ada_norm", None) is not None  # DiT: class-conditional transformer

    @property
    def is_text_conditional(self) -> bool:
        return is_text_conditional(self.unet)

    @property
    def null_class(self) -> int:
        """Index of the null (unconditional) class: the last embedding of a UNet, index `num_embeds_ada_norm` of a DiT."""
        if isinstance(self.unet, UNet2DConditionModel):
            return self.unet.config.num_class_embeds - 1
        return self.unet.config.num_embeds_ada_norm

    def _conditions(
        self, batch_size: int, class_labels: torch.Tensor | None, device: torch.device
    ) -> tuple[dict, dict]:
        """Keyword arguments of the denoiser for the condition and for CFG's null condition."""
        if self.is_text_conditional:
            prompt, negative = self._run_prompt_embeds

            def embeds(e):
                return e.to(device, self.unet.dtype).expand(batch_size, *e.shape[1:])

            return {"encoder_hidden_states": embeds(prompt)}, {
                "encoder_hidden_states": embeds(negative) if negative is not None else None
            }
        if not self.is_class_conditional:
            return {}, {}
        null = torch.full((batch_size,), self.null_class, dtype=torch.long, device=device)
        labels = null if class_labels is None else torch.where(class_labels >= 0, class_labels, null)
        return {"class_labels": labels}, {"class_labels": null}

    def _denoise(self, x: torch.Tensor, timesteps: torch.Tensor, condition: dict) -> torch.Tensor:
        with denoiser_autocast(x.device, self.autocast_dtype):
            if isinstance(self.unet, UNet2DConditionModel):
                output = self.unet(
                    x, timesteps, condition.get("encoder_hidden_states"), class_labels=condition.get("class_labels")
                ).sample
            elif condition:
                output = self.unet(x, timestep=timesteps, class_labels=condition["class_labels"]).sample  # DiT
            else:
                output = self.unet(x, timesteps).sample
        return output.to(x.dtype)

    def predict_output(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None,
        cfg_weight: float,
        return_parts: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """(the denoiser's prediction, predicted variance), with classifier-free guidance when `cfg_weight` w > 0.

        w = `guidance_scale` - 1: `(1 + w) pred(c) - w pred(null)` is diffusers' `pred(null) + g (pred(c) - pred(null))`,
        written in the form that keeps the project's earlier samples bit for bit. The prediction is in the network's own
        parametrisation (eps for epsilon models; v, x0 or velocity otherwise); CFG is linear in it, as in every diffusers
        pipeline. The variance is the extra output channels of learned-variance UNets (ADM, DiT: 2C outputs), taken
        from the conditional branch as diffusers' DiT pipeline does, and None for UNets with C outputs. With
        `return_parts` and w > 0, returns (prediction(null), prediction(c) - prediction(null), variance) instead.
        """
        timesteps = t.expand(x.shape[0])
        channels = x.shape[1]
        condition, null = self._conditions(x.shape[0], class_labels, x.device)
        if cfg_weight > 0:
            both = {key: torch.cat([value, null[key]]) for key, value in condition.items()}
            output, uncond_output = self._denoise(torch.cat([x, x]), torch.cat([timesteps, timesteps]), both).chunk(2)
            cond, uncond = output[:, :channels], uncond_output[:, :channels]
            if return_parts:
                return uncond, cond - uncond, self._variance(output, channels)
            output = torch.cat([(1 + cfg_weight) * cond - cfg_weight * uncond, output[:, channels:]], dim=1)
        else:
            output = self._denoise(x, timesteps, condition)
        return output[:, :channels], self._variance(output, channels)

    @staticmethod
    def _variance(output: torch.Tensor, channels: int) -> torch.Tensor | None:
        return output[:, channels:] if output.shape[1] > channels else None

    def noise_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        """Shape of the initial noise (and of every state) of a run of `batch_size` samples."""
        config = self.unet.config
        return (batch_size, config.in_channels, config.sample_size, config.sample_size)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (unclipped) of latents through the VAE decoder; the identity without a VAE."""
        return decode_latents(self.vae, latents)

    def guidance_gradient(
        self, x: torch.Tensor, t: torch.Tensor, x0_hat: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """The guidance gradient w.r.t. x_t's space; through the VAE decoder for latent UNets (a vector-Jacobian product)."""
        return guidance_gradient(self.guidance, self.guidance_decoder, x, t, x0_hat, targets, **self.gradient_options)

    @property
    def guidance_decoder(self):
        """The decoder the guidance gradient goes through: `guidance_vae` where given, else `vae` (None: pixels)."""
        return self.vae if self.guidance_vae is None else self.guidance_vae

    @property
    def gradient_options(self) -> dict:
        """`guidance_gradient`'s memory settings, as this pipeline holds them."""
        return dict(batch_size=self.guidance_batch_size, gradient_checkpointing=self.decoder_gradient_checkpointing)

    def denoising_step(self, run: SamplingRun, x: torch.Tensor, index: int, t: torch.Tensor) -> torch.Tensor:
        """One denoiser evaluation `index` of `run` at the scheduler's timestep `t`, and the scheduler step after it, guided;
        a `TFG` step (which may evaluate the denoiser several times) in `training_free_step`."""
        if run.classifier_scale > 0 and isinstance(self.guidance, TFG):
            level = run.family.noise_level(index, t)
            if level.alpha > 0:  # pure noise (flow's first step) is not guided
                return self.training_free_step(run, x, index, t, level)
        return self.take_step(run, self.propose_step(run, x, index, t), t)

    def propose_step(self, run: SamplingRun, x: torch.Tensor, index: int, t: torch.Tensor) -> ProposedStep:
        """The denoiser evaluation `index` of `run` at the scheduler's timestep `t`, guided, and the step it proposes.

        With `run.clip_first` (the sampler clips x0_hat and runs as its unclipped copy) x0_hat is clipped here, before
        the guidance shift.
        """
        family = run.family
        level = family.noise_level(index, t) if run.classifier_scale > 0 else None
        # At alpha = 0 (pure noise: flow's first step) p(y | x_t) = p(y), so the exact guidance term is zero.
        guided = level is not None and level.alpha > 0
        if guided and isinstance(self.guidance, TFG):
            raise ValueError(
                f"{type(self.guidance).__name__} takes its own step (`denoising_step`), which may evaluate the denoiser "
                "several times and move the sample; it proposes no single step to weigh. Sample it with "
                "GuidedDiffusionPipeline."
            )
        if guided and self.guidance.shifts == "sample" and level.first_evaluation:
            x = self.displace_sample(run, x, level)
        model_input = family.model_input(x, t)
        difference = None
        if guided and self.cfg_guidance == "normalized":
            uncond, difference, predicted_variance = self.predict_output(
                model_input, t, run.labels, run.cfg_weight, return_parts=True
            )
            output = uncond + (1 + run.cfg_weight) * difference
        else:
            output, predicted_variance = self.predict_output(model_input, t, run.labels, run.cfg_weight)
        mean_shift, denoiser_output = None, output
        if guided and self.guidance.shifts == "score":
            evaluation = DenoiserEvaluation(level, x, output, difference, predicted_variance)
            output, mean_shift = self.guide_output(run, evaluation, t)
        # A learned-variance DDPM step reads the variance from the channels after eps, as diffusers splits them.
        if (
            predicted_variance is not None
            and family.ancestral
            and family.scheduler.config.variance_type in LEARNED_VARIANCE_TYPES
        ):
            output = torch.cat([output, predicted_variance], dim=1)
        return ProposedStep(x, denoiser_output, output, mean_shift, predicted_variance)

    def take_step(self, run: SamplingRun, step: ProposedStep, t: torch.Tensor) -> torch.Tensor:
        """The scheduler step at timestep `t` that `step` proposes, plus the ancestral step's mean shift."""
        x = run.family.step(step.output, t, step.x, run.generator)
        return x if step.mean_shift is None else x + step.mean_shift

    def training_free_step(
        self, run: SamplingRun, x: torch.Tensor, index: int, t: torch.Tensor, level: NoiseLevel
    ) -> torch.Tensor:
        """A guided step of `TFG`, run `recurrence` N times: between runs the result is re-noised to the step's level
        (`renoise`, the run's generator) and the scheduler put back as it was (`repeatable_step`)."""
        recurrence = self.guidance.recurrence
        for repeat in range(recurrence):
            last = repeat == recurrence - 1
            with contextlib.nullcontext() if last else repeatable_step(run.family.scheduler):
                x_prev = self.training_free_evaluation(run, x, t, level)
            if not last:
                x = renoise(run.family, x_prev, level, index, run.generator)
        return x_prev

    def training_free_evaluation(
        self, run: SamplingRun, x: torch.Tensor, t: torch.Tensor, level: NoiseLevel
    ) -> torch.Tensor:
        """One evaluation of `TFG` and the scheduler step after it (`pipelines/training_free_update.py`).

        Where the method differentiates through the denoiser, the denoiser runs once with autograd on, from the VP
        sample x_t = x / scale, so x0_hat(x_t) carries its graph through the sampler's input scaling, the network, CFG,
        the clipping of `clip_first` and the family's conversion; every sampler then steps on the shifted output as
        it would on the network's (the ancestral DDPM step included: the score shift, not the mean shift).
        """
        family, through = run.family, self.guidance.through_denoiser
        with torch.inference_mode(False), torch.set_grad_enabled(through):
            x_t = (x / level.scale).detach().clone().requires_grad_(through)
            state = x_t * level.scale
            output, predicted_variance = self.predict_output(
                family.model_input(state, t), t, run.labels, run.cfg_weight
            )
            x0_hat, output = clean_estimate(family, output, state, level, run.clip_first)
        update = training_free_update(
            self.guidance,
            x_t,
            x0_hat,
            level,
            run.targets,
            run.classifier_scale,
            run.signal_ratios,
            run.generator,
            vae=self.guidance_decoder,
            gradient_checkpointing=self.decoder_gradient_checkpointing,
        )
        x, output = apply_update(family, output.detach(), x, level, update)
        if (
            predicted_variance is not None
            and family.ancestral
            and family.scheduler.config.variance_type in LEARNED_VARIANCE_TYPES
        ):
            output = torch.cat([output, predicted_variance.detach()], dim=1)
        return family.step(output, t, x, run.generator)

    def guide_output(
        self, run: SamplingRun, evaluation: DenoiserEvaluation, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the guided network output, the ancestral step's mean shift or None): the score shift of model_family.py,
        or on the ancestral DDPM step Dhariwal & Nichol's mean shift `s (Sigma_t + offset) grad`."""
        family, level, x = run.family, evaluation.level, evaluation.x
        x0_hat, output = clean_estimate(family, evaluation.denoiser_output, x, level, run.clip_first)
        predicted = predicted_shift(self.guidance, self.vae, x, level, x0_hat, run.targets, run.classifier_scale)
        if predicted is not None:  # a distilled guide: the score shift on every sampler, no gradient
            return family.shift_output(output, predicted, x, level), None
        if family.ancestral:
            variance = step_variance(family.scheduler, int(t), evaluation.predicted_variance)
            mean_variance = float(torch.as_tensor(variance).mean())
            run.max_variance = max(run.max_variance, mean_variance)
            level = replace(level, variance=mean_variance, max_variance=run.max_variance)
        grad = level_gradient(
            self.guidance, self.guidance_decoder, x, level, x0_hat, run.targets, **self.gradient_options
        )
        if self.guidance.normalize_gradient:
            if not family.ancestral:
                raise ValueError(
                    f"`normalize_gradient` rescales the gradient to the ancestral DDPM step's mean, but {type(family.scheduler).__name__} "
                    "shifts the score; sample with DDPMScheduler or leave `normalize_gradient` off."
                )
            grad = batch_normalized_gradient(grad, step_mean(family.scheduler, int(t), x0_hat, x))
        scale = self.guidance.step_scale(run.classifier_scale, level)
        difference = evaluation.cfg_difference
        if family.ancestral and difference is None:  # EluCD's sine term lives in the ancestral mean shift only
            return output, scale * (variance + self.guidance.variance_offset(level)) * grad
        if difference is not None:  # cfg_guidance="normalized": scaled to the CFG difference, in eps units
            direction = noise_shift(grad, level, 1.0)
            eps_difference = family.noise_difference(difference, x, level)
            ratio = eps_difference.flatten(1).norm(dim=1) / direction.flatten(1).norm(dim=1).clamp_min(1e-12)
            return family.shift_output(
                output, (1 + run.cfg_weight) * scale * ratio.view(-1, *[1] * (x.dim() - 1)) * direction, x, level
            ), None
        return family.shift_output(output, noise_shift(grad, level, scale), x, level), None

    def displace_sample(self, run: SamplingRun, x: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        """A guidance that moves the sample (EluCD's Algorithm 2, `CalibratedEDMGuidance`) moves it here, before the
        denoiser sees it, in the space the algorithm is written in, EDM's x0 + (sigma / alpha) eps = x_t / alpha."""
        x_edm = x / (level.scale * level.alpha)
        grad = self.guidance_gradient(x_edm, torch.tensor(level.timestep, device=x.device), x_edm, run.targets)
        return x + level.scale * level.alpha * self.guidance.step_scale(run.classifier_scale, level) * grad

    def encode_prompt(self, prompt: str | list[str]) -> torch.Tensor:
        """(1 or B, L, D) hidden states of `prompt` by the pipeline's `text_encoder` and `tokenizer`."""
        if not self.is_text_conditional:
            raise ValueError(
                f"`prompt`={prompt!r} needs a text-conditional UNet (cross-attention), but the UNet is {type(self.unet).__name__} without one."
            )
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(
                "`prompt` is encoded by the pipeline's `text_encoder` and `tokenizer`, and this pipeline has none: give `prompt_embeds`."
            )
        return encode_prompts(self.text_encoder, self.tokenizer, [prompt] if isinstance(prompt, str) else list(prompt))

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | torch.Tensor | None = None,
        *,
        targets: torch.Tensor | None = None,
        batch_size: int | None = None,
        num_inference_steps: int = 50,
        classifier_scale: float = 0.0,
        guidance_scale: float = 1.0,
        prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ) -> GuidedSamplesOutput | tuple:
        """Generates one image per entry of `class_labels` (or `batch_size` unlabelled ones).

        Args:
            class_labels (`Sequence[int] | Tensor`, *optional*): target class per sample (-1: none). Targets of the
                guidance (unless `targets` are given) and, for class-conditional UNets, their condition.
            targets (`Tensor`, *optional*): the guidance's targets when they are not class labels, one per sample: the
                target maps of a dense guide, (B, H, W) label maps or depth maps (`pipelines.tasks`).
            batch_size (`int`, *optional*): number of samples when `class_labels` and `targets` are None.
            num_inference_steps (`int`, defaults to 50): sampler steps.
            classifier_scale (`float`, defaults to 0.0): the scale s of the guidance's gradient (guided-diffusion's
                `classifier_scale`); 0 samples without it. Needs a `guidance`.
            guidance_scale (`float`, defaults to 1.0): classifier-free guidance weight g, as in diffusers:
                `eps(null) + g (eps(c) - eps(null))`, 1 = off. Needs a class-conditional UNet, or a text-conditional
                one with a negative prompt.
            prompt (`str | list[str]`, *optional*): for a text-conditional UNet, the prompt, encoded by the
                pipeline's `text_encoder`; its negative is the empty prompt.
            prompt_embeds (`Tensor`, *optional*): the prompt's hidden states (1 or B, L, D), in place of `prompt`.
            negative_prompt_embeds (`Tensor`, *optional*): CFG's null condition, same shape.
            generator (`torch.Generator | list[torch.Generator]`, *optional*): for the initial noise and stochastic steps.
            latents (`Tensor`, *optional*): the initial standard-normal noise (B, C, H, W), scaled by the sampler's
                `init_noise_sigma` as in diffusers; drawn from `generator` when None. The same draw passed here, with
                generators that made it, gives the same samples.
            output_type (`str`, defaults to "pil"): "pil", "np" (B, H, W, C) in [0, 1], or "pt" (B, C, H, W) in [0, 1].
            return_dict (`bool`, defaults to True): return a `GuidedSamplesOutput` instead of a tuple.
            callback_on_step_end (*optional*): diffusers' step callback, `callback_on_step_end(pipeline, step_index,
                timestep, callback_kwargs) -> dict`, called after each scheduler step (each entry of
                `scheduler.timesteps`) with `timestep` the one just evaluated and `callback_kwargs["latents"]` the
                sampler's state after the step, i.e. the sample at the *next* timestep; a returned `"latents"` replaces
                the state the run goes on from.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to ["latents"]): the tensors `callback_kwargs`
                holds, from `_callback_tensor_inputs`.
        """
        check_scale("classifier_scale", classifier_scale)
        check_cfg_scale(guidance_scale)
        cfg_weight = guidance_scale - 1  # w of the (1 + w) eps(c) - w eps(null) form the denoising step computes
        if classifier_scale > 0 and self.guidance is None:
            raise ValueError(
                f"`classifier_scale`={classifier_scale} scales the guidance's gradient, but the pipeline has no `guidance`."
            )
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Give `prompt` or `prompt_embeds`, not both.")
        if prompt is not None:
            prompt_embeds = self.encode_prompt(prompt)
            negative_prompt_embeds = (
                self.encode_prompt("") if negative_prompt_embeds is None else negative_prompt_embeds
            )
        elif prompt_embeds is not None and not self.is_text_conditional:
            raise ValueError(
                f"`prompt_embeds` condition a text-conditional UNet (cross-attention), but the UNet is {type(self.unet).__name__} without one."
            )
        self._run_prompt_embeds = (
            self.prompt_embeds if prompt_embeds is None else prompt_embeds,
            self.negative_prompt_embeds if negative_prompt_embeds is None else negative_prompt_embeds,
        )
        if cfg_weight > 0 and not (self.is_class_conditional or self._run_prompt_embeds[1] is not None):
            raise ValueError(
                f"`guidance_scale`={guidance_scale} (classifier-free guidance) needs a class-conditional UNet, or a text-conditional one with a "
                f"negative prompt; the UNet is {type(self.unet).__name__}. Leave it at 1 (off), or set `classifier_scale` for the guidance."
            )
        if self.is_text_conditional and self._run_prompt_embeds[0] is None:
            raise ValueError(
                "The UNet is text-conditional (cross-attention): give `prompt` or `prompt_embeds` (the empty prompt samples it unconditionally)."
            )
        if self.cfg_guidance == "normalized" and classifier_scale > 0 and cfg_weight <= 0:
            raise ValueError(
                f"`cfg_guidance`='normalized' adds the classifier gradient to the CFG difference and needs `guidance_scale` > 1, but got {guidance_scale}."
            )
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"Expected `output_type` to be 'pil', 'np' or 'pt', but got {output_type!r}.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but got {unknown}."
            )
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
        guided = classifier_scale > 0
        guidance_targets = labels if targets is None else torch.as_tensor(targets, device=device)
        if len(guidance_targets) != len(labels):
            raise ValueError(
                f"Expected one target per sample, but got {len(guidance_targets)} `targets` for {len(labels)} samples."
            )
        if guided:
            self.guidance.check_targets(
                guidance_targets
            )  # a class per sample, or a map per sample: the guidance's task says
            self.guidance.check_classifier_scale(classifier_scale)
            self.guidance.to(device)

        # A halved distilled guide samples on the DDIM grid it was halved on.
        family = ModelFamily(sampler_on_grid(self.scheduler, self.guidance.timesteps if guided else None))
        # Guided samplers that clip x0_hat step as their unclipped copy: `denoising_step` clips before the shift.
        training_free = guided and isinstance(self.guidance, TFG)
        # TFG shifts the score on the ancestral step too, so that step clips before the shift like the rest.
        clip_first = (
            guided
            and self.guidance.shifts == "score"
            and (training_free or not family.ancestral)
            and family.clips_clean_image
        )
        if clip_first:
            family = family.without_clipping()
        family.set_timesteps(num_inference_steps, device)
        if training_free:
            if self.cfg_guidance == "normalized":
                raise ValueError(
                    f"`cfg_guidance`='normalized' rescales a gradient to the CFG difference; {type(self.guidance).__name__} "
                    "takes its own step: use cfg_guidance='shift'."
                )
            check_training_free(self.guidance, family, self.guidance_batch_size)
        shape = self.noise_shape(labels.shape[0])
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(
                f"Expected `latents` of shape {shape} (one noise image per sample), but got {tuple(latents.shape)}."
            )
        x = latents.to(device, self.unet.dtype) * family.init_noise_sigma
        run = SamplingRun(family, labels, guidance_targets, classifier_scale, cfg_weight, generator, clip_first)
        if training_free:
            run.signal_ratios = signal_ratios(family)
        for index, t in enumerate(self.progress_bar(family.scheduler.timesteps)):
            x = self.denoising_step(run, x, index, t)
            check_finite_samples(x, t, family.scheduler.timesteps)
            if callback_on_step_end is not None:
                outputs = callback_on_step_end(
                    self, index, t, {name: x for name in callback_on_step_end_tensor_inputs}
                )
                x = outputs.pop("latents", x)

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
