"""`guided(pipe, ...)` on diffusers' own pipelines, built from tiny random components of the real classes (no download)."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL, DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DiTPipeline, DiTTransformer2DModel, EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, IFPipeline, SD3Transformer2DModel, StableDiffusion3Pipeline,
    StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel, UNet2DModel,
)

from plugguide.models import MultiExpertClassifier, TimmClassifier, prompt_conditioning
from plugguide.pipelines import GuidedDiffusionPipeline, guided
from plugguide.pipelines.guidance import CalibratedGuidance, ExpertGuidance, NaiveClassifierGuidance, PredictedCleanImageGuidance
from tests.conftest import TINY_RESNET, TINY_UNET, tiny_scheduler
from tests.test_guide_distillation import write_tiny_text_to_image_pipeline
from tests.test_hub_paths import write_tiny_deepfloyd_if
from tests.test_model_families import MEANS, SPREAD, MixtureClassifier, MixtureDenoiser, output_function, true_level

TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def quiet(pipe):
    """The pipeline without progress bars, its networks in eval mode (a DiT in train mode drops class labels at random)."""
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def rgb_classifier() -> TimmClassifier:
    torch.manual_seed(0)
    return TimmClassifier(**TINY_RESNET | dict(in_chans=3))


def guidance_of(method: str, classifier: TimmClassifier):
    """A `Guidance` of each kind on `classifier`; PPAP experts are two seeded LoRA experts on it."""
    if method == "ExpertGuidance":
        torch.manual_seed(0)
        return ExpertGuidance(MultiExpertClassifier(classifier, num_experts=2, lora_rank=2))
    return {"PredictedCleanImageGuidance": PredictedCleanImageGuidance, "CalibratedGuidance": CalibratedGuidance, "NaiveClassifierGuidance": NaiveClassifierGuidance}[method](classifier)


# -- the tiny stock pipelines, each with a call that needs no download -----------------------------------------------


def ddpm_pipeline() -> tuple[DDPMPipeline, dict]:
    torch.manual_seed(0)
    return quiet(DDPMPipeline(UNet2DModel(**TINY_UNET), tiny_scheduler())), dict(batch_size=2, num_inference_steps=4)


def ddim_pipeline() -> tuple[DDIMPipeline, dict]:
    torch.manual_seed(0)
    return quiet(DDIMPipeline(UNet2DModel(**TINY_UNET), tiny_scheduler())), dict(batch_size=2, num_inference_steps=4)


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny-sd"))
    write_tiny_text_to_image_pipeline(path)
    return path


def sd_pipeline(path: str, scheduler: str = "EulerDiscreteScheduler") -> tuple[StableDiffusionPipeline, dict]:
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    embeds = {"prompt_embeds": prompt_conditioning(path, unet, "a digit")["prompt_embeds"].expand(2, -1, -1), "negative_prompt_embeds": prompt_conditioning(path, unet, None)["prompt_embeds"].expand(2, -1, -1)}
    config = DDPMScheduler.load_config(path, subfolder="scheduler")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=getattr(diffusers, scheduler).from_config(config), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return quiet(pipe), dict(num_inference_steps=3, **embeds)


def sdxl_pipeline() -> tuple[StableDiffusionXLPipeline, dict]:
    """diffusers' own tiny SDXL UNet (text_time additional embeddings: 6 time ids x 8 + pooled 32 = 80)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80, cross_attention_dim=16, norm_num_groups=4,
    )
    vae = AutoencoderKL(**TINY_VAE)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet, scheduler=scheduler, add_watermarker=False)
    generator = seeded(1)
    embeds = dict(
        prompt_embeds=torch.randn(2, 4, 16, generator=generator), pooled_prompt_embeds=torch.randn(2, 32, generator=generator),
        negative_prompt_embeds=torch.randn(2, 4, 16, generator=generator), negative_pooled_prompt_embeds=torch.randn(2, 32, generator=generator),
    )
    return quiet(pipe), dict(num_inference_steps=3, height=16, width=16, **embeds)


