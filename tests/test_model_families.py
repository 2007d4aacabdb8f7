"""Every model family: unguided samples are diffusers' own, guidance moves samples as the exact guided score does."""

from __future__ import annotations

import inspect
import math

import diffusers
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDPMPipeline,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)

from plugguide.models import SCHEDULER_FAMILIES, load_text_encoder, prompt_conditioning
from plugguide.pipelines import GuidedDiffusionPipeline
from plugguide.pipelines.guidance.base import Guidance
from plugguide.pipelines.guidance.naive_classifier import NaiveClassifierGuidance
from plugguide.pipelines.guided_diffusion import SamplingRun
from plugguide.pipelines.model_family import ModelFamily
from tests.conftest import TINY_UNET, tiny_scheduler
from tests.test_guide_distillation import write_tiny_text_to_image_pipeline

# DDPMPipeline passes a generator to `step`, which UniPC, DEIS and PNDM do not take (Stable Diffusion's test covers them).
VP = [
    name
    for name, kind in SCHEDULER_FAMILIES.items()
    if kind == "vp" and "generator" in inspect.signature(getattr(diffusers, name).step).parameters
]
NOT_FLOW = [name for name, kind in SCHEDULER_FAMILIES.items() if kind != "flow"]
KARRAS = {"use_karras_sigmas": True}


def sampler(name: str, config, **overrides):
    return getattr(diffusers, name).from_config(config, **overrides)


# -- unguided sampling is the stock pipeline's -----------------------------------------------------------------


