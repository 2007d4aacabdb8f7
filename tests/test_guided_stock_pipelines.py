"""`guided(pipe, ...)` on diffusers' own pipelines, built from tiny random components of the real classes (no
download)."""

from __future__ import annotations

import os

import diffusers
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    IFPipeline,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput

from plugguide.models import MultiExpertModel, TimmClassifier, prompt_conditioning
from plugguide.pipelines import GuidedDiffusionPipeline, guided
from plugguide.pipelines.guidance import (
    CalibratedEDMGuidance,
    CalibratedGuidance,
    DistilledGuidance,
    ExpertGuidance,
    Guidance,
    NaiveClassifierGuidance,
    PredictedCleanImageGuidance,
)
from plugguide.pipelines.guided_denoiser import guided_denoiser
from tests.conftest import TINY_RESNET, TINY_UNET, tiny_scheduler
from tests.test_guidance_distillation import random_shift_guide
from tests.test_guide_distillation import write_tiny_text_to_image_pipeline
from tests.test_hub_paths import write_tiny_deepfloyd_if
from tests.test_model_families import MEANS, SPREAD, MixtureClassifier, MixtureDenoiser, output_function, true_level
from tests.test_ppap import perturb

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(8, 8),
    norm_num_groups=4,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def quiet(pipe):
    """The pipeline without progress bars, its networks in eval mode (a DiT in train mode drops class labels at
    random)."""
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def rgb_classifier() -> TimmClassifier:
    torch.manual_seed(0)
    return TimmClassifier(**TINY_RESNET | dict(in_chans=3))


def guidance_of(method: str, classifier: TimmClassifier):
    """A `Guidance` of each kind on `classifier`; PPAP experts are two seeded LoRA experts on it, each perturbed on its
    own (a fresh LoRA expert is the backbone itself, so routing by timestep would go untested)."""
    if method == "ExpertGuidance":
        torch.manual_seed(0)
        experts = MultiExpertModel(classifier, num_experts=2, lora_rank=2)
        for n in range(2):
            perturb(experts, n, scale=0.3)
        return ExpertGuidance(experts)
    if method == "DistilledGuidance":  # no classifier: a one-pass guide's predicted shift
        return DistilledGuidance(random_shift_guide())
    return {
        "PredictedCleanImageGuidance": PredictedCleanImageGuidance,
        "CalibratedGuidance": CalibratedGuidance,
        "NaiveClassifierGuidance": NaiveClassifierGuidance,
    }[method](classifier)


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
    embeds = {
        "prompt_embeds": prompt_conditioning(path, unet, "a digit")["prompt_embeds"].expand(2, -1, -1),
        "negative_prompt_embeds": prompt_conditioning(path, unet, None)["prompt_embeds"].expand(2, -1, -1),
    }
    config = DDPMScheduler.load_config(path, subfolder="scheduler")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=getattr(diffusers, scheduler).from_config(config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return quiet(pipe), dict(num_inference_steps=3, **embeds)


def sdxl_pipeline() -> tuple[StableDiffusionXLPipeline, dict]:
    """diffusers' own tiny SDXL UNet (text_time additional embeddings: 6 time ids x 8 + pooled 32 = 80)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=16,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(**TINY_VAE)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    generator = seeded(1)
    embeds = dict(
        prompt_embeds=torch.randn(2, 4, 16, generator=generator),
        pooled_prompt_embeds=torch.randn(2, 32, generator=generator),
        negative_prompt_embeds=torch.randn(2, 4, 16, generator=generator),
        negative_pooled_prompt_embeds=torch.randn(2, 32, generator=generator),
    )
    return quiet(pipe), dict(num_inference_steps=3, height=16, width=16, **embeds)


def pooled_prompt_embeds() -> dict:
    """Seeded prompt and pooled embeddings, with their negatives, as SD3 and Flux take them (2 samples, 4 tokens)."""
    generator = seeded(1)
    return dict(
        prompt_embeds=torch.randn(2, 4, 16, generator=generator),
        pooled_prompt_embeds=torch.randn(2, 16, generator=generator),
        negative_prompt_embeds=torch.randn(2, 4, 16, generator=generator),
        negative_pooled_prompt_embeds=torch.randn(2, 16, generator=generator),
    )


def sd3_pipeline() -> tuple[StableDiffusion3Pipeline, dict]:
    """diffusers' own tiny SD3 transformer and a VAE with SD3's scaling and shift factors."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
    )
    vae = AutoencoderKL(**TINY_VAE, scaling_factor=1.5305, shift_factor=0.0609)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    return quiet(pipe), dict(num_inference_steps=3, height=16, width=16, **pooled_prompt_embeds())


