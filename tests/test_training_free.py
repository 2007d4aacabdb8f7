"""Training-free guidance (TFG's design space and its presets) on every model family, in the project pipeline and in
stock pipelines, checked against the exact mixture posterior and against the authors' own step."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from plugguide.pipelines import GuidedDiffusionPipeline, guided
from plugguide.pipelines.guidance import DPS, LGD, MPGD, TFG, UGD, FreeDoM
from plugguide.pipelines.guided_diffusion import SamplingRun
from plugguide.pipelines.model_family import ModelFamily
from plugguide.pipelines.recurrence import repeatable_step
from plugguide.pipelines.training_free_cost import training_free_cost
from plugguide.pipelines.training_free_update import signal_ratios
from tests.conftest import TINY_UNET, tiny_scheduler
from tests.test_guide_distillation import write_tiny_text_to_image_pipeline
from tests.test_guided_stock_pipelines import ddim_pipeline, quiet, rgb_classifier, sd3_pipeline, sd_pipeline
from tests.test_model_families import MEANS, MIXTURE_UNET, SPREAD, mixture_posterior

# -- the exact mixture: rho through the denoiser at s = 1 ------------------------------------------------------------


class TimestepMixtureDenoiser(UNet2DModel):
    """The exact eps of the 2-D mixture of `tests.test_model_families` under a VP schedule, read off the timestep, and
    differentiable in its input (the rho term's gradient runs through it)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__(**MIXTURE_UNET)
        self.register_buffer("abar", alphas_cumprod.clone(), persistent=False)

    def forward(self, sample, timestep, return_dict=True):
        abar = self.abar[torch.as_tensor(timestep).long().expand(sample.shape[0])].view(-1, 1, 1)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        log_posterior, clean = mixture_posterior(sample, alpha, sigma)
        x0 = (log_posterior.exp()[..., None] * clean).sum(1)
        eps = (sample.flatten(1) - alpha[:, 0] * x0) / sigma[:, 0]
        return diffusers.models.unets.unet_2d.UNet2DOutput(sample=eps.view_as(sample))


class CleanMixtureClassifier(torch.nn.Module):
    """The exact classifier of clean mixture points: logits log N(x0; mu_k, s^2) (equal class priors)."""

    def forward(self, x0):
        return -((x0.flatten(1)[:, None] - MEANS) ** 2).sum(-1) / (2 * SPREAD**2)


def mixture_samples(guidance, scale: float, samples: int = 1000, steps: int = 20) -> torch.Tensor:
    scheduler = DDIMScheduler(clip_sample=False)
    pipeline = GuidedDiffusionPipeline(TimestepMixtureDenoiser(scheduler.alphas_cumprod), scheduler, guidance)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        torch.zeros(samples, dtype=torch.long),
        num_inference_steps=steps,
        classifier_scale=scale,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    return (images * 2 - 1).flatten(1)


def in_class(points: torch.Tensor, k: int = 0) -> float:
    """The fraction of points nearer mu_k than the other mean (class k's half-plane)."""
    return float(((points[:, None] - MEANS) ** 2).sum(-1).argmin(1).eq(k).float().mean())


def test_rho_through_the_denoiser_at_scale_one_samples_toward_the_class():
    """The exact mixture, the exact clean classifier, VP DDIM: eps' = eps - sigma d/dx_t log p(y | x0_hat(x_t)) at s = 1
    moves the samples from the mixture (half in class 0's half-plane) to class 0's component."""
    unguided = mixture_samples(None, 0.0)
    guided_points = mixture_samples(TFG(CleanMixtureClassifier()), 1.0)
    assert abs(in_class(unguided) - 0.5) < 0.05
    assert in_class(guided_points) > 0.97
    distance = lambda points: float((points.mean(0) - MEANS[0]).norm())  # noqa: E731
    assert distance(guided_points) < 0.2 < 0.7 < distance(unguided)
    spread = float((guided_points - MEANS[0]).norm(dim=1).pow(2).mean().sqrt())  # N(mu_0, s^2 I): sqrt(2) s = 0.42
    assert spread < 2 * SPREAD


# -- every preset on every model family ------------------------------------------------------------------------------


class CountingUNet(UNet2DModel):
    """The tiny seeded UNet, counting the samples it denoises and the samples of the backward passes through it."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(**TINY_UNET)
        self.forwards, self.backwards = 0, 0

    def forward(self, sample, timestep, return_dict=True):
        output = super().forward(sample, timestep, return_dict=return_dict)
        self.forwards += sample.shape[0]
        tensor = output.sample if return_dict else output[0]
        if tensor.requires_grad:
            tensor.register_hook(lambda grad: setattr(self, "backwards", self.backwards + grad.shape[0]))
        return output


class CountingClassifier(torch.nn.Module):
    """A seeded linear classifier of 10 classes on (B, C, 16, 16) images, counting images read and backward passes."""

    def __init__(self, channels: int = 1):
        super().__init__()
        torch.manual_seed(1)
        self.linear = torch.nn.Linear(channels * 256, 10)
        self.forwards, self.backwards = 0, 0

    def forward(self, images):
        logits = self.linear(images.flatten(1)) * 3
        self.forwards += images.shape[0]
        if logits.requires_grad:
            logits.register_hook(lambda grad: setattr(self, "backwards", self.backwards + 1))
        return logits


def preset(name: str, classifier, **overrides):
    """Each preset with settings that move the tiny models visibly (LGD smooths with 3 draws)."""
    settings = {
        "TFG": dict(rho=1.0, mu=0.5, sigma=0.1, mc_draws=2, recurrence=2, iterations=2, rho_schedule="increase"),
        "DPS": dict(rho=1.0),
        "LGD": dict(rho=1.0, mc_draws=3),
        "FreeDoM": dict(rho=1.0),
        "MPGD": dict(mu=1.0),
        "UGD": dict(rho=1.0, mu=0.5),
    }[name]
    return globals()[name](classifier, **settings | overrides)


PRESETS = ["TFG", "DPS", "LGD", "FreeDoM", "MPGD", "UGD"]
SAMPLERS = [
    ("DDIMScheduler", {}),
    ("DDPMScheduler", {"prediction_type": "v_prediction"}),
    ("DPMSolverMultistepScheduler", {}),
    ("EulerDiscreteScheduler", {}),
    ("EDMEulerScheduler", {}),
    ("FlowMatchEulerDiscreteScheduler", {}),
]


def run(unet, scheduler, guidance, scale: float, steps: int = 3, seed: int = 0) -> torch.Tensor:
    """The final state of a run of two samples (the sampler's own, unclipped: the random UNet saturates images)."""
    pipeline = quiet(GuidedDiffusionPipeline(unet, scheduler, guidance))
    states = []
    pipeline(
        [1, 4],
        num_inference_steps=steps,
        classifier_scale=scale,
        generator=torch.Generator().manual_seed(seed),
        callback_on_step_end=lambda pipe, index, t, tensors: states.append(tensors["latents"]) or {},
    )
    return states[-1]


def make_sampler(name: str, config: dict):
    if "EDM" in name or "Flow" in name:  # their own sigma tables
        return getattr(diffusers, name)()
    return getattr(diffusers, name).from_config(tiny_scheduler().config, **config)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("sampler, config", SAMPLERS)
def test_every_preset_guides_every_family_reproducibly(name, sampler, config):
    """VP (DDIM, ancestral DDPM on v), a multistep solver (its history put back between repeats), sigma-space Euler, EDM
    and flow: the guided run moves the samples, is finite, and repeats bit for bit under the same seed; s = 0 is the
    unguided run."""
    unet, scheduler = CountingUNet(), make_sampler(sampler, config)
    guidance = preset(name, CountingClassifier())
    unguided = run(unet, scheduler, None, 0.0)
    assert torch.equal(run(unet, scheduler, guidance, 0.0), unguided)
    guided_state = run(unet, scheduler, guidance, 2.0)
    assert torch.isfinite(guided_state).all() and (guided_state - unguided).abs().max() > 1e-3
    assert torch.equal(run(unet, scheduler, guidance, 2.0), guided_state)


def test_heun_takes_the_presets_without_recurrence_and_refuses_recurrence_by_name():
    unet, scheduler = CountingUNet(), diffusers.HeunDiscreteScheduler.from_config(tiny_scheduler().config)
    unguided = run(unet, scheduler, None, 0.0, steps=2)
    assert (run(unet, scheduler, preset("DPS", CountingClassifier()), 2.0, steps=2) - unguided).abs().max() > 1e-3
    with pytest.raises(ValueError, match="`recurrence`=2 repeats one-evaluation steps.*HeunDiscreteScheduler"):
        run(unet, scheduler, preset("FreeDoM", CountingClassifier()), 2.0, steps=2)


def test_a_repeated_multistep_step_starts_from_the_same_history():
    """`repeatable_step` puts DPM-Solver's history and step index back: the step run again on the same output is the
    same step (without it the second run is a second-order step at the next index)."""
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(tiny_scheduler().config)
    scheduler.set_timesteps(4)
    x, output = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    scheduler.step(output, scheduler.timesteps[0], x)  # one step of history
    t = scheduler.timesteps[1]
    with repeatable_step(scheduler):
        first = scheduler.step(output, t, x).prev_sample
    assert torch.equal(scheduler.step(output, t, x).prev_sample, first)


# -- the authors' step (YWolfeee/Training-Free-Guidance, methods/*.py) on the same tensors ---------------------------


def authors_step(name: str, x, t, unet, classifier, targets, abar_t, abar_prev, generator, strength, **settings):
    """One DDIM step (eta = 0) of the authors' `guide_step` for `name`, restated from their code with its variable
    names (`rescale_grad` is the identity on images); `strength` is their `guidance_strength` (TFG's rho), `settings`
    TFG's mu, std, eps_bsz, iter_steps and recur_steps (constant schedules)."""

    def eps_of(z):
        return unet(z, t).sample

    def x0_of(z, eps):
        return (z - (1 - abar_t) ** 0.5 * eps) / abar_t**0.5

    def ddim(z, x0):
        eps = (z - abar_t**0.5 * x0) / (1 - abar_t) ** 0.5
        return abar_prev**0.5 * x0 + (1 - abar_prev) ** 0.5 * eps

    def logp(x0):  # the authors guide every sample to one class
        return classifier(x0).log_softmax(1)[:, int(targets[0])]

    def tilde_logp(x0, mc_eps):
        outs = logp((x0[None] + mc_eps).reshape(-1, *x0.shape[1:]))
        return torch.logsumexp(outs.reshape(mc_eps.shape[0], x0.shape[0]), dim=0) - math.log(mc_eps.shape[0])

    def predict_xt(x_prev):
        alpha = abar_t / abar_prev
        return alpha**0.5 * x_prev + (1 - alpha) ** 0.5 * randn_tensor(x_prev.shape, generator=generator)

    def grad_through(z, function):
        z = z.detach().requires_grad_()
        x0 = x0_of(z, eps_of(z))
        value = function(x0)
        return torch.autograd.grad(value.sum(), z)[0], x0.detach(), value.detach()

    def ascent(x0, function, steps, size):
        for _ in range(steps):
            leaf = x0.detach().requires_grad_()
            x0 = x0 + size * torch.autograd.grad(function(leaf).sum(), leaf)[0]
        return x0

    with torch.enable_grad():
        for _ in range(settings.get("recur_steps", 1)):
            if name == "DPS":
                guidance, x0, value = grad_through(x, logp)
                x_prev = ddim(x, x0) + strength * guidance / value.abs().view(-1, 1, 1, 1)
            elif name == "LGD":
                n = settings["eps_bsz"]
                mc_eps = torch.stack(
                    [randn_tensor(x.shape, generator=generator) * (1 - abar_t) ** 0.5 for _ in range(n)]
                )
                guidance, x0, _ = grad_through(
                    x, lambda x0: torch.logsumexp(logp((x0[None] + mc_eps).flatten(0, 1)).view(n, -1), 0)
                )
                x_prev = ddim(x, x0) + strength * guidance / n
            elif name == "FreeDoM":
                guidance, x0, _ = grad_through(x, logp)
                x_prev = ddim(x, x0) + strength * guidance
            elif name == "MPGD":
                eps = eps_of(x)
                x0 = ascent(x0_of(x, eps), logp, 1, strength)
                x_prev = ddim((1 - abar_t) ** 0.5 * eps + abar_t**0.5 * x0, x0)
            elif name == "UGD":
                eps = eps_of(x)
                x0 = x0_of(x, eps).detach()
                guidance, _, _ = grad_through(x, logp)
                eps_hat = eps - strength * guidance * (1 - abar_t) ** 0.5
                x0_for_gd = ascent(x0, logp, settings["iter_steps"] - 1, strength)
                eps_hat = eps_hat - (abar_t / (1 - abar_t)) ** 0.5 * (x0_for_gd - x0)
                x_prev = ddim(x, x0_of(x, eps_hat))
            else:  # TFG
                std, n = settings["std"], settings["eps_bsz"]
                mc_eps = torch.stack([randn_tensor(x.shape, generator=generator) * std for _ in range(n)])
                delta_t, x0, _ = grad_through(x, lambda x0: tilde_logp(x0, mc_eps))
                new_x0 = ascent(x0, lambda x0: tilde_logp(x0, mc_eps), settings["iter_steps"], settings["mu"])
                alpha_t = abar_t / abar_prev
                x_prev = ddim(x, x0) + strength * delta_t / alpha_t**0.5 + (new_x0 - x0) * abar_prev**0.5
            x = predict_xt(x_prev)
    return x_prev


def ddim_conversion(abar_t: float, abar_prev: float) -> float:
    """k = -c_t sigma_t, c_t = sqrt(1 - abar_prev) - sqrt(abar_prev) sigma_t / alpha_t: the eps shift -s rho sigma_t g
    moves DDIM's x_prev by s rho k g, so a step that adds a g to x_prev is the score shift of s rho = a / k."""
    sigma, alpha = (1 - abar_t) ** 0.5, abar_t**0.5
    return -((1 - abar_prev) ** 0.5 - abar_prev**0.5 * sigma / alpha) * sigma


AUTHORS_CASES = {
    # name: (the project's guidance from a classifier, the authors' strength a, k and alpha_t; the authors' settings)
    "DPS": (lambda c, a, k, r: DPS(c, rho=a / k), {}),
    "LGD": (lambda c, a, k, r: LGD(c, rho=a / (3 * k), mc_draws=3), {"eps_bsz": 3}),
    "FreeDoM": (lambda c, a, k, r: FreeDoM(c, rho=a / k, recurrence=2), {"recur_steps": 2}),
    "MPGD": (lambda c, a, k, r: MPGD(c, mu=a), {}),
    "UGD": (lambda c, a, k, r: UGD(c, rho=a, mu=a, iterations=2, recurrence=2), {"iter_steps": 3, "recur_steps": 2}),
    "TFG": (
        lambda c, a, k, r: TFG(c, rho=a / (k * r**0.5), mu=0.3, sigma=0.2, mc_draws=2, iterations=2),
        {"mu": 0.3, "std": 0.2, "eps_bsz": 2, "iter_steps": 2},
    ),
}


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_takes_the_authors_ddim_step(name):
    """One DDIM step of each preset against the authors' `guide_step` on the same UNet, classifier, state and
    generator: equal once their per-step strengths are written as the score shift's s rho (`ddim_conversion`, and
    LGD's extra 1 / n), with MPGD's and UGD's strengths as they are."""
    unet, classifier = CountingUNet(), CountingClassifier()
    scheduler = DDIMScheduler.from_config(tiny_scheduler().config, clip_sample=False)
    family = ModelFamily(scheduler)
    family.set_timesteps(5)
    index, t = 2, scheduler.timesteps[2]
    abar_t, abar_prev = (float(scheduler.alphas_cumprod[int(step)]) for step in (t, scheduler.timesteps[3]))
    targets = torch.tensor([4, 4])
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    make, settings = AUTHORS_CASES[name]
    strength = 0.4
    expected = authors_step(
        name,
        x,
        t,
        unet,
        classifier,
        targets,
        abar_t,
        abar_prev,
        torch.Generator().manual_seed(5),
        strength,
        **settings,
    )
    guidance = make(classifier, strength, ddim_conversion(abar_t, abar_prev), abar_t / abar_prev)
    pipeline = GuidedDiffusionPipeline(unet, scheduler, guidance)
    generator = torch.Generator().manual_seed(5)
    sampling = SamplingRun(family, targets, targets, 1.0, 0.0, generator, signal_ratios=signal_ratios(family))
    ours = pipeline.denoising_step(sampling, x, index, t)
    unguided = scheduler.step(unet(x, t).sample, t, x).prev_sample
    assert (expected - unguided).abs().max() > 1e-3  # the guidance moved the step
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


# -- calls per sample ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("sampler", ["DDIMScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_counted_calls_are_training_free_cost(name, sampler):
    """The denoiser's and the guide's calls per sample in a run, counted, equal `training_free_cost` (a flow sampler
    does not guide its first, pure-noise step)."""
    unet, classifier = CountingUNet(), CountingClassifier()
    flow = sampler.startswith("Flow")
    guidance = preset(name, classifier)
    run(unet, make_sampler(sampler, {}), guidance, 2.0, steps=4)
    cost = training_free_cost(guidance, 4, guided_steps=3 if flow else 4)
    counted = (unet.forwards / 2, unet.backwards / 2, classifier.forwards / 2, classifier.backwards)
    assert counted == (cost.denoiser_forwards, cost.denoiser_backwards, cost.guide_forwards, cost.guide_backwards)
    assert cost.denoiser_forwards == (1 + 3 * guidance.recurrence if flow else 4 * guidance.recurrence)


# -- inside stock pipelines: the presets whose step is a score shift -------------------------------------------------


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny-sd"))
    write_tiny_text_to_image_pipeline(path)
    return path


@pytest.mark.parametrize("name", ["DPS", "UGD"])
def test_score_shift_presets_in_a_stock_pipeline_are_guided_diffusion_pipeline(name, sd_path):
    """Tiny Stable Diffusion (UNet + VAE, Euler): DPS and UGD without recurrence (its x0_hat ascent is a score shift)
    under `guided` take the project pipeline's steps, the gradient running through the UNet and the VAE decoder."""
    pipe, call = sd_pipeline(sd_path)
    guidance = preset(name, rgb_classifier(), **({"recurrence": 1} if name == "UGD" else {}))
    call = call | {"guidance_scale": 1.0}  # no CFG: the project pipeline differentiates the combined output
    with guided(pipe, guidance, classifier_scale=50.0, targets=[1, 4]):
        stock = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt").images
    ours = quiet(
        GuidedDiffusionPipeline(
            pipe.unet, pipe.scheduler, guidance, vae=pipe.vae, prompt_embeds=call["prompt_embeds"][:1]
        )
    )
    expected = ours(
        [1, 4],
        num_inference_steps=3,
        classifier_scale=50.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    unguided = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert (expected - unguided).abs().max() > 1e-3
    torch.testing.assert_close(stock, expected, rtol=0, atol=1e-4)


def test_lgd_guides_a_flow_transformer_in_sd3s_pipeline_under_cfg_reproducibly():
    """SD3's tiny transformer under CFG: LGD's smoothed gradient through the transformer (conditional half) and the VAE
    moves the samples, repeats under the same `generator`, and s = 0 is the stock pipeline bit for bit."""
    pipe, call = sd3_pipeline()
    guidance = preset("LGD", rgb_classifier())

    def sample(scale: float, seed: int = 7) -> torch.Tensor:
        with guided(pipe, guidance, scale, targets=[1, 4], generator=torch.Generator().manual_seed(seed)):
            return pipe(
                **call, guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="pt"
            ).images

    unguided = pipe(**call, guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(sample(0.0), unguided)
    first = sample(200.0)
    assert torch.isfinite(first).all() and (first - unguided).abs().max() > 1e-3
    assert torch.equal(sample(200.0), first)
    assert not torch.equal(sample(200.0, seed=8), first)  # the draws are the generator's


@pytest.mark.parametrize(
    "name, match",
    [
        ("FreeDoM", r"`recurrence`=2 re-runs each step .* `GuidedDiffusionPipeline`"),
        ("MPGD", r"`x0_update`='keep_noise' with `mu`=1.0 moves the state .* `GuidedDiffusionPipeline`"),
    ],
)
def test_step_changing_presets_are_refused_in_a_stock_pipeline_by_setting(name, match):
    pipe, call = ddim_pipeline()
    with pytest.raises(ValueError, match=match):
        with guided(pipe, preset(name, CountingClassifier()), 1.0, targets=[1, 4]):
            pass
    assert "forward" not in vars(pipe.unet)  # nothing was installed


def test_sd15_config_guides_a_tiny_text_to_image_model_through_its_vae(sd_path, tmp_path, monkeypatch):
    """configs/hub/tfg_sd15.yaml's code path: a cross-attention UNet + VAE under the empty prompt, TFG's classifier on
    the decoded x0_hat, loaded by path, sampled by the sampling job."""
    from tests.conftest import hub_style_classifier
    from tests.test_cli import run as run_job
    from tests.test_cli import sampling_overrides

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    classifier = hub_style_classifier("resnet18", 10, layers=[1, 1, 1, 1], channels=[8, 8, 16, 16], stem_width=8)
    classifier.save_pretrained(str(tmp_path / "classifier"))
    model = {
        "diffusion_model": sd_path,
        "vae": sd_path,
        "num_inference_steps": 2,
        "guidance": {
            "class_path": "plugguide.pipelines.guidance.TFG",
            "init_args": {"classifier": str(tmp_path / "classifier")},
        },
        "evaluator_path": None,
    }
    data = {"num_per_class": 1, "num_classes": 2, "batch_size": 2}
    overrides = sampling_overrides(tmp_path, model, data, precision="32-true")
    run_job("predict", "hub/tfg_sd15.yaml", overrides, tmp_path)
    images = np.load(tmp_path / "out/samples.npz")["images"]
    assert images.shape == (2, 3, 16, 16) and np.isfinite(images).all()


def test_a_particle_sampler_refuses_a_training_free_step_by_name():
    """A particle sampler weighs the one step `propose_step` proposes; a TFG step is several, so it is refused."""
    unet, scheduler = CountingUNet(), DDIMScheduler.from_config(tiny_scheduler().config)
    pipeline = GuidedDiffusionPipeline(unet, scheduler, preset("DPS", CountingClassifier()))
    family = ModelFamily(scheduler)
    family.set_timesteps(2)
    targets = torch.tensor([1, 4])
    sampling = SamplingRun(family, targets, targets, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="DPS takes its own step .* GuidedDiffusionPipeline"):
        pipeline.propose_step(sampling, torch.randn(2, 1, 16, 16), 0, scheduler.timesteps[0])