@pytest.mark.parametrize("name", VP)
def test_unguided_vp_sampling_is_the_ddpm_pipelines(name):
    torch.manual_seed(0)
    unet, scheduler = UNet2DModel(**TINY_UNET), sampler(name, tiny_scheduler().config)
    stock = DDPMPipeline(unet, scheduler)
    stock.set_progress_bar_config(disable=True)
    ours = GuidedDiffusionPipeline(unet, scheduler)
    ours.set_progress_bar_config(disable=True)
    expected = stock(
        batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    images = ours(
        batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert abs(images - expected).max() == 0


@pytest.fixture(scope="module")
def text_to_image(tmp_path_factory) -> dict:
    path = str(tmp_path_factory.mktemp("tiny-sd"))
    write_tiny_text_to_image_pipeline(path)
    encoder, tokenizer = load_text_encoder(path)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    return dict(
        path=path,
        unet=unet,
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
        text_encoder=encoder,
        tokenizer=tokenizer,
        config=DDPMScheduler.load_config(path, subfolder="scheduler"),
    )


@pytest.mark.parametrize(
    "name, overrides",
    [(name, {}) for name in NOT_FLOW]
    + [("EulerDiscreteScheduler", KARRAS), ("DPMSolverMultistepScheduler", KARRAS), ("HeunDiscreteScheduler", KARRAS)],
)
def test_unguided_sampling_of_a_text_model_is_stable_diffusions(name, overrides, text_to_image):
    """A cross-attention UNet + VAE under a prompt's embeddings, every VP, sigma-space and EDM sampler, against diffusers' own pipeline."""
    scheduler = sampler(name, text_to_image["config"], **overrides)
    conditioning = prompt_conditioning(text_to_image["path"], text_to_image["unet"], "a digit")
    parts = {key: text_to_image[key] for key in ("unet", "vae", "text_encoder", "tokenizer")}
    stock = StableDiffusionPipeline(
        **parts, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    stock.set_progress_bar_config(disable=True)
    expected = stock(
        prompt_embeds=conditioning["prompt_embeds"],
        guidance_scale=1.0,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    ours = GuidedDiffusionPipeline(parts["unet"], scheduler, vae=parts["vae"], **conditioning)
    ours.set_progress_bar_config(disable=True)
    images = ours(
        batch_size=1, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)


def test_cfg_on_a_prompt_given_at_call_time_is_stable_diffusions(text_to_image):
    """`prompt` and `guidance_scale` mean what they mean in diffusers: the same samples as StableDiffusionPipeline at g = 5."""
    scheduler = sampler("DDIMScheduler", text_to_image["config"])
    parts = {key: text_to_image[key] for key in ("unet", "vae", "text_encoder", "tokenizer")}
    stock = StableDiffusionPipeline(
        **parts, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    stock.set_progress_bar_config(disable=True)
    expected = stock(
        prompt="a digit",
        guidance_scale=5.0,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    ours = GuidedDiffusionPipeline(
        parts["unet"], scheduler, vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"]
    )
    ours.set_progress_bar_config(disable=True)
    images = ours(
        prompt="a digit",
        guidance_scale=5.0,
        batch_size=1,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    unguided = ours(
        prompt="a digit",
        batch_size=1,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert not torch.allclose(unguided, expected, atol=1e-3)  # g = 1 is CFG off, as in diffusers


@pytest.mark.parametrize("guidance_class", ["CalibratedGuidance", "ExpertGuidance"])
def test_classifier_guidance_steers_a_text_model_under_cfg_on_a_prompt(guidance_class, text_to_image):
    """Calibrated guidance and PPAP experts on a cross-attention UNet + VAE (Stable Diffusion's classes), with CFG on a prompt."""
    from plugguide.models import MultiExpertModel, TimmClassifier
    from plugguide.pipelines.guidance import CalibratedGuidance, ExpertGuidance
    from tests.conftest import TINY_RESNET

    torch.manual_seed(0)
    classifier = TimmClassifier(**TINY_RESNET | dict(in_chans=3))
    guidance = (
        CalibratedGuidance(classifier)
        if guidance_class == "CalibratedGuidance"
        else ExpertGuidance(MultiExpertModel(classifier, num_experts=2, lora_rank=2))
    )
    conditioning = prompt_conditioning(text_to_image["path"], text_to_image["unet"], "a digit")
    scheduler = sampler("EulerDiscreteScheduler", text_to_image["config"])
    pipeline = GuidedDiffusionPipeline(
        text_to_image["unet"], scheduler, guidance, vae=text_to_image["vae"], **conditioning
    )
    pipeline.set_progress_bar_config(disable=True)
    run = lambda scale: (
        pipeline(
            [1, 4],
            num_inference_steps=3,
            classifier_scale=scale,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images
    )
    unguided, guided = run(0.0), run(50.0)
    assert guided.shape == (2, 3, 16, 16) and torch.isfinite(guided).all() and not torch.allclose(guided, unguided)


def test_unguided_flow_sampling_is_the_flow_pipelines_loop():
    """diffusers' flow pipelines (SD3, Flux) feed x unscaled and step on the velocity; no unconditional UNet pipeline exists to call."""
    torch.manual_seed(0)
    unet, scheduler = UNet2DModel(**TINY_UNET), diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = GuidedDiffusionPipeline(unet, scheduler)
    ours.set_progress_bar_config(disable=True)
    images = ours(
        batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    x = diffusers.utils.torch_utils.randn_tensor((2, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    scheduler.set_timesteps(4)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t.expand(2)).sample, t, x).prev_sample
    assert torch.equal(images, (x / 2 + 0.5).clamp(0, 1))


def test_step_callback_sees_each_steps_output_and_may_replace_it():
    """diffusers' `callback_on_step_end`: once per step with the evaluated timestep and the state after the step; a
    returned "latents" is what the run goes on from; a callback that returns its input leaves the samples bitwise alone."""
    torch.manual_seed(0)
    pipeline = GuidedDiffusionPipeline(UNet2DModel(**TINY_UNET), tiny_scheduler())
    pipeline.set_progress_bar_config(disable=True)
    run = lambda **kwargs: (
        pipeline(
            batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs
        ).images
    )
    calls = []

    def watch(pipe, index, timestep, tensors):
        calls.append((index, int(timestep), tensors["latents"].clone()))
        return tensors

    plain, watched = run(), run(callback_on_step_end=watch)
    assert torch.equal(watched, plain)
    assert (
        [(index, t) for index, t, _ in calls]
        == list(enumerate(pipeline.scheduler.timesteps.tolist()))
        == [(0, 750), (1, 500), (2, 250), (3, 0)]
    )
    assert torch.equal((calls[-1][2] / 2 + 0.5).clamp(0, 1), plain)  # the last step's output is the sample

    def replace_at(step):
        return lambda pipe, index, timestep, tensors: (
            {"latents": torch.zeros_like(tensors["latents"])} if index == step else tensors
        )

    assert torch.equal(run(callback_on_step_end=replace_at(3)), torch.full_like(plain, 0.5))
    assert not torch.allclose(run(callback_on_step_end=replace_at(1)), plain)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs.*prompt_embeds"):
        run(callback_on_step_end=watch, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])


def test_given_initial_noise_is_the_generators_own_draw_and_must_fit():
    torch.manual_seed(0)
    pipeline = GuidedDiffusionPipeline(UNet2DModel(**TINY_UNET), tiny_scheduler())
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    noise = diffusers.utils.torch_utils.randn_tensor((2, 1, 16, 16), generator=generator)
    given = pipeline(batch_size=2, num_inference_steps=4, generator=generator, latents=noise, output_type="pt").images
    assert torch.equal(
        given,
        pipeline(
            batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt"
        ).images,
    )
    with pytest.raises(ValueError, match=r"`latents` of shape \(2, 1, 16, 16\).*\(3, 1, 16, 16\)"):
        pipeline(batch_size=2, num_inference_steps=4, latents=torch.zeros(3, 1, 16, 16))


# -- the conversion agrees with diffusers' own x0_hat, for every prediction type ---------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "DDIMScheduler",
        "DDPMScheduler",
        "EulerDiscreteScheduler",
        "HeunDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "EDMEulerScheduler",
    ],
)
def test_v_and_sample_prediction_give_the_epsilon_models_x0_hat(name):
    """On one state: an eps model, the v model and the x0 model that predict the same x0 give ModelFamily the same x0_hat,
    and it is the `pred_original_sample` diffusers' own `step` computes from each."""
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 1, 4, 4, generator=generator), torch.randn(3, 1, 4, 4, generator=generator)
    estimates = {}
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        if name in ("EDMEulerScheduler", "EulerAncestralDiscreteScheduler") and prediction_type == "sample":
            continue  # diffusers implements no x0 output for these samplers (refused by name below)
        scheduler = sampler(
            name,
            DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False).config,
            prediction_type=prediction_type,
        )
        scheduler.set_timesteps(10)
        family = ModelFamily(scheduler)
        index = 3
        t = scheduler.timesteps[index]
        level = family.noise_level(index, t)
        x = level.scale * (level.alpha * x0 + level.sigma * eps)
        if family.kind == "edm":  # EDM's network output F: x0 = c_skip x + c_out F
            skip, c_out = (
                scheduler.precondition_outputs(x, torch.zeros_like(x), level.sampler_sigma),
                scheduler.precondition_outputs(torch.zeros(()), torch.ones(()), level.sampler_sigma),
            )
            output = (x0 - skip) / c_out
        else:
            output = {"epsilon": eps, "v_prediction": level.alpha * eps - level.sigma * x0, "sample": x0}[
                prediction_type
            ]
        estimate = family.predicted_clean(output, x, level)
        torch.testing.assert_close(estimate, x0, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close((x / level.scale - level.alpha * estimate) / level.sigma, eps, rtol=1e-3, atol=1e-3)
        scheduler._step_index = index  # diffusers reads the state's sigma at its step index
        torch.testing.assert_close(scheduler.step(output, t, x).pred_original_sample, estimate, rtol=1e-4, atol=1e-4)
        estimates[prediction_type] = estimate
    assert len(estimates) >= 2


# -- a 2-D mixture of Gaussians: the guided score of an exact classifier is the class-conditional score -------------

MEANS = torch.tensor([[-0.8, 0.4], [0.7, -0.5]])
SPREAD = 0.3  # std of each component


# A UNet2DModel of the mixture's shape whose forward the exact denoisers replace (its weights are never used).
MIXTURE_UNET = dict(
    sample_size=1,
    in_channels=2,
    out_channels=2,
    block_out_channels=(4,),
    down_block_types=("DownBlock2D",),
    up_block_types=("UpBlock2D",),
    layers_per_block=1,
    norm_num_groups=2,
)


def mixture_posterior(
    x_t: torch.Tensor, alpha: float | torch.Tensor, sigma: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(k | x_t), E[x0 | x_t, k]) of x0 ~ 1/2 N(mu_0, s^2) + 1/2 N(mu_1, s^2), x_t = alpha x0 + sigma eps; points
    are (B, 2, 1, 1), alpha and sigma numbers or (B, 1, 1) per point."""
    points = x_t.flatten(1)[:, None]  # (B, 1, 2)
    variance = alpha**2 * SPREAD**2 + sigma**2
    log_density = -((points - alpha * MEANS) ** 2).sum(-1, keepdim=True) / (2 * variance)  # (B, K, 1)
    clean = MEANS + (alpha * SPREAD**2 / variance) * (points - alpha * MEANS)  # (B, K, 2)
    return log_density[..., 0].log_softmax(-1), clean


class MixtureDenoiser(UNet2DModel):
    """The exact denoiser of the mixture in a chosen parametrisation; the test sets the noise level of each evaluation.

    `target` None: the unconditional E[x0 | x_t]; a class k: E[x0 | x_t, k], the denoiser of p(x_t | k).
    """

    def __init__(self):
        super().__init__(**MIXTURE_UNET)
        self.level, self.target, self.output = None, None, None

    def forward(self, model_input, timestep, return_dict=True):
        alpha, sigma, input_scale, output = (
            self.level["alpha"],
            self.level["sigma"],
            self.level["input_scale"],
            self.output,
        )
        x_t = model_input / input_scale
        log_posterior, clean = mixture_posterior(x_t, alpha, sigma)
        x0 = (
            (log_posterior.exp()[..., None] * clean).sum(1)
            if self.target is None
            else clean[torch.arange(len(x_t)), self.target]
        )
        x0 = x0.view_as(x_t)
        eps = (x_t - alpha * x0) / sigma
        return diffusers.models.unets.unet_2d.UNet2DOutput(sample=output(x0, eps, alpha, sigma))


class MixtureClassifier(Guidance):
    """The exact noisy classifier log p(y | x_t) of the mixture at the level the test set."""

    def __init__(self, denoiser: MixtureDenoiser):
        super().__init__(input="x_t")
        self.denoiser = [denoiser]  # not a submodule

    def log_likelihood(self, inputs, timesteps, targets):
        level = self.denoiser[0].level
        return mixture_posterior(inputs, level["alpha"], level["sigma"])[0].gather(1, targets[:, None])[:, 0]


def true_level(scheduler, family_kind: str, index: int, t) -> dict:
    """The noise level of evaluation `index`, restated from diffusers' tables: vp abar_t (or its sigma table), sigma/EDM
    x = x0 + s eps, flow x = (1 - s) x0 + s eps; and how the network's input is scaled from x_t."""
    if family_kind == "vp" and not hasattr(scheduler, "sigmas"):
        abar = float(scheduler.alphas_cumprod[int(t)])
        return dict(alpha=abar**0.5, sigma=(1 - abar) ** 0.5, input_scale=1.0, s=((1 - abar) / abar) ** 0.5)
    s = float(scheduler.sigmas[index])
    if family_kind == "flow":
        norm = math.hypot(1 - s, s)
        return dict(alpha=(1 - s) / norm, sigma=s / norm, input_scale=norm, s=s)
    alpha = (1 + s * s) ** -0.5
    input_scale = (
        float(scheduler.precondition_inputs(torch.ones(()), s)) / alpha if family_kind == "edm" else 1.0
    )  # EDM's c_in
    return dict(alpha=alpha, sigma=s * alpha, input_scale=input_scale, s=s)


def output_function(scheduler, kind: str, prediction_type: str):
    """The network output of each parametrisation from (x0, eps), by its definition."""
    if kind == "flow":
        return lambda x0, eps, alpha, sigma: eps - x0
    if kind == "edm":  # x0 = c_skip x + c_out F, x = x0 + s eps in EDM's space

        def edm(x0, eps, alpha, sigma):
            s = sigma / alpha
            x = x0 + s * eps
            return (x0 - scheduler.precondition_outputs(x, torch.zeros_like(x), s)) / scheduler.precondition_outputs(
                torch.zeros(()), torch.ones(()), s
            )

        return edm
    return {
        "epsilon": lambda x0, eps, a, s: eps,
        "v_prediction": lambda x0, eps, a, s: a * eps - s * x0,
        "sample": lambda x0, eps, a, s: x0,
    }[prediction_type]


FAMILY_CASES = [
    ("DDIMScheduler", "epsilon", {}),
    ("DDIMScheduler", "v_prediction", {}),
    ("DDIMScheduler", "sample", {}),
    ("DPMSolverMultistepScheduler", "epsilon", {}),
    ("DPMSolverMultistepScheduler", "v_prediction", {}),
    ("DPMSolverSinglestepScheduler", "epsilon", {}),
    ("UniPCMultistepScheduler", "epsilon", {}),
    ("DEISMultistepScheduler", "epsilon", {}),
    ("PNDMScheduler", "epsilon", {}),
    ("EulerDiscreteScheduler", "epsilon", {}),
    ("EulerDiscreteScheduler", "v_prediction", {}),
    ("EulerDiscreteScheduler", "epsilon", KARRAS),
    ("EulerAncestralDiscreteScheduler", "epsilon", {}),
    ("HeunDiscreteScheduler", "epsilon", {}),
    ("HeunDiscreteScheduler", "sample", KARRAS),
    ("EDMEulerScheduler", "epsilon", {}),
    ("EDMEulerScheduler", "v_prediction", {}),
    ("EDMDPMSolverMultistepScheduler", "epsilon", {}),
    ("FlowMatchEulerDiscreteScheduler", "flow", {}),
    ("FlowMatchEulerDiscreteScheduler", "flow", {"shift": 3.0}),
]


@pytest.mark.parametrize("name, prediction_type, overrides", FAMILY_CASES)
def test_guided_sampling_follows_the_exact_guided_score(name, prediction_type, overrides):
    """With the exact noisy classifier at scale 1, grad log p(x_t) + grad log p(y | x_t) = grad log p(x_t | y): the guided run
    of the unconditional mixture must be the stock run of the class-conditional denoiser, step for step (Heun: both evaluations)."""
    config = DDPMScheduler(
        clip_sample=False
    ).config  # linear betas: sigma_max 157, not the cosine schedule's 20,291 (float32 states)
    kind = SCHEDULER_FAMILIES[name]
    extra = overrides | ({} if kind == "flow" else {"prediction_type": prediction_type})
    denoiser = MixtureDenoiser()
    targets = torch.arange(32) % 2
    runs = {}
    for guided in (True, False):
        scheduler = sampler(name, config, **extra)
        family = ModelFamily(scheduler)
        denoiser.output = output_function(scheduler, kind, prediction_type)
        denoiser.target = None if guided else targets
        pipeline = GuidedDiffusionPipeline(denoiser, scheduler, MixtureClassifier(denoiser) if guided else None)
        # Flow samplers start at s = 1, pure noise, where the shift's factor 1 / (1 - s) is infinite and the pipeline
        # drops it (the exact term is a 0 x inf limit no gradient gives); start the comparison just below.
        scheduler.set_timesteps(sigmas=[0.97, 0.8, 0.6, 0.4, 0.2, 0.1]) if kind == "flow" else scheduler.set_timesteps(
            6
        )
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(32, 2, 1, 1, generator=generator) * family.init_noise_sigma
        run = SamplingRun(family, targets, targets, 1.0 if guided else 0.0, 0.0, generator)
        for index, t in enumerate(scheduler.timesteps):
            denoiser.level = true_level(scheduler, kind, index, t)
            x = pipeline.denoising_step(run, x, index, t)
        runs[guided] = x
    scale = runs[False].abs().max()
    assert (runs[True] - runs[False]).abs().max() <= 1e-3 * scale
    assert (runs[False].flatten(1) - MEANS[targets]).norm(
        dim=1
    ).mean() < 3 * SPREAD  # the conditional run reached its class


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
def test_ancestral_ddpm_shifts_the_mean_by_the_step_variance_times_the_gradient(variance_type):
    """Dhariwal & Nichol's condition_mean: one guided DDPM step = the unguided one (same noise) + s Sigma_t grad log p(y | x_t),
    Sigma_t the variance diffusers' step samples with: beta tilde for fixed_small(_log), beta_t for fixed_large."""
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type=variance_type)
    scheduler.set_timesteps(10)
    denoiser, targets, index = MixtureDenoiser(), torch.arange(16) % 2, 4
    denoiser.output = output_function(scheduler, "vp", "epsilon")
    t = scheduler.timesteps[index]
    denoiser.level = true_level(scheduler, "vp", index, t)
    x = torch.randn(16, 2, 1, 1, generator=torch.Generator().manual_seed(1))
    steps = {}
    for scale in (0.0, 2.0):
        pipeline = GuidedDiffusionPipeline(denoiser, scheduler, MixtureClassifier(denoiser))
        run = SamplingRun(ModelFamily(scheduler), targets, targets, scale, 0.0, torch.Generator().manual_seed(0))
        steps[scale] = pipeline.denoising_step(run, x, index, t)
    abar, abar_prev = scheduler.alphas_cumprod[int(t)], scheduler.alphas_cumprod[int(scheduler.timesteps[index + 1])]
    beta = 1 - abar / abar_prev
    variance = beta if variance_type == "fixed_large" else (1 - abar_prev) / (1 - abar) * beta
    # the step's noise has this variance: diffusers' own unguided step, run twice with two noise draws, differs by it
    zeros = torch.zeros(20000, 1, 1, 1)
    draws = [
        scheduler.step(zeros, t, zeros, generator=torch.Generator().manual_seed(seed)).prev_sample for seed in (0, 1)
    ]
    assert abs(float((draws[0] - draws[1]).var() / 2) / float(variance) - 1) < 0.05
    with torch.enable_grad():
        inputs = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(MixtureClassifier(denoiser).log_likelihood(inputs, None, targets).sum(), inputs)
    torch.testing.assert_close(steps[2.0] - steps[0.0], 2.0 * variance * grad, rtol=1e-4, atol=1e-6)


def test_settings_whose_numbers_would_be_wrong_are_refused_by_name():
    """fixed_large_log samples NaN inside diffusers; VP samplers on flow sigmas have another state; PNDM averages v across t."""
    with pytest.raises(ValueError, match="variance_type`='fixed_large_log'"):
        ModelFamily(DDPMScheduler(variance_type="fixed_large_log"))
    for name in (
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "UniPCMultistepScheduler",
        "DEISMultistepScheduler",
    ):
        with pytest.raises(ValueError, match=f"{name} with `use_flow_sigmas`=True"):
            ModelFamily(sampler(name, DDPMScheduler().config, use_flow_sigmas=True))
    with pytest.raises(ValueError, match="`prediction_type`='v_prediction' of PNDMScheduler"):
        ModelFamily(sampler("PNDMScheduler", DDPMScheduler(prediction_type="v_prediction").config))


# -- noise levels, train timesteps, clipping and refusals -------------------------------------------------------------


def test_train_timesteps_are_the_nearest_of_each_schedulers_own_table():
    config = DDPMScheduler(beta_schedule="squaredcos_cap_v2").config
    euler = sampler("EulerDiscreteScheduler", config, **KARRAS)
    euler.set_timesteps(25)
    family = ModelFamily(euler)
    log_snr = (euler.alphas_cumprod / (1 - euler.alphas_cumprod)).double().log()
    for index in (0, 7, 24):
        level = family.noise_level(index, euler.timesteps[index])
        assert level.timestep == int((log_snr + 2 * math.log(float(euler.sigmas[index]))).abs().argmin())
        assert abs(level.timestep - float(euler.timesteps[index])) <= 1  # diffusers' own (fractional) model timestep
    heun = sampler("HeunDiscreteScheduler", config)
    heun.set_timesteps(5)
    levels = [ModelFamily(heun).noise_level(k, t) for k, t in enumerate(heun.timesteps)]
    assert [(level.index, level.first_evaluation) for level in levels] == [
        (0, True),
        (0, False),
        (1, True),
        (1, False),
        (2, True),
        (2, False),
        (3, True),
        (3, False),
        (4, True),
    ]
    assert all(level.num_steps == 5 for level in levels)
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow.set_timesteps(10)
    assert [ModelFamily(flow).noise_level(k, t).timestep for k, t in enumerate(flow.timesteps)] == [
        min(round(float(t)), 999) for t in flow.timesteps
    ]
    edm = diffusers.EDMEulerScheduler()
    edm.set_timesteps(11)  # ramp steps of 0.1 land on the 1,001-level training table: t = 1000 - 100 k
    assert [ModelFamily(edm).noise_level(k, t).timestep for k, t in enumerate(edm.timesteps)] == [
        999,
        900,
        800,
        700,
        600,
        500,
        400,
        300,
        200,
        100,
        0,
    ]


def test_guided_ddim_with_clipping_follows_guided_diffusions_condition_score(tiny_classifier):
    """Clip x0_hat, re-derive eps from it, shift eps, step without clipping again (guided-diffusion `condition_score` + `ddim_sample`)."""
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_UNET)
    scheduler = DDPMScheduler(beta_schedule="linear", clip_sample=True)  # google/ddpm-cifar10-32's settings
    ddim = sampler("DDIMScheduler", scheduler.config)
    guidance = NaiveClassifierGuidance(tiny_classifier)
    pipeline = GuidedDiffusionPipeline(unet, ddim, guidance)
    pipeline.set_progress_bar_config(disable=True)
    labels, scale = torch.tensor([1, 5]), 30.0
    images = pipeline(
        class_labels=labels,
        num_inference_steps=3,
        classifier_scale=scale,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    # The authors' arithmetic (EluCD DDPM/guided_diffusion/gaussian_diffusion.py), eta = 0.
    x = diffusers.utils.torch_utils.randn_tensor((2, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    ddim.set_timesteps(3)
    timesteps = ddim.timesteps.tolist()
    for i, t in enumerate(timesteps):
        abar = ddim.alphas_cumprod[t]
        abar_prev = ddim.alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else ddim.final_alpha_cumprod
        with torch.no_grad():
            eps = unet(x, torch.tensor([t, t])).sample
        pred_xstart = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)  # p_mean_variance, clip_denoised
        eps = (x - abar.sqrt() * pred_xstart) / (1 - abar).sqrt()  # condition_score: _predict_eps_from_xstart
        eps = eps - (1 - abar).sqrt() * scale * guidance.gradient(x, torch.tensor([t, t]), pred_xstart, labels)
        pred_xstart = (x - (1 - abar).sqrt() * eps) / abar.sqrt()  # _predict_xstart_from_eps, not clipped again
        x = pred_xstart * abar_prev.sqrt() + (1 - abar_prev).sqrt() * eps  # ddim_sample, eta = 0
    torch.testing.assert_close(images, (x / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-5)
    assert ddim.config.clip_sample  # the user's scheduler still clips (unguided runs are diffusers' own)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: diffusers.LMSDiscreteScheduler(), "LMSDiscreteScheduler is not handled"),
        (
            lambda: diffusers.DDIMScheduler(prediction_type="flow_prediction"),
            "`prediction_type`='flow_prediction' of DDIMScheduler",
        ),
        (
            lambda: diffusers.EDMEulerScheduler(prediction_type="sample"),
            "`prediction_type`='sample' of EDMEulerScheduler",
        ),
        (
            lambda: diffusers.EulerAncestralDiscreteScheduler(prediction_type="sample"),
            "`prediction_type`='sample' of EulerAncestralDiscreteScheduler",
        ),
        (lambda: diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), "`use_dynamic_shifting`=True"),
    ],
)
def test_unhandled_samplers_and_prediction_types_name_themselves(make, match):
    with pytest.raises(ValueError, match=match):
        GuidedDiffusionPipeline(UNet2DModel(**TINY_UNET), make())


@pytest.mark.parametrize("name", SCHEDULER_FAMILIES)
def test_a_subclass_of_a_stock_sampler_converts_as_the_sampler_it_extends(name):
    """A subclass of any handled sampler (made here, under another class name) gets its base's family, noise levels
    and output conversion, and its base's fewer prediction types (PNDM's subclass still refuses v-prediction)."""
    base = getattr(diffusers, name)
    subclass = type(f"Subclassed{name}", (base,), {})
    if name == "PNDMScheduler":
        with pytest.raises(ValueError, match="`prediction_type`='v_prediction' of PNDMScheduler"):
            ModelFamily(subclass(prediction_type="v_prediction"))
    stock, derived = ModelFamily(base()), ModelFamily(subclass())
    for family in (stock, derived):
        family.set_timesteps(4)
    assert (derived.kind, derived.prediction_type) == (stock.kind, stock.prediction_type)
    x, output = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)).unbind(0)
    for index, timestep in enumerate(stock.scheduler.timesteps[:2]):
        level = stock.noise_level(index, timestep)
        if level.alpha <= 0:  # flow's first evaluation, pure noise
            continue
        assert derived.noise_level(index, timestep) == level
        torch.testing.assert_close(derived.predicted_clean(output, x, level), stock.predicted_clean(output, x, level))


def test_a_namesake_of_a_stock_sampler_is_refused():
    """A class that only shares a stock sampler's name (here an LMS sampler called DDIMScheduler) is not converted as
    that sampler: the family is read off diffusers' own classes."""
    namesake = type("DDIMScheduler", (diffusers.LMSDiscreteScheduler,), {})
    with pytest.raises(ValueError, match="`scheduler` DDIMScheduler is not handled by guided sampling"):
        ModelFamily(namesake())


# -- the sampling job runs every sampler, guided and unguided --------------------------------------------------------


@pytest.fixture(scope="module")
def family_models(tiny_assets, tmp_path_factory) -> dict[str, str]:
    """Tiny models saved as each family trains them: DDPM betas (the shared tiny asset), EDM and flow matching."""
    root = tmp_path_factory.mktemp("families")
    paths = {"betas": tiny_assets["ddpm-uncond"]}
    for kind, scheduler in (
        ("edm", diffusers.EDMEulerScheduler()),
        ("flow", diffusers.FlowMatchEulerDiscreteScheduler()),
    ):
        torch.manual_seed(0)
        paths[kind] = str(root / kind)
        DDPMPipeline(unet=UNet2DModel(**TINY_UNET), scheduler=scheduler).save_pretrained(paths[kind])
    return paths


SAMPLING_JOB_CASES = [(name, None) for name in SCHEDULER_FAMILIES] + [
    ("EulerDiscreteScheduler", KARRAS),
    ("HeunDiscreteScheduler", KARRAS),
    ("DPMSolverMultistepScheduler", KARRAS),
]


@pytest.mark.parametrize(
    "name, overrides", SAMPLING_JOB_CASES, ids=[f"{n}{'-karras' if o else ''}" for n, o in SAMPLING_JOB_CASES]
)
def test_sampling_job_runs_every_sampler_guided_and_unguided(name, overrides, family_models, tiny_assets):
    """`GuidedSampling(scheduler=<name>)`, the sampling job's module, on the tiny model of the sampler's family."""
    from plugguide.models.diffusion_model import training_family
    from plugguide.modules import GuidedSampling
    from plugguide.pipelines.guidance import CalibratedGuidance

    batch = {"label": torch.tensor([3, 8]), "seed": torch.tensor([0, 1]), "index": torch.tensor([0, 1])}
    outputs = {}
    for scale in (0.0, 2.0):
        guidance = CalibratedGuidance(tiny_assets["classifier-resnet"]) if scale else None
        job = GuidedSampling(
            family_models[training_family(name)],
            name,
            4,
            guidance,
            scale,
            evaluator_path=None,
            scheduler_config=overrides,
        )
        outputs[scale] = job.predict_step(batch, 0)["images"]
        assert outputs[scale].shape == (2, 1, 16, 16) and torch.isfinite(outputs[scale]).all()
    assert not torch.equal(outputs[0.0], outputs[2.0])


@pytest.mark.parametrize(
    "name, overrides",
    [("EulerDiscreteScheduler", KARRAS), ("EDMEulerScheduler", None), ("FlowMatchEulerDiscreteScheduler", None)],
)
def test_lightning_predict_samples_each_family_guided(
    name, overrides, family_models, tiny_assets, tmp_path, monkeypatch
):
    """`lightning predict -c configs/sample.yaml --model.scheduler <name> [--model.scheduler_config ...] --model.guidance ...`."""
    from plugguide.models.diffusion_model import training_family
    from tests.test_cli import run, sampling_overrides

    monkeypatch.chdir(tmp_path)
    guidance = {
        "class_path": "plugguide.pipelines.guidance.CalibratedGuidance",
        "init_args": {"classifier": tiny_assets["classifier-resnet"]},
    }
    job = {
        "diffusion_model": family_models[training_family(name)],
        "scheduler": name,
        "scheduler_config": overrides,
        "num_inference_steps": 3,
    }
    model = job | {"guidance": guidance, "classifier_scale": 2.0, "evaluator_path": tiny_assets["evaluator"]}
    overrides_yaml = sampling_overrides(tmp_path, model, {"num_per_class": 1, "num_classes": 2, "batch_size": 2})
    run("predict", "sample.yaml", overrides_yaml, tmp_path)
    images = np.load(tmp_path / "out" / "samples.npz")["images"]
    assert images.shape == (2, 1, 16, 16) and np.isfinite(images).all()


def test_jobs_refuse_a_model_of_another_family(family_models, tiny_assets):
    from plugguide.modules import ExpertDistillation, GuidedSampling

    with pytest.raises(
        ValueError, match="flow matching.*`model.scheduler`='DDIMScheduler'.*Allowed: FlowMatchEulerDiscreteScheduler"
    ):
        GuidedSampling(family_models["flow"], "DDIMScheduler", evaluator_path=None)
    with pytest.raises(
        ValueError,
        match="was trained with FlowMatchEulerDiscreteScheduler .*this job needs a model trained with a DDPM noise schedule",
    ):
        ExpertDistillation(
            teacher_path=tiny_assets["classifier-resnet"], diffusion_model=family_models["flow"], evaluator_path=None
        )


class RecordingGuidance(NaiveClassifierGuidance):
    def log_likelihood(self, inputs, timesteps, targets):
        self.seen.append(timesteps.tolist())
        return super().log_likelihood(inputs, timesteps, targets)


@pytest.mark.parametrize(
    "name, overrides",
    [("EulerDiscreteScheduler", KARRAS), ("HeunDiscreteScheduler", KARRAS), ("FlowMatchEulerDiscreteScheduler", {})],
)
def test_guidance_sees_the_discrete_train_timestep_of_each_evaluation(name, overrides, tiny_classifier):
    """PPAP experts route by t: a sigma-space or flow evaluation hands guidance the integer train timestep of its noise level."""
    scheduler = sampler(name, tiny_scheduler().config, **overrides)
    guidance = RecordingGuidance(tiny_classifier)
    guidance.seen = []
    pipeline = GuidedDiffusionPipeline(UNet2DModel(**TINY_UNET), scheduler, guidance)
    pipeline.set_progress_bar_config(disable=True)
    pipeline([1, 2], num_inference_steps=5, classifier_scale=1.0, output_type="pt")
    family = ModelFamily(scheduler)  # the run left its timesteps set
    levels = [family.noise_level(k, t) for k, t in enumerate(scheduler.timesteps)]
    expected = [[level.timestep] * 2 for level in levels if level.alpha > 0]  # flow's s = 1 (pure noise) is not guided
    assert guidance.seen == expected and all(0 <= t[0] < 1000 and isinstance(t[0], int) for t in guidance.seen)