def flux_pipeline() -> tuple[FluxPipeline, dict]:
    """diffusers' own tiny Flux transformer on packed latents (2x2 patches of 1 latent channel), FLUX.1's dynamic
    shifting."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=[4, 4, 8],
    )
    vae = AutoencoderKL(**TINY_VAE | dict(latent_channels=1), scaling_factor=1.5035, shift_factor=0.0609)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    return quiet(pipe), dict(num_inference_steps=3, height=16, width=16, **pooled_prompt_embeds())


def dit_pipeline() -> tuple[DiTPipeline, dict]:
    """A tiny class-conditional DiT with learned sigma (2C outputs) on a VAE's latents, DDIM as in diffusers' DiT
    tests."""
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=8,
        num_layers=1,
        patch_size=2,
        attention_head_dim=4,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    )
    pipe = DiTPipeline(transformer=transformer, vae=AutoencoderKL(**TINY_VAE), scheduler=DDIMScheduler())
    return quiet(pipe), dict(class_labels=[1, 4], num_inference_steps=3)


@pytest.fixture(scope="module")
def if_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("deepfloyd") / "IF-I")
    write_tiny_deepfloyd_if(path)
    return path


def if_pipeline(path: str) -> tuple[IFPipeline, dict]:
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    pipe = IFPipeline(
        tokenizer=None,
        text_encoder=None,
        unet=unet,
        scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )
    embeds = {
        "prompt_embeds": prompt_conditioning(path, unet, "a digit")["prompt_embeds"].expand(2, -1, -1),
        "negative_prompt_embeds": prompt_conditioning(path, unet, None)["prompt_embeds"].expand(2, -1, -1),
    }
    return quiet(pipe), dict(num_inference_steps=3, **embeds)


def build(name: str, sd_path: str, if_path: str):
    return {
        "DDPMPipeline": ddpm_pipeline,
        "DDIMPipeline": ddim_pipeline,
        "StableDiffusionPipeline": lambda: sd_pipeline(sd_path),
        "StableDiffusionXLPipeline": sdxl_pipeline,
        "StableDiffusion3Pipeline": sd3_pipeline,
        "FluxPipeline": flux_pipeline,
        "DiTPipeline": dit_pipeline,
        "IFPipeline": lambda: if_pipeline(if_path),
    }[name]()


def images(pipe, call: dict, **kwargs) -> torch.Tensor:
    output = pipe(**call | kwargs, generator=seeded(), output_type="np").images
    return torch.as_tensor(np.asarray(output))


PIPELINES = [
    "DDPMPipeline",
    "DDIMPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusion3Pipeline",
    "FluxPipeline",
    "DiTPipeline",
    "IFPipeline",
]
# The CFG setting of each pipeline's call (None: it has none), and whether its denoiser sees pixels.
CFG = {
    "StableDiffusionPipeline": {"guidance_scale": 3.0},
    "StableDiffusionXLPipeline": {"guidance_scale": 3.0},
    "StableDiffusion3Pipeline": {"guidance_scale": 3.0},
    "FluxPipeline": {"true_cfg_scale": 3.0},
    "DiTPipeline": {"guidance_scale": 3.0},
    "IFPipeline": {"guidance_scale": 3.0},
}
CHANNELS = {"DDPMPipeline": 1, "DDIMPipeline": 1}


@pytest.mark.parametrize("name", PIPELINES)
def test_unguided_samples_are_the_stock_pipelines_and_guided_ones_move(name, sd_path, if_path):
    """classifier_scale 0 leaves every sample bitwise; a positive scale (with the pipeline's CFG, where it has one)
    moves
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


@pytest.mark.parametrize(
    "method",
    [
        "PredictedCleanImageGuidance",
        "CalibratedGuidance",
        "ExpertGuidance",
        "NaiveClassifierGuidance",
        "DistilledGuidance",
    ],
)
def test_guided_ddim_pipeline_is_guided_diffusion_pipeline(method, tiny_classifier):
    pipe, call = ddim_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, clip_sample=True
    )  # clip, then shift, as the project does
    guidance = guidance_of(method, tiny_classifier)
    with guided(pipe, guidance, classifier_scale=30.0, targets=[1, 4]):
        stock = pipe(**call, generator=seeded(), output_type="np").images
    assert pipe.scheduler.config.clip_sample  # the user's scheduler is back
    ours = quiet(GuidedDiffusionPipeline(pipe.unet, pipe.scheduler, guidance))
    expected = ours([1, 4], num_inference_steps=4, classifier_scale=30.0, generator=seeded(), output_type="np").images
    unguided = pipe(**call, generator=seeded(), output_type="np").images
    assert abs(stock - unguided).max() > 1e-3  # guidance moved the samples, so the equality below says something
    np.testing.assert_allclose(stock, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "scheduler, cfg, method",
    [
        ("EulerDiscreteScheduler", 1.0, "CalibratedGuidance"),
        ("EulerDiscreteScheduler", 3.0, "ExpertGuidance"),
        ("DPMSolverMultistepScheduler", 3.0, "NaiveClassifierGuidance"),
        ("DDIMScheduler", 1.0, "PredictedCleanImageGuidance"),
    ],
)
def test_guided_stable_diffusion_is_guided_diffusion_pipeline(scheduler, cfg, method, sd_path):
    """Through the VAE decoder, under the sampler's input scaling, and under CFG on a prompt for guides on x_t (whose
    shift
    does not depend on which CFG branch's x0_hat is read)."""
    pipe, call = sd_pipeline(sd_path, scheduler)
    guidance = guidance_of(method, rgb_classifier())
    with guided(pipe, guidance, classifier_scale=200.0, targets=[1, 4]):
        stock = pipe(**call, guidance_scale=cfg, generator=seeded(), output_type="pt").images
    embeds = {"prompt_embeds": call["prompt_embeds"][:1]} | (
        {"negative_prompt_embeds": call["negative_prompt_embeds"][:1]} if cfg > 1 else {}
    )
    ours = quiet(GuidedDiffusionPipeline(pipe.unet, pipe.scheduler, guidance, vae=pipe.vae, **embeds))
    expected = ours(
        [1, 4], num_inference_steps=3, classifier_scale=200.0, guidance_scale=cfg, generator=seeded(), output_type="pt"
    ).images
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
    expected = ours([1, 4], num_inference_steps=3, classifier_scale=200.0, generator=seeded(), output_type="np").images
    unguided = pipe(**call, guidance_scale=1.0, generator=seeded(), output_type="np").images
    assert abs(stock - unguided).max() > 1e-3  # guidance moved the samples, so the equality below says something
    np.testing.assert_allclose(stock, expected, rtol=0, atol=1e-4)


# -- a 2-D mixture of Gaussians: a stock pipeline guided by the exact classifier is the class-conditional model -------


