"""Stage 1 of plug-and-play distillation: a guide model learns classifier-free guidance for a frozen UNet."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from lightning.pytorch.cli import OptimizerCallable

from plugguide.models.diffusion_model import load_scheduler, load_unet
from plugguide.models.guides import Guide, GuideFactory, predict_guided_noise
from plugguide.models.saving import save_atomically
from plugguide.models.text_encoder import encode_prompts
from plugguide.modules.frozen_networks import FrozenNetworksModule
from plugguide.modules.guide_training_steps import GuideTrainingSteps
from plugguide.pipelines.guide_distilled import GuideDistilledPipeline
from plugguide.pipelines.guided_diffusion import GuidedDiffusionPipeline

# Written into every checkpoint: its `guidance_range` is in diffusers' g. Checkpoints without it held g - 1.
GUIDANCE_RANGE_UNIT_KEY = "guidance_range_unit"


class FrozenUNetGuideTraining(GuideTrainingSteps, FrozenNetworksModule):
    """What guide distillation and progressive halving share: a frozen conditional UNet (+ VAE, text encoder), one trained guide.

    Batches are `{"image": (B, C, H, W) in [-1, 1], "label": (B,)}` for class-conditional UNets (null class
    = the last class-embedding index) or `{"image", "caption": list[str]}` for text-conditional ones (null
    condition = the empty prompt). With `vae` set, training runs on `vae.encode(image) * scaling_factor`.
    Subclasses set `self.guide` and implement `_loss(batch, generator)`.

    Args:
        diffusion_model (`str`, defaults to `"assets/digits/ddpm-cond"`): diffusers pipeline directory or hub id with
            `unet/` and `scheduler/`.
        optimizer (`OptimizerCallable`, defaults to `torch.optim.AdamW`): optimiser factory, applied to the guide's
            parameters only.
        guidance_range (`tuple[float, float]`, defaults to `(3.0, 10.0)`): (low, high) of the classifier-free guidance
            scale g, diffusers' `guidance_scale` (1 = no guidance), drawn uniformly per example; at least 1.
        num_inference_steps (`int`, defaults to 32): the sampling steps the trained guide is meant for; names its
            export `<kind>/steps-<n>`.
        vae (`str`, *optional*): sub-folder of `diffusion_model` holding an `AutoencoderKL` (latent models), or None.
        text_encoder (`str`, *optional*): sub-folder holding a CLIP text model (text-conditional UNets), or None.
        tokenizer (`str`, *optional*, defaults to `"tokenizer"`): sub-folder holding its tokenizer.
    """

    frozen_networks = ("unet", "vae", "text_encoder", "teacher")

    def __init__(
        self,
        diffusion_model: str = "assets/digits/ddpm-cond",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        guidance_range: tuple[float, float] = (3.0, 10.0),
        num_inference_steps: int = 32,
        vae: str | None = None,
        text_encoder: str | None = None,
        tokenizer: str | None = "tokenizer",
    ) -> None:
        super().__init__()
        low, high = guidance_range
        if not (math.isfinite(low) and math.isfinite(high) and 1 <= low <= high):
            raise ValueError(
                "Expected `model.guidance_range` to be (low, high) of the guidance scale g (diffusers' `guidance_scale`, "
                f"1 = no guidance) with finite 1 <= low <= high, but got {list(guidance_range)}."
            )
        if num_inference_steps < 1:
            raise ValueError(f"Expected `num_inference_steps` to be >= 1, but got {num_inference_steps}.")
        self.optimizer = optimizer
        self.num_inference_steps = num_inference_steps
        self.unet = load_unet(diffusion_model, "model.diffusion_model").requires_grad_(False).eval()
        if type(self.unet).__name__ != "UNet2DConditionModel":
            raise ValueError(
                f"`diffusion_model`={diffusion_model!r} holds a {type(self.unet).__name__}; guides need a conditional UNet2DConditionModel."
            )
        self.noise_scheduler = load_scheduler(
            diffusion_model, "DDPMScheduler", "model.diffusion_model", "model.diffusion_model"
        )
        self.vae = self.text_encoder = self.tokenizer = None
        if vae is not None:
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(diffusion_model, subfolder=vae).requires_grad_(False).eval()
        if text_encoder is not None:
            from transformers import CLIPTextModel, CLIPTokenizer

            self.text_encoder = (
                CLIPTextModel.from_pretrained(diffusion_model, subfolder=text_encoder).requires_grad_(False).eval()
            )
            self.tokenizer = CLIPTokenizer.from_pretrained(diffusion_model, subfolder=tokenizer)
        if (self.unet.class_embedding is None) != (self.text_encoder is not None):
            raise ValueError(
                f"`diffusion_model`={diffusion_model!r}: a class-conditional UNet needs `text_encoder`=None and a text-conditional one a "
                f"`text_encoder` sub-folder, but got text_encoder={text_encoder!r}."
            )
        self.guide: Guide | None = None

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[GUIDANCE_RANGE_UNIT_KEY] = "guidance_scale"

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Reads a checkpoint's `guidance_range` as g: one saved without `GUIDANCE_RANGE_UNIT_KEY` held g - 1."""
        super().on_load_checkpoint(checkpoint)
        settings = checkpoint.get("hyper_parameters") or {}
        if checkpoint.get(GUIDANCE_RANGE_UNIT_KEY) is None and settings.get("guidance_range") is not None:
            saved = settings["guidance_range"]
            settings["guidance_range"] = type(saved)(value + 1 for value in saved)
        checkpoint[GUIDANCE_RANGE_UNIT_KEY] = "guidance_scale"

    # -- conditions -----------------------------------------------------------------------------
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        return encode_prompts(self.text_encoder, self.tokenizer, captions)

    @torch.no_grad()
    def encode_batch(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict, dict]:
        """(x0 in the UNet's space, condition kwargs, null-condition kwargs) of a batch."""
        images = batch["image"]
        if self.vae is not None:
            images = self.vae.encode(images).latent_dist.sample(generator) * self.vae.config.scaling_factor
        if self.text_encoder is None:
            labels = batch["label"]
            null = torch.full_like(labels, self.unet.config.num_class_embeds - 1)
            return images, {"class_labels": labels}, {"class_labels": null}
        text = self.encode_text(batch["caption"])
        empty = self.encode_text([""]).expand_as(text)
        return images, {"encoder_hidden_states": text}, {"encoder_hidden_states": empty}

    def sample_guidance(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Guidance scales g ~ U[guidance_range], one per example."""
        low, high = self.hparams.guidance_range
        return low + (high - low) * torch.rand(batch_size, generator=generator, device=self.device)

    def guided_noise(
        self, guide: Guide | None, z_t: torch.Tensor, t: torch.Tensor, g: torch.Tensor | None, condition: dict
    ) -> torch.Tensor:
        """eps'(z_t, c) of the frozen UNet steered by `guide` at guidance scale g (the guide reads g - 1, as
        `GuideDistilledPipeline` feeds it); `guide` None: the plain conditional UNet, g unused."""
        cfg_weight = None if g is None else g - 1
        return predict_guided_noise(
            self.unet, guide, z_t, t, cfg_weight, condition.get("class_labels"), condition.get("encoder_hidden_states")
        )

    # -- sampling and export ----------------------------------------------------------------------
    def sampler(self) -> DDIMScheduler:
        return DDIMScheduler.from_config(self.noise_scheduler.config)

    def sampling_pipeline(self) -> GuideDistilledPipeline:
        """The frozen UNet steered by the current guide, one pass per DDIM step."""
        return GuideDistilledPipeline(
            self.unet, self.guide, self.sampler(), self.vae, self.text_encoder, self.tokenizer
        )

    def cfg_pipeline(self) -> GuidedDiffusionPipeline:
        """The same frozen UNet with two-pass classifier-free guidance, for side-by-side grids."""
        return GuidedDiffusionPipeline(self.unet, self.sampler())

    def export(self, directory: str) -> None:
        """Writes the guide (config.json + model.safetensors) to `<directory>/<tiny|full>/steps-<num_inference_steps>`."""
        name = type(self.guide).__name__.removesuffix("Guide").lower()
        save_atomically(os.path.join(directory, name, f"steps-{self.num_inference_steps}"), self.guide.save_pretrained)


class GuideDistillation(FrozenUNetGuideTraining):
    """CFG distillation into a guide model, "Plug-and-Play Diffusion Distillation" (Hsiao et al., CVPR 2024), Eq. 4.

    The UNet stays frozen; only the guide G trains, on
    `|| eps'(z_t, c; G(g - 1, z_t, t, c)) - [eps(z_t, null) + g (eps(z_t, c) - eps(z_t, null))] ||^2`
    with the guidance scale g ~ U[guidance_range] (diffusers' `guidance_scale`, 1 = no guidance; the guide reads
    g - 1, the paper's guidance weight), t ~ U{0..T-1}, and `z_t = alpha_t x + sigma_t eps` from real training
    images (latents for Stable Diffusion). One guide serves every g.

    Args:
        guide (`GuideFactory`): the guide to train, given without its UNet (`plugguide.models.guides.TinyGuide` or
            `FullGuide`).
        diffusion_model (`str`, defaults to `"assets/digits/ddpm-cond"`): diffusers pipeline directory or hub id of the
            frozen conditional UNet.
        optimizer (`OptimizerCallable`, defaults to `torch.optim.AdamW`): optimiser factory for the guide's parameters.
        guidance_range (`tuple[float, float]`, defaults to `(3.0, 10.0)`): (low, high) of the guidance scale g (1 = no
            guidance); the paper draws g - 1 from U[2, 9].
        num_inference_steps (`int`, defaults to 32): steps the distilled guide is exported for (the first halving
            teacher).
        vae (`str`, *optional*): latent models: sub-folder of the `AutoencoderKL`.
        text_encoder (`str`, *optional*): text-conditional models: sub-folder of the CLIP text model.
        tokenizer (`str`, *optional*, defaults to `"tokenizer"`): its tokenizer's sub-folder.
    """

    def __init__(
        self,
        guide: GuideFactory,
        diffusion_model: str = "assets/digits/ddpm-cond",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        guidance_range: tuple[float, float] = (3.0, 10.0),
        num_inference_steps: int = 32,
        vae: str | None = None,
        text_encoder: str | None = None,
        tokenizer: str | None = "tokenizer",
    ) -> None:
        super().__init__(diffusion_model, optimizer, guidance_range, num_inference_steps, vae, text_encoder, tokenizer)
        self.save_hyperparameters(ignore=["guide", "optimizer"])
        self.guide = guide(self.unet)

    def _loss(self, batch: dict, generator: torch.Generator | None) -> torch.Tensor:
        x0, condition, null = self.encode_batch(batch, generator)
        batch_size = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator, device=self.device
        )
        g = self.sample_guidance(batch_size, generator)
        z_t = self.noise_scheduler.add_noise(x0, noise, t)
        with torch.no_grad():
            both = {k: torch.cat([condition[k], null[k]]) for k in condition}
            eps_c, eps_null = self.guided_noise(None, torch.cat([z_t, z_t]), torch.cat([t, t]), None, both).chunk(2)
            target = eps_null + g.view((-1,) + (1,) * (x0.ndim - 1)) * (eps_c - eps_null)
        prediction = self.guided_noise(self.guide, z_t, t, g, condition)
        return F.mse_loss(prediction, target)