def sd3_pipeline() -> tuple[StableDiffusion3Pipeline, dict]:
    """diffusers' own tiny SD3 transformer and a VAE with SD3's scaling and shift factors."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=16, out_channels=4)
    vae = AutoencoderKL(**TINY_VAE, scaling_factor=1.5305, shift_factor=0.0609)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    generator = seeded(1)
    embeds = dict(
        prompt_embeds=torch.randn(2, 4, 16, generator=generator), pooled_prompt_embeds=torch.randn(2, 16, generator=generator),
        negative_prompt_embeds=torch.randn(2, 4, 16, generator=generator), negative_pooled_prompt_embeds=torch.randn(2, 16, generator=generator),
    )
    return quiet(pipe), dict(num_inference_steps=3, height=16, width=16, **embeds)


def flux_pipeline() -> tuple[FluxPipeline, dict]:
    """diffusers' own tiny Flux transformer on packed latents (2x2 patches of 1 latent channel), FLUX.1's dynamic shifting."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[4, 4, 8])
    vae = AutoencoderKL(**TINY_VAE | dict(latent_channels=1), scaling_factor=1.5035, shift_factor=0.0609)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    generator = seeded(1)
    embeds = dict(
        prompt_embeds=torch.randn(2, 4, 16, generator=generator), pooled_prompt_embeds=torch.randn(2, 16, generator=generator),
        negative_prompt_embeds=torch.randn(2, 4, 16, generator=generator), negative_pooled_prompt_embeds=torch.randn(2, 16, generator=generator),
    )
    return quiet(pipe), dict(num_inference_steps=3, height=16, width=16, **embeds)


def dit_pipeline() -> tuple[DiTPipeline, dict]:
    """A tiny class-conditional DiT with learned sigma (2C outputs) on a VAE's latents, DDIM as in diffusers' DiT tests."""
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=4, num_attention_heads=2, in_channels=4, out_channels=8, num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False)
    pipe = DiTPipeline(transformer=transformer, vae=AutoencoderKL(**TINY_VAE), scheduler=DDIMScheduler())
    return quiet(pipe), dict(class_labels=[1, 4], num_inference_steps=3)


@pytest.fixture(scope="module")
def if_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("deepfloyd") / "IF-I")
    write_tiny_deepfloyd_if(path)
    return path