class StockMixtureDenoiser(MixtureDenoiser):
    """The mixture's exact denoiser called as a stock pipeline calls its UNet: it reads its noise level off the
    pipeline's
    scheduler (`true_level`: diffusers' tables, not `ModelFamily`), at the step index (0 before a run's first step)."""

    def __init__(self, kind: str, prediction_type: str):
        super().__init__()
        self.register_to_config(
            time_cond_proj_dim=None, patch_size=1
        )  # what SD's and SD3's pipelines read off their denoiser
        self.kind, self.prediction_type, self.pipe = kind, prediction_type, []

    def forward(self, sample, timestep, *args, return_dict=True, **kwargs):
        scheduler = self.pipe[0].scheduler
        index = getattr(scheduler, "step_index", None) or 0
        self.level = true_level(
            scheduler, self.kind, index, scheduler.timesteps[index] if self.kind != "vp" else timestep
        )
        self.output = output_function(scheduler, self.kind, self.prediction_type)
        output = super().forward(sample, timestep)
        return output if return_dict else (output.sample,)


class StockMixtureTransformer(StockMixtureDenoiser):
    """The same, called as SD3's pipeline calls its transformer (`hidden_states=`, `timestep=`)."""

    def forward(self, hidden_states, timestep, *args, return_dict=True, **kwargs):
        return super().forward(hidden_states, timestep, return_dict=return_dict)


