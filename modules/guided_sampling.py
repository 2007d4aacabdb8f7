"""The sampling job: a frozen diffusion model, a sampler and an optional guidance, run by `lightning predict`."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from plugguide.callbacks.step_progress_bar import denoising_progress
from plugguide.datamodules import TargetMapDataModule
from plugguide.metrics import GuidedSampleScores
from plugguide.models import (
    check_classifier_input,
    compile_denoiser,
    load_guide,
    load_scheduler,
    load_unet,
    load_vae,
    prompt_conditioning,
)
from plugguide.pipelines import (
    GuidedDiffusionPipeline,
    GuideDistilledPipeline,
    ParticleDiffusionPipeline,
    ParticleSettings,
    sample_batch,
)
from plugguide.pipelines.finite import check_cfg_scale, check_scale
from plugguide.pipelines.guidance import ClassifierGuidance, Guidance


class GuidedSampling(L.LightningModule):
    """Samples a frozen diffusion model, unguided, with CFG, or with a `Guidance`, and scores the samples.

    With target maps in the data (`TargetMapDataModule`: a dense model's maps of held-out real digits), a dense
    guidance (segmenter, depth regressor, or their PPAP experts) guides each sample toward its map; the samples are
    then also scored against the maps from their own pixels (`DenseMapMetrics`: segmentation for label maps, depth
    for real-valued ones), and the evaluator's class agreement is with the digit each target names.

    Args:
        diffusion_model (`str`, defaults to `"assets/digits/ddpm-uncond"`): diffusers pipeline directory or hub id
            (`assets/digits/ddpm-uncond`, `google/ddpm-cifar10-32`).
        scheduler (`str`, defaults to `"DDIMScheduler"`): diffusers scheduler class used as sampler, any of
            `models.SUPPORTED_SCHEDULERS` that serves the model's family: `DDIMScheduler`, `DDPMScheduler`,
            `DPMSolverMultistepScheduler`, `EulerDiscreteScheduler`, `HeunDiscreteScheduler`, ... for DDPM-trained
            models, `EDMEulerScheduler` for EDM ones, `FlowMatchEulerDiscreteScheduler` for flow-matching ones.
        scheduler_config (`dict`, *optional*): entries that replace the model's scheduler config, e.g.
            `{use_karras_sigmas: true}` (Euler-Karras, Heun with EDM's step sizes) or `{timestep_spacing: trailing}`.
        num_inference_steps (`int`, defaults to 50): sampler steps.
        guidance (`Guidance`, *optional*): a `Guidance` (naive classifier, predicted-x0 classifier, PPAP experts,
            calibrated), or None.
        classifier_scale (`float`, defaults to 0.0): scale s of the guidance's gradient (guided-diffusion's name);
            needs `guidance`.
        guidance_scale (`float`, defaults to 1.0): classifier-free guidance weight g, as in diffusers (`eps(null) + g
            (eps(c) - eps(null))`, 1 = off): class-conditional models, text-conditional ones on a `prompt`, and
            distilled guides.
        evaluator_path (`str`, *optional*, defaults to `"assets/digits/evaluator"`): independent classifier that scores
            the samples (guided accuracy, confidence, IS).
        vae (`str`, *optional*): for latent models, the `AutoencoderKL` (pipeline dir / hub id with `vae/`, or a bare
            VAE): the guidance classifier sees the decoded x0_hat and the samples are decoded.
        cfg_guidance (`str`, defaults to `"shift"`): how classifier guidance combines with CFG: "shift" or "normalized"
            (the DiT rule).
        guide_path (`str`, *optional*): a guide trained by `GuideDistillation` / `ProgressiveHalving`
            (`Guide.save_pretrained`): samples with one UNet + guide pass per step at `guidance_scale`
            (`GuideDistilledPipeline`).
        prompt (`str`, *optional*): for text-conditional UNets (Stable Diffusion, DeepFloyd-IF), the prompt, encoded
            once by the model's own text encoder; None samples under the empty prompt (unconditional, as PPAP guides
            GLIDE). `guidance_scale` > 1 then guides toward it against the empty prompt.
        autocast_dtype (`str`, *optional*): "bfloat16" or "float16" runs the denoiser under autocast (guidance
            gradients stay in full precision); null: full precision.
        compile_unet (`bool`, defaults to `False`): compile the denoiser's forward with `torch.compile` (each new batch
            shape compiles once).
        guidance_batch_size (`int`, *optional*): samples per decode + guide + backward pass of the guidance gradient
            (the same gradient, in chunks); null: the whole batch.
        guidance_vae (`str`, *optional*): an `AutoencoderTiny` (TAESD, e.g. madebyollin/taesd for SD 1.x) that decodes
            for the guidance gradient only; `vae` still decodes the samples.
        decoder_gradient_checkpointing (`bool`, defaults to `False`): recompute the decoder's activations in the
            guidance's backward pass instead of keeping them.
        particles (`int`, defaults to 1): K > 1 samples K particles per image and keeps one
            (`ParticleDiffusionPipeline`), weighed by `guidance`'s log-likelihood: FK steering, TDS, best-of-N.
        potential (`str`, defaults to `"diff"`): FK steering's "max", "add", "diff" or "rt", or "twisted" (TDS: the
            guided DDPM step proposes, at `classifier_scale` s > 0; `scheduler` DDPMScheduler).
        potential_lambda (`float`, defaults to 1.0): FK's lambda, the target p(x) exp(lambda log p(y | x)).
        resampling (`str`, defaults to `"systematic"`): "systematic" or "multinomial".
        ess_threshold (`float`, *optional*): resample only where the effective sample size is below this fraction
            of K (FK's adaptive runs: 0.5); null: at every scheduled step.
        resample_interval (`int`, *optional*, defaults to 1): resample every this many steps; null: never, keep the
            best final sample (best-of-N, with `final_pick: best`).
        final_pick (`str`, defaults to `"weight"`): the kept particle, drawn by its final weight ("weight") or the one
            the guide scores highest ("best").
    """

    def __init__(
        self,
        diffusion_model: str = "assets/digits/ddpm-uncond",
        scheduler: str = "DDIMScheduler",
        num_inference_steps: int = 50,
        guidance: Guidance | None = None,
        classifier_scale: float = 0.0,
        guidance_scale: float = 1.0,
        evaluator_path: str | None = "assets/digits/evaluator",
        vae: str | None = None,
        cfg_guidance: str = "shift",
        guide_path: str | None = None,
        scheduler_config: dict | None = None,
        prompt: str | None = None,
        autocast_dtype: str | None = None,
        compile_unet: bool = False,
        guidance_batch_size: int | None = None,
        guidance_vae: str | None = None,
        decoder_gradient_checkpointing: bool = False,
        particles: int = 1,
        potential: str = "diff",
        potential_lambda: float = 1.0,
        resampling: str = "systematic",
        ess_threshold: float | None = None,
        resample_interval: int | None = 1,
        final_pick: str = "weight",
    ) -> None:
        super().__init__()
        if num_inference_steps < 1:
            raise ValueError(f"Expected `num_inference_steps` to be >= 1, but got {num_inference_steps}.")
        # Checked here, not at the first batch: a negative scale would push samples away from the target, NaN switch guidance off.
        check_scale("classifier_scale", classifier_scale)
        check_cfg_scale(guidance_scale)
        if classifier_scale > 0 and guidance is None:
            raise ValueError(
                f"`model.classifier_scale`={classifier_scale} scales a guidance's gradient, but `model.guidance` is not set."
            )
        if classifier_scale > 0:
            guidance.check_classifier_scale(classifier_scale, "model.classifier_scale")
        if not isinstance(particles, int) or particles < 1:
            raise ValueError(f"Expected `model.particles` to be an integer >= 1, but got {particles}.")
        if particles > 1 and (guidance is None or guide_path is not None):
            raise ValueError(
                f"`model.particles`={particles} weighs particles by `model.guidance`'s log-likelihood; set "
                "`model.guidance` (a classifier, PPAP experts) and leave `model.guide_path` unset."
            )
        self.particle_settings = ParticleSettings(
            potential, potential_lambda, resampling, ess_threshold, resample_interval, final_pick=final_pick
        )
        self.save_hyperparameters(ignore=["guidance"])
        unet = load_unet(diffusion_model, "model.diffusion_model")
        sampler = load_scheduler(
            diffusion_model, scheduler, "model.scheduler", "model.diffusion_model", overrides=scheduler_config
        )
        if guide_path is None:
            conditioning = prompt_conditioning(diffusion_model, unet, prompt)
            pipeline_class = ParticleDiffusionPipeline if particles > 1 else GuidedDiffusionPipeline
            self.pipeline = pipeline_class(
                unet,
                sampler,
                guidance,
                vae=load_vae(vae) if vae else None,
                cfg_guidance=cfg_guidance,
                autocast_dtype=autocast_dtype,
                guidance_batch_size=guidance_batch_size,
                guidance_vae=load_vae(guidance_vae, "model.guidance_vae", tiny=True) if guidance_vae else None,
                decoder_gradient_checkpointing=decoder_gradient_checkpointing,
                **conditioning,
            )
        elif guidance is not None:
            raise ValueError(
                f"`guide_path`={guide_path!r} samples with a distilled guide; it cannot be combined with `guidance`={type(guidance).__name__}."
            )
        else:
            self.pipeline = GuideDistilledPipeline(
                unet, load_guide(guide_path, unet), sampler, autocast_dtype=autocast_dtype
            )
        self.pipeline.unet.requires_grad_(False).eval()
        if compile_unet:
            compile_denoiser(self.pipeline.unet)
        self.unet = self.pipeline.unet  # registered, so Lightning moves it to the device
        if (
            guidance_scale > 1
            and guide_path is None
            and not (self.pipeline.is_class_conditional or self.pipeline.is_text_conditional)
        ):
            raise ValueError(
                f"`model.guidance_scale`={guidance_scale} (classifier-free guidance) needs a class- or text-conditional model, but "
                f"`model.diffusion_model`={diffusion_model!r} is unconditional: leave it at 1, or guide with `model.guidance` and `model.classifier_scale`."
            )
        self.guidance = guidance
        # Checked here, as the fit jobs do, not by a raw conv error at the first batch.
        channels, size = self.image_shape()
        if isinstance(guidance, ClassifierGuidance):
            timesteps = torch.zeros(1, dtype=torch.long)
            check_classifier_input(
                guidance,
                channels,
                size,
                "guidance",
                guidance.classifier_path,
                classify=lambda images: guidance.logits(images, timesteps),
            )
        self.scores = None
        if evaluator_path:  # target maps are scored as segmentation (label maps) or depth (real-valued maps)
            self.scores = GuidedSampleScores.from_paths(evaluator_path)
            check_classifier_input(self.scores.evaluator, channels, size, "evaluator_path", evaluator_path)

    def image_shape(self) -> tuple[int, int]:
        """(channels, side) of the images that classifiers see: the UNet's samples, or their decoding by the VAE."""
        config = self.unet.config
        vae = getattr(self.pipeline, "vae", None)
        if vae is None:
            return config.in_channels, config.sample_size
        return vae.config.out_channels, config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)

    def setup(self, stage: str) -> None:
        # The data's classes are known only now: refuse before sampling a class that the networks do not have.
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if isinstance(datamodule, TargetMapDataModule) and self.hparams.guide_path is not None:
            raise ValueError(
                f"`guide_path`={self.hparams.guide_path!r} samples with a distilled CFG guide, which takes classes, not the target maps "
                "of `data`=TargetMapDataModule; guide toward maps with a dense `guidance` instead."
            )
        num_classes = getattr(datamodule, "hparams", {}).get("num_classes") if datamodule is not None else None
        if not num_classes:
            return
        limits = []
        if isinstance(self.pipeline, GuidedDiffusionPipeline) and self.pipeline.is_class_conditional:
            null = self.pipeline.null_class
            limits.append(
                ("diffusion_model", null, f" (index {null} is its null class, used for classifier-free guidance)")
            )
        if (
            self.guidance is not None
            and self.hparams.classifier_scale > 0
            and getattr(self.guidance, "num_classes", None)
        ):
            limits.append(("guidance", self.guidance.num_classes, ""))
        if self.scores is not None:
            limits.append(("evaluator_path", self.scores.num_classes, ""))
        for setting, classes, note in limits:
            if num_classes > classes:
                raise ValueError(
                    f"Expected `data.num_classes` to be at most the {classes} classes of `model.{setting}`{note}, but got {num_classes}."
                )

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        self.pipeline.set_progress_bar_config(**denoising_progress(self._trainer))
        scales = {"guidance_scale": self.hparams.guidance_scale}
        if self.hparams.guide_path is None:
            scales["classifier_scale"] = self.hparams.classifier_scale
        if self.hparams.particles > 1:
            scales |= dict(
                num_particles=self.hparams.particles,
                particle_settings=self.particle_settings,
                particle_callback=self.log_particles,
            )
        images = sample_batch(self.pipeline, batch, num_inference_steps=self.hparams.num_inference_steps, **scales)
        rows = {"images": images.cpu(), "labels": batch["label"].cpu(), "index": batch["index"].cpu()}
        if "target_map" in batch:
            rows["target_maps"] = batch["target_map"].cpu()
        if self.scores is not None:
            targets = batch.get("target_class", batch["label"])
            self.scores.update(images, targets, batch["index"], target_maps=batch.get("target_map"))
        return rows

    def log_particles(self, record: dict) -> None:
        """A particle run's step to TensorBoard: the mean effective sample size of the batch's groups, the fraction
        that resampled, and the normalised log-weights (the pipeline's bar shows the ESS too)."""
        self._particle_steps = getattr(self, "_particle_steps", 0) + 1
        if not isinstance(self.logger, TensorBoardLogger) or self.global_rank != 0:
            return
        log_weights = record["log_weights"] - record["log_weights"].logsumexp(-1, keepdim=True)
        experiment, step = self.logger.experiment, self._particle_steps
        experiment.add_scalar("particles/ess", float(record["ess"].mean()), step)
        experiment.add_scalar("particles/resampled", float(record["resampled"].float().mean()), step)
        experiment.add_histogram("particles/log_weights", log_weights.flatten(), step)

    def on_predict_epoch_end(self) -> None:
        if self.scores is not None:
            results = self.scores.compute()
            rank_zero_info("Sample metrics (evaluator): " + ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
            self.scores.reset()