def if_pipeline(path: str) -> tuple[IFPipeline, dict]:
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    pipe = IFPipeline(tokenizer=None, text_encoder=None, unet=unet, scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"), safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    embeds = {"prompt_embeds": prompt_conditioning(path, unet, "a digit")["prompt_embeds"].expand(2, -1, -1), "negative_prompt_embeds": prompt_conditioning(path, unet, None)["prompt_embeds"].expand(2, -1, -1)}
    return quiet(pipe), dict(num_inference_steps=3, **embeds)


def build(name: str, sd_path: str, if_path: str):
    return {
        "DDPMPipeline": ddpm_pipeline, "DDIMPipeline": ddim_pipeline, "StableDiffusionPipeline": lambda: sd_pipeline(sd_path),
        "StableDiffusionXLPipeline": sdxl_pipeline, "StableDiffusion3Pipeline": sd3_pipeline, "FluxPipeline": flux_pipeline,
        "DiTPipeline": dit_pipeline, "IFPipeline": lambda: if_pipeline(if_path),
    }[name]()


def images(pipe, call: dict, **kwargs) -> torch.Tensor:
    output = pipe(**call | kwargs, generator=seeded(), output_type="np").images
    return torch.as_tensor(np.asarray(output))


PIPELINES = ["DDPMPipeline", "DDIMPipeline", "StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline", "DiTPipeline", "IFPipeline"]
# The CFG setting of each pipeline's call (None: it has none), and whether its denoiser sees pixels.
CFG = {"StableDiffusionPipeline": {"guidance_scale": 3.0}, "StableDiffusionXLPipeline": {"guidance_scale": 3.0}, "StableDiffusion3Pipeline": {"guidance_scale": 3.0},
       "FluxPipeline": {"true_cfg_scale": 3.0}, "DiTPipeline": {"guidance_scale": 3.0}, "IFPipeline": {"guidance_scale": 3.0}}
CHANNELS = {"DDPMPipeline": 1, "DDIMPipeline": 1}


@pytest.mark.parametrize("name", PIPELINES)
def test_unguided_samples_are_the_stock_pipelines_and_guided_ones_move(name, sd_path, if_path):
    """classifier_scale 0 leaves every sample bitwise; a positive scale (with the pipeline's CFG, where it has one) moves
    them and keeps them finite; the denoiser's forward is the stock one again after the block."""
    pipe, call = build(name, sd_path, if_path)
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    call |= CFG.get(name, {})
    torch.manual_seed(0)
    classifier = TimmClassifier(**TINY_RESNET | dict(in_chans=CHANNELS.get(name, 3)))
    stock = images(pipe, call)
    with guided(pipe, CalibratedGuidance(classifier), classifier_scale=0.0, targets=[1, 4]):
        off = images(pipe, call)
    with guided(pipe, CalibratedGuidance(classifier), classifier_scale=300.0, targets=[1, 4]):
        on = images(pipe, call)
    assert torch.equal(off, stock)
    assert torch.isfinite(on).all() and (on - stock).abs().max() > 1e-3
    assert "forward" not in vars(denoiser) and torch.equal(images(pipe, call), stock)


# -- the same samples as the project's own pipeline, where it runs the same model, sampler and shift -----------------


@pytest.mark.parametrize("method", ["PredictedCleanImageGuidance", "CalibratedGuidance", "ExpertGuidance", "NaiveClassifierGuidance"])
def test_guided_ddim_pipeline_is_guided_diffusion_pipeline(method, tiny_classifier):
    pipe, call = ddim_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=True)  # clip, then shift, as the project does
    guidance = guidance_of(method, tiny_classifier)
    with guided(pipe, guidance, classifier_scale=30.0, targets=[1, 4]):
        stock = pipe(**call, generator=seeded(), output_type="np").images
    assert pipe.scheduler.config.clip_sample  # the user's scheduler is back
    ours = quiet(GuidedDiffusionPipeline(pipe.unet, pipe.scheduler, guidance))
    expected = ours([1, 4], num_inference_steps=4, guidance_scale=30.0, generator=seeded(), output_type="np").images
    np.testing.assert_allclose(stock, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheduler, cfg, method", [
    ("EulerDiscreteScheduler", 1.0, "CalibratedGuidance"), ("EulerDiscreteScheduler", 3.0, "ExpertGuidance"),
    ("DPMSolverMultistepScheduler", 3.0, "NaiveClassifierGuidance"), ("DDIMScheduler", 1.0, "PredictedCleanImageGuidance"),
])
def test_guided_stable_diffusion_is_guided_diffusion_pipeline(scheduler, cfg, method, sd_path):
    """Through the VAE decoder, under the sampler's input scaling, and under CFG on a prompt for guides on x_t (whose shift
    does not depend on which CFG branch's x0_hat is read)."""
    pipe, call = sd_pipeline(sd_path, scheduler)
    guidance = guidance_of(method, rgb_classifier())
    with guided(pipe, guidance, classifier_scale=200.0, targets=[1, 4]):
        stock = pipe(**call, guidance_scale=cfg, generator=seeded(), output_type="pt").images
    embeds = {"prompt_embeds": call["prompt_embeds"][:1]} | ({"negative_prompt_embeds": call["negative_prompt_embeds"][:1]} if cfg > 1 else {})
    ours = quiet(GuidedDiffusionPipeline(pipe.unet, pipe.scheduler, guidance, vae=pipe.vae, **embeds))
    expected = ours([1, 4], num_inference_steps=3, guidance_scale=200.0, cfg_scale=cfg - 1, generator=seeded(), output_type="pt").images
    unguided = pipe(**call, guidance_scale=cfg, generator=seeded(), output_type="pt").images
    assert (expected - unguided).abs().max() > 1e-3
    torch.testing.assert_close(stock, expected, rtol=0, atol=1e-4)


def test_guided_dit_pipeline_is_guided_diffusion_pipeline():
    """A class-conditional latent transformer whose extra output channels (learned sigma) pass through untouched."""
    pipe, call = dit_pipeline()
    classifier = rgb_classifier()
    guidance = CalibratedGuidance(classifier)
    with guided(pipe, guidance, classifier_scale=200.0, targets=[1, 4]):
        stock = pipe(**call, guidance_scale=1.0, generator=seeded(), output_type="np").images
    ours = quiet(GuidedDiffusionPipeline(pipe.transformer, pipe.scheduler, guidance, vae=pipe.vae))
    expected = ours([1, 4], num_inference_steps=3, guidance_scale=200.0, generator=seeded(), output_type="np").images
    np.testing.assert_allclose(stock, expected, rtol=0, atol=1e-4)