def mixture_pipeline(kind: str):
    """(pipeline, call, denoiser, samples from the call's output) of the stock pipeline of each family on the
    mixture."""
    config = DDPMScheduler(clip_sample=False).config  # linear betas, as test_model_families' exact-score test
    if kind == "vp":
        denoiser = StockMixtureDenoiser("vp", "epsilon")
        pipe = DDIMPipeline(denoiser, DDPMScheduler.from_config(config))
        return (
            pipe,
            dict(batch_size=32, num_inference_steps=6, output_type="pt"),
            denoiser,
            lambda out: torch.as_tensor(out.images) * 2 - 1,
        )
    if kind == "sigma":
        denoiser = StockMixtureDenoiser("sigma", "v_prediction")
        scheduler = EulerDiscreteScheduler.from_config(config, prediction_type="v_prediction")
        pipe = StableDiffusionPipeline(
            vae=None,
            text_encoder=None,
            tokenizer=None,
            unet=denoiser,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        return (
            pipe,
            dict(prompt_embeds=torch.zeros(32, 1, 4), guidance_scale=1.0, num_inference_steps=6, output_type="latent"),
            denoiser,
            lambda out: out.images,
        )
    denoiser = StockMixtureTransformer("flow", "flow")
    pipe = StableDiffusion3Pipeline(
        transformer=denoiser,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    # Flow starts at s = 1, pure noise, which guidance leaves alone (test_model_families says why): start just below.
    call = dict(
        prompt_embeds=torch.zeros(32, 1, 4),
        pooled_prompt_embeds=torch.zeros(32, 4),
        guidance_scale=1.0,
        sigmas=[0.97, 0.8, 0.6, 0.4, 0.2, 0.1],
        output_type="latent",
    )
    return pipe, call, denoiser, lambda out: out.images


@pytest.mark.parametrize("kind", ["vp", "sigma", "flow"])
def test_exact_classifier_guides_a_stock_pipeline_to_the_class_conditional_model(kind):
    """grad log p(x_t) + grad log p(y | x_t) = grad log p(x_t | y): DDIM (VP), Stable Diffusion's pipeline with Euler
    on a v-prediction model (sigma) and SD3's pipeline (flow), guided at scale 1, give the conditional denoiser's
    samples."""
    pipe, call, denoiser, samples = mixture_pipeline(kind)
    quiet(pipe)
    denoiser.pipe = [pipe]
    targets = torch.arange(32) % 2
    with guided(pipe, MixtureClassifier(denoiser), classifier_scale=1.0, targets=targets):
        guided_samples = samples(pipe(**call, generator=seeded()))
    denoiser.target = targets
    conditional = samples(pipe(**call, generator=seeded()))
    assert (guided_samples - conditional).abs().max() <= 1e-3 * conditional.abs().max()
    assert (conditional.flatten(1) - MEANS[targets]).norm(
        dim=1
    ).mean() < 3 * SPREAD  # the conditional run reached its class


@pytest.mark.parametrize("model", ["segmenter", "depth"])
def test_dense_guides_steer_ddim_pipeline_toward_target_maps_as_guided_diffusion_pipeline(model, tiny_assets):
    from plugguide.models import load_off_the_shelf

    pipe, call = ddim_pipeline()
    guidance = PredictedCleanImageGuidance(load_off_the_shelf(tiny_assets[model]))
    maps = (
        torch.randint(0, 11, (2, 16, 16), generator=seeded())
        if model == "segmenter"
        else torch.rand(2, 16, 16, generator=seeded())
    )
    with guided(pipe, guidance, classifier_scale=3.0, targets=maps):
        stock = pipe(**call, generator=seeded(), output_type="np").images
    ours = quiet(GuidedDiffusionPipeline(pipe.unet, pipe.scheduler, guidance))
    expected = ours(
        targets=maps, num_inference_steps=4, classifier_scale=3.0, generator=seeded(), output_type="np"
    ).images
    assert abs(expected - pipe(**call, generator=seeded(), output_type="np").images).max() > 1e-4
    np.testing.assert_allclose(stock, expected, rtol=0, atol=1e-5)


class CountingGuidance(NaiveClassifierGuidance):
    """Records the batch of every gradient it is asked for."""

    def log_likelihood(self, inputs, timesteps, targets):
        self.batches.append(len(inputs))
        return super().log_likelihood(inputs, timesteps, targets)


@pytest.mark.parametrize("name", ["StableDiffusionPipeline", "FluxPipeline", "DiTPipeline"])
def test_under_cfg_the_shift_is_computed_once_per_sample_and_step(name, sd_path, if_path):
    """SD and DiT double the batch (in either order), Flux's true CFG calls the transformer twice at one state: one
    gradient
    of the 2 samples per guided step either way (Flux's first step, pure noise, is not guided)."""
    pipe, call = build(name, sd_path, if_path)
    guidance = CountingGuidance(rgb_classifier())
    guidance.batches = []
    with guided(pipe, guidance, classifier_scale=10.0, targets=[1, 4]):
        images(pipe, call, **CFG[name])
    assert guidance.batches == [2] * (2 if name == "FluxPipeline" else 3)


class RecordingGuidance(Guidance):
    """A one-pass guide that shifts nothing and records the x_t and x0_hat of every shift it is asked for."""

    predicts_shift = True

    def __init__(self):
        super().__init__(input="x0_hat")
        self.seen = []

    def log_likelihood(self, inputs, timesteps, targets):
        raise NotImplementedError

    def predicted_shift(self, x_t, step, x0_hat, targets, scale):
        self.seen.append((x_t.clone(), x0_hat.clone()))
        return torch.zeros_like(x_t)


@pytest.mark.parametrize("name", ["StableDiffusionPipeline", "DiTPipeline"])
def test_under_cfg_the_shift_reads_the_conditional_half(name, sd_path, if_path):
    """SD stacks (unconditional, conditional), DiT (conditional, unconditional): at the first step, whose state is the
    same in every run, the x0_hat guidance reads under CFG is the conditional-only run's, not the unconditional's."""
    pipe, call = build(name, sd_path, if_path)
    if name == "StableDiffusionPipeline":
        unconditional = call | {"prompt_embeds": call["negative_prompt_embeds"]}
    else:
        unconditional = call | {"class_labels": [1000, 1000]}  # DiT's null class
    first_x0_hat = {}
    for run, (arguments, cfg) in {
        "cfg": (call, 3.0),
        "conditional": (call, 1.0),
        "unconditional": (unconditional, 1.0),
    }.items():
        guidance = RecordingGuidance()
        with guided(pipe, guidance, classifier_scale=1.0, targets=[1, 4]):
            images(pipe, arguments, guidance_scale=cfg)
        first_x0_hat[run] = guidance.seen[0][1]
    assert (first_x0_hat["conditional"] - first_x0_hat["unconditional"]).abs().max() > 1e-2
    torch.testing.assert_close(first_x0_hat["cfg"], first_x0_hat["conditional"], rtol=0, atol=1e-5)


def test_flux_true_cfg_shift_reads_the_conditional_call():
    """Flux's true CFG calls the transformer at one state with the prompt, then with the negative prompt: the x0_hat of
    each guided step is x - s v of the first call (flow matching, x = (1 - s) x0 + s eps, v = eps - x0), not the
    second's."""
    pipe, call = flux_pipeline()
    calls = []

    def record(module, args, kwargs, output):
        sigma = float(pipe.scheduler.sigmas[pipe.scheduler.step_index or 0])  # None before the first step
        calls.append(kwargs["hidden_states"] - sigma * output[0])

    handle = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    guidance = RecordingGuidance()
    with guided(pipe, guidance, classifier_scale=1.0, targets=[1, 4]):
        images(pipe, call, true_cfg_scale=3.0)
    handle.remove()
    assert len(calls) == 6 and len(guidance.seen) == 2  # 3 steps of 2 calls; the first step (pure noise) unguided
    for step, (_, x0_hat) in enumerate(guidance.seen, start=1):
        conditional, unconditional = calls[2 * step], calls[2 * step + 1]
        assert (conditional - unconditional).abs().max() > 1e-2
        torch.testing.assert_close(x0_hat, conditional, rtol=0, atol=1e-5)


# -- devices, precision, compiled and subclassed components, batches of prompts -------------------------------------


def test_guidance_and_targets_go_to_the_pipelines_execution_device(monkeypatch, tiny_classifier):
    """Under model or sequential offload the denoiser's weights sit on the CPU (or the meta device) between calls; the
    pipeline computes on `_execution_device`, where the guide and the targets must be. The guide handed in stays."""
    pipe, _ = ddim_pipeline()
    monkeypatch.setattr(DDIMPipeline, "_execution_device", property(lambda self: torch.device("meta")))
    guidance = NaiveClassifierGuidance(tiny_classifier)
    wrapper = guided_denoiser(pipe, guidance, 1.0, [1, 4])
    assert wrapper.targets.device.type == "meta" and pipe.unet.device.type == "cpu"
    assert all(parameter.device.type == "meta" for parameter in wrapper.guidance.parameters())
    assert all(parameter.device.type == "cpu" for parameter in guidance.parameters())


def test_half_precision_pipeline_leaves_the_guides_handed_in_as_they_were(tiny_classifier):
    """A float16 DDIM pipeline: the float32 classifier runs as it is on float32 inputs; a distilled guide, which reads
    the denoiser's own tensors, runs as a float16 copy; both guides are float32 after the block, and the samples move."""
    pipe, call = ddim_pipeline()
    pipe.to(torch.float16)
    unguided = pipe(**call, generator=seeded(), output_type="np").images
    for guidance, module, dtype in (
        (NaiveClassifierGuidance(tiny_classifier), tiny_classifier, torch.float32),
        (DistilledGuidance(random_shift_guide()), None, torch.float16),
    ):
        module = module or guidance.guide
        runs = []
        handle = module.register_forward_pre_hook(
            lambda ran, args: runs.append((ran is module, args[0].dtype, next(ran.parameters()).dtype))
        )  # hooks travel with a copy
        with guided(pipe, guidance, classifier_scale=30.0, targets=[1, 4]):
            samples = pipe(**call, generator=seeded(), output_type="np").images
        handle.remove()
        assert runs and all(run == (dtype == torch.float32, dtype, dtype) for run in runs), runs
        assert {parameter.dtype for parameter in guidance.parameters()} == {torch.float32}
        assert np.isfinite(samples).all() and abs(samples - unguided).max() > 1e-2


def test_a_distilled_guide_runs_in_the_compute_dtype_of_a_layerwise_cast_denoiser():
    """diffusers' layerwise casting stores the weights in float8 and computes in the model's `dtype` (float32 here):
    the distilled guide runs in that compute dtype (float8 has no arithmetic on the CPU) and moves the samples."""
    pipe, call = ddim_pipeline()
    guidance = DistilledGuidance(random_shift_guide())
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    unguided = pipe(**call, generator=seeded(), output_type="np").images
    with guided(pipe, guidance, classifier_scale=3.0, targets=[1, 4]):
        samples = pipe(**call, generator=seeded(), output_type="np").images
    assert np.isfinite(samples).all() and abs(samples - unguided).max() > 1e-2


def overflowing_decoder(vae: AutoencoderKL) -> AutoencoderKL:
    """`vae` whose decoder's first activations exceed float16's range (65504) before its first group norm, as SDXL's
    own VAE does at 1024 px: float16 decodes to NaN, float32 normalises them away."""
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)
    return vae


def test_float16_sdxl_with_force_upcast_vae_decodes_the_gradient_in_float32():
    """SDXL in float16 with a VAE that overflows float16 and says so (`force_upcast`, SDXL's config): the guidance
    gradient decodes in float32, as the pipeline's own final decode does; the VAE is float16 again after the block and
    the classifier float32 throughout; the samples are near the float32 pipeline's guided ones."""
    pipe, call = sdxl_pipeline()
    overflowing_decoder(pipe.vae)
    guidance = CalibratedGuidance(rgb_classifier())
    with guided(pipe, guidance, classifier_scale=30.0, targets=[1, 4]):
        full = pipe(**call, guidance_scale=3.0, generator=seeded(), output_type="pt").images
    pipe.to(torch.float16)
    assert pipe.vae.config.force_upcast
    with torch.no_grad():
        assert not torch.isfinite(pipe.vae.decode(torch.randn(1, 4, 8, 8, dtype=torch.float16)).sample).all()
    call = {key: value.half() if torch.is_tensor(value) else value for key, value in call.items()}
    unguided = pipe(**call, guidance_scale=3.0, generator=seeded(), output_type="pt").images
    with guided(pipe, guidance, classifier_scale=30.0, targets=[1, 4]):
        half = pipe(**call, guidance_scale=3.0, generator=seeded(), output_type="pt").images
    assert pipe.vae.dtype == torch.float16 and {p.dtype for p in guidance.parameters()} == {torch.float32}
    assert torch.isfinite(half).all() and (half.float() - unguided.float()).abs().max() > 1e-2
    torch.testing.assert_close(half.float(), full, rtol=0, atol=5e-3)


def test_bfloat16_stable_diffusion_is_guided_as_in_float32(sd_path):
    """Stable Diffusion in bfloat16 with a float32 classifier behind the decoder: the classifier stays float32 and the
    samples are near the float32 pipeline's guided ones (bfloat16 keeps 8 bits of mantissa)."""
    pipe, call = sd_pipeline(sd_path)
    guidance = CalibratedGuidance(rgb_classifier())
    with guided(pipe, guidance, classifier_scale=200.0, targets=[1, 4]):
        full = pipe(**call, guidance_scale=3.0, generator=seeded(), output_type="pt").images
    unguided_full = pipe(**call, guidance_scale=3.0, generator=seeded(), output_type="pt").images
    pipe.to(torch.bfloat16)
    call = {key: value.bfloat16() if torch.is_tensor(value) else value for key, value in call.items()}
    with guided(pipe, guidance, classifier_scale=200.0, targets=[1, 4]):
        half = pipe(**call, guidance_scale=3.0, generator=seeded(), output_type="pt").images.float()
    assert {p.dtype for p in guidance.parameters()} == {torch.float32}
    moved = (full - unguided_full).abs().max()
    assert moved > 1e-2 and (half - full).abs().max() < 0.2 * moved


class SubclassedDiTPipeline(DiTPipeline):
    """A user's DiT pipeline: DiT's CFG order (conditional first) without DiT's class name."""


class SubclassedFluxTransformer(FluxTransformer2DModel):
    """A user's Flux transformer: it takes t / 1000 without Flux's class name."""


class SubclassedEulerScheduler(EulerDiscreteScheduler):
    """A user's Euler sampler: Euler's sigma space and input scaling without Euler's class name."""


def subclassed_scheduler(pipe):
    pipe.scheduler = SubclassedEulerScheduler.from_config(pipe.scheduler.config)
    return pipe


def subclassed_dit(pipe):
    return quiet(SubclassedDiTPipeline(**pipe.components))


def subclassed_flux_transformer(pipe):
    transformer = SubclassedFluxTransformer.from_config(pipe.transformer.config)
    transformer.load_state_dict(pipe.transformer.state_dict())
    pipe.transformer = transformer.eval()
    return pipe


def compiled_denoiser(pipe):
    name = "unet" if hasattr(pipe, "unet") else "transformer"
    setattr(pipe, name, torch.compile(getattr(pipe, name), backend="eager"))  # dynamo's wrapper, no code generation
    return pipe


@pytest.mark.parametrize(
    "name, change",
    [
        ("DDIMPipeline", compiled_denoiser),
        ("FluxPipeline", compiled_denoiser),
        ("FluxPipeline", subclassed_flux_transformer),
        ("DiTPipeline", subclassed_dit),
        ("StableDiffusionPipeline", subclassed_scheduler),
    ],
    ids=[
        "compiled-unet",
        "compiled-flux",
        "subclassed-flux-transformer",
        "subclassed-dit-pipeline",
        "subclassed-euler",
    ],
)
def test_compiled_and_subclassed_components_are_guided_as_the_stock_ones(name, change, sd_path, if_path):
    """`torch.compile(pipe.unet)` and subclasses of the stock classes are read by what they are, not by class name: the
    same guided samples as the stock pipeline (with its CFG), and the denoiser's own forward after the block."""
    pipe, call = build(name, sd_path, if_path)
    call |= CFG.get(name, {})
    guidance = CalibratedGuidance(rgb_classifier() if name != "DDIMPipeline" else TimmClassifier(**TINY_RESNET))
    unguided = images(pipe, call)
    with guided(pipe, guidance, classifier_scale=200.0, targets=[1, 4]):
        stock = images(pipe, call)
    pipe = change(pipe)
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    forward = denoiser.forward
    with guided(pipe, guidance, classifier_scale=200.0, targets=[1, 4]):
        changed = images(pipe, call)
    assert denoiser.forward == forward
    assert (stock - unguided).abs().max() > 1e-3
    torch.testing.assert_close(changed, stock, rtol=0, atol=1e-5)


def test_each_image_of_a_batch_of_prompts_is_guided_to_its_own_target(sd_path):
    """2 prompts x `num_images_per_prompt` 2, four targets: each image is the one a single-image run with its prompt,
    its initial latents and its target gives (the pipeline orders the batch prompt by prompt)."""
    pipe, _ = sd_pipeline(sd_path)
    embeds = {
        "prompt_embeds": torch.cat([prompt_conditioning(sd_path, pipe.unet, p)["prompt_embeds"] for p in PROMPTS]),
        "negative_prompt_embeds": prompt_conditioning(sd_path, pipe.unet, None)["prompt_embeds"].expand(2, -1, -1),
    }
    latents = torch.randn(4, 4, 8, 8, generator=seeded())
    targets = [1, 4, 7, 2]
    guidance = CalibratedGuidance(rgb_classifier())
    call = dict(num_inference_steps=3, guidance_scale=3.0, output_type="pt")
    unguided = pipe(**call, **embeds, num_images_per_prompt=2, latents=latents).images
    with guided(pipe, guidance, classifier_scale=200.0, targets=targets):
        batch = pipe(**call, **embeds, num_images_per_prompt=2, latents=latents).images
    singles = []
    for i, target in enumerate(targets):
        with guided(pipe, guidance, classifier_scale=200.0, targets=[target]):
            prompt = {key: value[i // 2 : i // 2 + 1] for key, value in embeds.items()}
            singles.append(pipe(**call, **prompt, latents=latents[i : i + 1]).images)
    singles = torch.cat(singles)
    assert (batch - unguided).abs().max() > 1e-2
    torch.testing.assert_close(batch, singles, rtol=0, atol=1e-4)


PROMPTS = ("a digit", "a seven")


# -- refusals, and the denoiser restored ----------------------------------------------------------------------------


class PlainNetwork(torch.nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda pipe, classifier: (setattr(pipe, "scheduler", diffusers.LMSDiscreteScheduler()), pipe)[1],
            "`scheduler` LMSDiscreteScheduler is not handled",
        ),
        (
            lambda pipe, classifier: DDPMPipeline(PlainNetwork(), pipe.scheduler),
            r"`pipe.unet` PlainNetwork takes \(x\); guided needs a `sample` or `hidden_states` input and a `timestep`",
        ),
        (
            lambda pipe, classifier: diffusers.utils.BaseOutput(),
            "`pipe` BaseOutput has no denoiser `unet` or `transformer`",
        ),
        (
            lambda pipe, classifier: diffusers.LDMPipeline(
                diffusers.VQModel(block_out_channels=(8,), norm_num_groups=4, latent_channels=1),
                pipe.unet,
                pipe.scheduler,
            ),
            "`pipe` LDMPipeline decodes its latents with `vqvae`; guided decodes latents with `pipe.vae` only",
        ),
    ],
)
def test_pipelines_that_cannot_be_guided_are_refused_by_name(make, match, tiny_classifier):
    pipe, _ = ddim_pipeline()
    with pytest.raises(ValueError, match=match):
        with guided(
            make(pipe, tiny_classifier), NaiveClassifierGuidance(tiny_classifier), classifier_scale=1.0, targets=[1, 4]
        ):
            pass


def test_guides_that_move_the_sample_and_bad_settings_are_refused(tiny_classifier):
    pipe, call = ddim_pipeline()
    with pytest.raises(ValueError, match="moves the sample before the denoiser sees it"):
        with guided(pipe, CalibratedEDMGuidance(tiny_classifier), classifier_scale=1.0, targets=[1, 4]):
            pass
    with pytest.raises(ValueError, match="Expected `classifier_scale` to be a finite number >= 0, but got nan"):
        with guided(pipe, NaiveClassifierGuidance(tiny_classifier), classifier_scale=float("nan"), targets=[1, 4]):
            pass
    with pytest.raises(ValueError, match="class 12"):
        with guided(pipe, NaiveClassifierGuidance(tiny_classifier), classifier_scale=1.0, targets=[1, 12]):
            pass


def test_the_denoiser_and_scheduler_are_restored_after_an_error(tiny_classifier):
    pipe, call = ddim_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=True)
    scheduler = pipe.scheduler
    with pytest.raises(ValueError, match="`targets` has 3 entries, but the denoiser was called on a batch of 2"):
        with guided(pipe, NaiveClassifierGuidance(tiny_classifier), classifier_scale=1.0, targets=[1, 4, 5]):
            assert pipe.scheduler is not scheduler and not pipe.scheduler.config.clip_sample  # steps unclipped inside
            pipe(**call)
    assert pipe.scheduler is scheduler and "forward" not in vars(pipe.unet)
    with pytest.raises(ValueError, match="timestep 123, which is not one of the scheduler's timesteps"):
        with guided(pipe, NaiveClassifierGuidance(tiny_classifier), classifier_scale=1.0, targets=[1, 4]):
            pipe.scheduler.set_timesteps(4)
            pipe.unet(torch.zeros(2, 1, 16, 16), torch.tensor(123))


