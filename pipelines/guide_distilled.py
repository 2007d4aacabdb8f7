"""One-pass sampling with a guide-distilled UNet: the guide replaces classifier-free guidance's second pass."""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from plugguide.models import Guide, denoiser_autocast, parse_autocast_dtype, predict_guided_noise, sampler_on_grid
from plugguide.pipelines.finite import check_cfg_scale, check_finite_samples
from plugguide.pipelines.guided_diffusion import LEARNED_VARIANCE_TYPES, GuidedSamplesOutput
from plugguide.pipelines.model_family import ModelFamily


class GuideDistilledPipeline(DiffusionPipeline):
    """Samples `eps'(z_t, c; G(g - 1, z_t, t, c))`, the guide-steered frozen UNet, with any eps-consuming diffusers scheduler.

    "Plug-and-Play Diffusion Distillation" (Hsiao et al., CVPR 2024): the guide G is trained so that
    `eps'(z_t, c; G) = eps(z_t, null) + g (eps(z_t, c) - eps(z_t, null))`, so each step needs one UNet pass (plus the
    guide) instead of the two of classifier-free guidance, and no doubled batch. The guidance is chosen
    at call time as diffusers' `guidance_scale` g (the guide was trained for g in its job's `guidance_range`, and
    reads g - 1).

    Class-conditional UNets take `class_labels`; text-conditional ones (Stable Diffusion) take `prompt`
    (with `tokenizer` and `text_encoder`) or `encoder_hidden_states`, and a `vae` decodes their latents.

    Args:
        unet (`UNet2DConditionModel`): the frozen `UNet2DConditionModel`.
        guide (`Guide`): a `TinyGuide` or `FullGuide` built for this UNet's architecture.
        scheduler: any diffusers scheduler that consumes eps (DDIM, DPM-Solver++, UniPC, PNDM, ...).
        vae: optional `AutoencoderKL` for latent models.
        text_encoder: optional CLIP text model for prompts.
        tokenizer: optional tokenizer of `text_encoder`.
        autocast_dtype (`str | None`, *optional*): "bfloat16" or "float16" runs the UNet and guide pass under autocast; None: full precision.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        guide: Guide,
        scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        *,
        autocast_dtype: str | None = None,
    ) -> None:
        super().__init__()
        self.autocast_dtype = parse_autocast_dtype(autocast_dtype)
        family = ModelFamily(
            scheduler
        )  # refuses, by name, a sampler or setting no pipeline of the project steps correctly
        name = type(scheduler).__name__
        if family.kind != "vp":
            raise ValueError(
                f"`scheduler` {name} works in {family.kind} space; guides are distilled on variance-preserving z_t: "
                "use DDIM, DDPM, DPM-Solver, UniPC, DEIS or PNDM."
            )
        if family.prediction_type != "epsilon":
            raise ValueError(
                f"`scheduler` has prediction_type={family.prediction_type!r}; guides are distilled for 'epsilon'."
            )
        if family.ancestral and scheduler.config.variance_type in LEARNED_VARIANCE_TYPES:
            raise ValueError(
                f"`scheduler` has variance_type={scheduler.config.variance_type!r}, which reads a variance the UNet predicts; the guided "
                "one-pass output is eps only: use 'fixed_small' or 'fixed_large'."
            )
        guide.check_unet(unet)
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
        self.guide = guide  # a plain nn.Module, kept out of the diffusers component registry

    def encode_prompt(self, prompt: Sequence[str]) -> torch.Tensor:
        """CLIP hidden states of `prompt`, padded to the tokenizer's maximum length as in Stable Diffusion."""
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError(
                "`prompt` needs a pipeline with `tokenizer` and `text_encoder`; pass `encoder_hidden_states` instead."
            )
        ids = self.tokenizer(
            list(prompt),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.unet.device))[0]

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | torch.Tensor | None = None,
        prompt: str | Sequence[str] | None = None,
        *,
        encoder_hidden_states: torch.Tensor | None = None,
        num_inference_steps: int = 32,
        guidance_scale: float = 9.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> GuidedSamplesOutput | tuple:
        """Generates one image per class label or prompt, one guided UNet pass per step.

        Args:
            class_labels (`Sequence[int] | torch.Tensor | None`, *optional*): target class per sample (class-conditional UNets).
            prompt (`str | Sequence[str] | None`, *optional*): text prompt(s) (text-conditional UNets).
            encoder_hidden_states (`torch.Tensor | None`, *optional*): precomputed text hidden states instead of `prompt`.
            num_inference_steps (`int`, defaults to 32): sampler steps (use the step count the guide was halved to).
            guidance_scale (`float`, defaults to 9.0): the classifier-free guidance scale g the guide imitates, as in diffusers:
                `eps(null) + g (eps(c) - eps(null))` (1 = no guidance); the guide reads g - 1.
            generator (`torch.Generator | list[torch.Generator] | None`, *optional*): torch generator(s) for the initial noise; the same seeds give the same noise as
                `GuidedDiffusionPipeline`, so one-pass and CFG samples compare image by image.
            output_type (`str`, defaults to 'pil'): "pil", "np" (B, H, W, C) in [0, 1], or "pt" (B, C, H, W) in [0, 1].
            return_dict (`bool`, defaults to True): return a `GuidedSamplesOutput` instead of a tuple.
        """
        if num_inference_steps < 1:
            raise ValueError(f"Expected `num_inference_steps` to be >= 1, but got {num_inference_steps}.")
        check_cfg_scale(guidance_scale)
        cfg_weight = guidance_scale - 1  # g - 1, what the guide is conditioned on (`predict_guided_noise`)
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"Expected `output_type` to be 'pil', 'np' or 'pt', but got {output_type!r}.")
        device = self.unet.device
        self.guide.to(device)
        labels = None
        if self.unet.class_embedding is not None:
            if class_labels is None:
                raise ValueError("The UNet is class-conditional; pass `class_labels`.")
            labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).flatten()
            if bool((labels < 0).any()) or int(labels.max()) >= self.unet.config.num_class_embeds - 1:
                raise ValueError(
                    f"`class_labels` must lie in [0, {self.unet.config.num_class_embeds - 2}], but got {labels.tolist()}."
                )
            batch = labels.shape[0]
        else:
            if encoder_hidden_states is None:
                if prompt is None:
                    raise ValueError("The UNet is text-conditional; pass `prompt` or `encoder_hidden_states`.")
                encoder_hidden_states = self.encode_prompt([prompt] if isinstance(prompt, str) else prompt)
            encoder_hidden_states = encoder_hidden_states.to(device)
            batch = encoder_hidden_states.shape[0]

        config = self.unet.config
        shape = (batch, config.in_channels, config.sample_size, config.sample_size)
        x = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        scheduler = sampler_on_grid(self.scheduler, self.guide.timesteps)  # a halved guide: the grid it was halved on
        scheduler.set_timesteps(num_inference_steps, device=device)
        x = x * scheduler.init_noise_sigma
        # Stochastic schedulers (DDPM, DDIM with eta > 0) draw their step noise from the same generator(s).
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        for t in self.progress_bar(scheduler.timesteps):
            with denoiser_autocast(x.device, self.autocast_dtype):
                eps = predict_guided_noise(
                    self.unet,
                    self.guide,
                    scheduler.scale_model_input(x, t),
                    t,
                    cfg_weight,
                    labels,
                    encoder_hidden_states,
                )
            eps = eps.to(x.dtype)
            x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
            check_finite_samples(x, t, scheduler.timesteps)

        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor).sample
        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).float().cpu().numpy()
        elif output_type == "pil":
            images = self.numpy_to_pil(images.permute(0, 2, 3, 1).float().cpu().numpy())
        labels = labels if labels is not None else torch.full((batch,), -1, dtype=torch.long)
        if not return_dict:
            return (images, labels)
        return GuidedSamplesOutput(images=images, class_labels=labels)