# -- the digits: a stock DDIMPipeline guided toward threes -----------------------------------------------------------


def test_stock_ddim_pipeline_on_the_digits_draws_threes_as_guided_diffusion_pipeline():
    """The shipped models: DDIMPipeline.from_pretrained("assets/digits/ddpm-uncond") under `guided` at scale 4 gives
    the
    project's pipeline's samples, and the independent evaluator reads threes."""
    pipe = quiet(DDIMPipeline.from_pretrained("assets/digits/ddpm-uncond"))
    guidance = PredictedCleanImageGuidance("assets/digits/classifier-resnet")
    with guided(pipe, guidance, classifier_scale=4, targets=[3] * 10):
        stock = pipe(batch_size=10, num_inference_steps=25, generator=seeded(), output_type="np").images
    ours = quiet(GuidedDiffusionPipeline(pipe.unet, pipe.scheduler, guidance))
    expected = ours([3] * 10, num_inference_steps=25, classifier_scale=4, generator=seeded(), output_type="np").images
    np.testing.assert_allclose(stock, expected, rtol=0, atol=1e-5)
    evaluator = TimmClassifier.from_pretrained("assets/digits/evaluator").eval()
    with torch.no_grad():
        predicted = evaluator(torch.as_tensor(stock).permute(0, 3, 1, 2) * 2 - 1).argmax(1)
    assert (predicted == 3).float().mean() >= 0.3  # unguided, about 1 in 10 is a three


# -- plugguide/guide_stock_pipeline.py: the SDXL / SD3 / Flux recipe's code paths ---------------------------------------


def recipe_script():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "plugguide" / "guide_stock_pipeline.py"
    spec = importlib.util.spec_from_file_location("guide_stock_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name", ["StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline", "IFPipeline"]
)
def test_recipe_raises_the_guides_log_likelihood_of_the_class(name, sd_path, if_path, tmp_path):
    """`generate` with a saved 3-channel classifier (behind the decoder for SDXL, SD3 and Flux), 2 prompts'
    embeddings and the pipeline's own CFG: the guide's own log-likelihood of the class on the final images rises
    against the unguided run at the same seeds, image by image.

    s = 10 is the recipe's default. The tiny random decoders and classifier pass back small gradients, so at s = 10
    the log-likelihood of the tiny SDXL and Flux moves by a few 1e-3 per image over 6 steps (SD3 and IF by 1e-2 to
    1e-1), and by as much downward with the gradient's sign flipped; s = 3 moves SDXL and Flux by under 1e-3.
    """
    script = recipe_script()
    pipe, call = build(name, sd_path, if_path)
    rgb_classifier().save_pretrained(str(tmp_path / "classifier"))
    guidance = script.make_guidance("calibrated", str(tmp_path / "classifier"), None)
    call |= CFG[name] | {"output_type": "pt", "num_inference_steps": 6}
    targets = torch.full((2,), 7)
    log_likelihood = {}
    for scale in (0.0, 10.0):
        samples = script.generate(pipe, guidance, 7, 2, scale, **call)
        assert samples.shape[:2] == (2, 3) and torch.isfinite(samples).all()
        with torch.no_grad():
            log_likelihood[scale] = guidance.log_likelihood(samples * 2 - 1, torch.zeros(2), targets)
    rise = log_likelihood[10.0] - log_likelihood[0.0]
    assert (rise > 0).all() and rise.mean() > 1e-3, rise


def test_recipe_script_runs_a_saved_pipeline_with_its_tokenizer_end_to_end(sd_path, tmp_path):
    script = recipe_script()
    pipe, _ = sd_pipeline(sd_path)
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe.register_modules(
        text_encoder=CLIPTextModel.from_pretrained(sd_path, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(sd_path, subfolder="tokenizer"),
    )
    pipe.save_pretrained(str(tmp_path / "pipeline"))
    rgb_classifier().save_pretrained(str(tmp_path / "classifier"))
    arguments = [
        "--pipeline-id",
        str(tmp_path / "pipeline"),
        "--classifier",
        str(tmp_path / "classifier"),
        "--class-id",
        "3",
        "--prompt",
        "a digit",
        "--steps",
        "2",
        "--num-images",
        "2",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    paths = script.main(arguments)
    assert [os.path.basename(path) for path in paths] == ["class3-000.png", "class3-001.png"] and all(
        os.path.isfile(path) for path in paths
    )
    with pytest.raises(ValueError, match="`--method` ppap needs `--experts`"):
        script.make_guidance("ppap", None, None)
    with pytest.raises(ValueError, match="`--method` calibrated needs `--classifier`"):
        script.make_guidance("calibrated", None, None)


# -- the same shift as a diffusers guider of a modular pipeline -------------------------------------------------------


def modular_sdxl(pipe: StableDiffusionXLPipeline):
    """The modular SDXL pipeline (text-to-image blocks without the text encoders) on the stock pipeline's
    components."""
    from diffusers.modular_pipelines import SequentialPipelineBlocks, StableDiffusionXLAutoBlocks

    blocks = StableDiffusionXLAutoBlocks().sub_blocks
    modular = SequentialPipelineBlocks.from_blocks_dict(
        {k: v for k, v in blocks.items() if k != "text_encoder"}
    ).init_pipeline()
    modular.update_components(unet=pipe.unet, vae=pipe.vae, scheduler=pipe.scheduler)
    modular.set_progress_bar_config(disable=True)
    return modular


@pytest.mark.parametrize("method", ["CalibratedGuidance", "ExpertGuidance"])
def test_gradient_guider_of_a_modular_pipeline_is_guided_on_the_stock_one(method):
    """`GradientGuidance` (a `ClassifierFreeGuidance` that installs the guided forward around each of its batches) in
    the modular SDXL pipeline gives the stock SDXL pipeline's samples under `guided`, with CFG; at scale 0 diffusers'
    own
    CFG guider's, bitwise."""
    from diffusers.guiders import ClassifierFreeGuidance

    from plugguide.pipelines import GradientGuidance

    pipe, call = sdxl_pipeline()
    modular = modular_sdxl(pipe)
    guidance = guidance_of(method, rgb_classifier())
    run = lambda: modular(**call, generator=seeded(), output_type="pt", output="images")  # noqa: E731
    runs = {}
    for scale in (0.0, 300.0):
        modular.update_components(guider=GradientGuidance(modular, guidance, scale, [1, 4], guidance_scale=3.0))
        runs[scale] = run()
    modular.update_components(guider=ClassifierFreeGuidance(guidance_scale=3.0))
    assert torch.equal(runs[0.0], run()) and "forward" not in vars(pipe.unet)
    with guided(pipe, guidance, classifier_scale=300.0, targets=[1, 4]):
        stock = pipe(**call, guidance_scale=3.0, generator=seeded(), output_type="pt").images
    assert (stock - runs[0.0]).abs().max() > 1e-3
    torch.testing.assert_close(runs[300.0], stock, rtol=0, atol=1e-5)


def test_gradient_guider_refuses_a_scheduler_that_clips(tiny_classifier):
    from plugguide.pipelines import GradientGuidance

    pipe, _ = ddim_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=True)
    with pytest.raises(ValueError, match="`scheduler` DDIMScheduler clips x0_hat inside its step"):
        GradientGuidance(pipe, NaiveClassifierGuidance(tiny_classifier), 1.0, [1, 4])


class GaussianDataDenoiser(ModelMixin, ConfigMixin):
    """The exact eps of data x0 ~ N(0, c^2 I) on DDIM's table: E[eps | x_t] = sqrt(1 - abar_t) x_t / (abar_t c^2 + 1 -
    abar_t)."""

    @register_to_config
    def __init__(self, sample_size: int = 2, in_channels: int = 1, spread: float = 0.3):
        super().__init__()
        self.register_buffer("alphas_cumprod", DDIMScheduler().alphas_cumprod.clone())

    def forward(self, sample, timestep, return_dict=True):
        abar = self.alphas_cumprod[int(timestep)]
        eps = (1 - abar).sqrt() * sample / (abar * self.config.spread**2 + 1 - abar)
        return UNet2DOutput(sample=eps) if return_dict else (eps,)


class GaussianLikelihood(Guidance):
    """log p(y | x_t) = -|x_t - mu_y|^2 / 2, whose gradient is mu_y - x_t."""

    def __init__(self, means: torch.Tensor):
        super().__init__(input="x_t")
        self.means = means

    def log_likelihood(self, inputs, timesteps, targets):
        return -0.5 * (inputs - self.means[targets]).pow(2).flatten(1).sum(1)


def test_ddim_pipeline_steps_with_the_hand_computed_guided_eps():
    """DDIMPipeline, 2 steps (t = 500, then 0), computed by hand from diffusers' abar table and DDIM's update
    (eta 0): eps' = eps - s sqrt(1 - abar_t) (mu_y - x_t), x0' = (x_t - sqrt(1 - abar_t) eps') / sqrt(abar_t),
    x_prev = sqrt(abar_prev) x0' + sqrt(1 - abar_prev) eps' (abar_prev = 1 after the last step)."""
    pipe = quiet(DDIMPipeline(GaussianDataDenoiser(), DDIMScheduler(clip_sample=False)))
    means = torch.tensor([-0.3, 0.4]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    targets, scale = torch.arange(8) % 2, 0.1
    with guided(pipe, GaussianLikelihood(means), classifier_scale=scale, targets=targets):
        samples = pipe(batch_size=8, num_inference_steps=2, generator=seeded(), output_type="np").images
    abar = DDIMScheduler().alphas_cumprod.double()
    x = torch.randn(8, 1, 2, 2, generator=seeded()).double()  # DDIMPipeline's initial noise
    for t, abar_prev in ((500, abar[0]), (0, torch.tensor(1.0, dtype=torch.float64))):
        eps = (1 - abar[t]).sqrt() * x / (abar[t] * 0.3**2 + 1 - abar[t])
        eps = eps - scale * (1 - abar[t]).sqrt() * (means[targets].double() - x)
        x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
    expected = (x / 2 + 0.5).permute(0, 2, 3, 1).numpy()
    unguided = pipe(batch_size=8, num_inference_steps=2, generator=seeded(), output_type="np").images
    assert ((expected > 0) & (expected < 1)).all() and abs(expected - unguided).max() > 0.05
    np.testing.assert_allclose(samples, expected, rtol=0, atol=1e-5)


def test_ancestral_ddpm_pipeline_takes_the_score_shift_form():
    """Inside a denoiser wrapper the DDPM step's mean moves by s (beta_t / sqrt(alpha_t)) grad, the score-shift form,
    not by Dhariwal & Nichol's s Sigma_t grad: one step of DDPMPipeline (t = 0, where Sigma_t = 0 and no noise is
    drawn)."""
    denoiser = StockMixtureDenoiser("vp", "epsilon")
    pipe = quiet(DDPMPipeline(denoiser, DDPMScheduler(clip_sample=False)))
    denoiser.pipe = [pipe]
    targets = torch.arange(32) % 2

    def run() -> torch.Tensor:
        return torch.as_tensor(pipe(batch_size=32, num_inference_steps=1, generator=seeded(), output_type="np").images)

    with guided(pipe, MixtureClassifier(denoiser), classifier_scale=0.5, targets=targets):
        shifted = run()
    unguided = run()
    x = torch.randn(32, 2, 1, 1, generator=seeded())  # DDPMPipeline's initial noise
    abar = float(pipe.scheduler.alphas_cumprod[0])
    denoiser.level = true_level(pipe.scheduler, "vp", 0, torch.tensor(0))
    with torch.enable_grad():
        inputs = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(MixtureClassifier(denoiser).log_likelihood(inputs, None, targets).sum(), inputs)
    expected = 0.5 * (1 - abar) / abar**0.5 * grad.permute(0, 2, 3, 1) / 2  # images are x / 2 + 0.5, unclamped here
    inside = (unguided > 0) & (unguided < 1) & (shifted > 0) & (shifted < 1)
    assert inside.float().mean() > 0.5 and expected[inside].abs().max() > 1e-4
    torch.testing.assert_close((shifted - unguided)[inside], expected[inside], rtol=1e-3, atol=1e-6)
