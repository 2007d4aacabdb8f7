"""Particle samplers: resampling and weights as the authors' code computes them, TDS's exactness on a Gaussian mixture,
FK steering on every model family, inside stock diffusers pipelines, and in the sampling job."""

from __future__ import annotations

import contextlib

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from torch.distributions import Normal

from plugguide.pipelines import guided
from plugguide.pipelines.guidance import NaiveClassifierGuidance, PredictedCleanImageGuidance
from plugguide.pipelines.guidance.base import Guidance
from plugguide.pipelines.particle_callback import ParticleResampling
from plugguide.pipelines.particle_population import ParticlePopulation, ParticleSettings
from plugguide.pipelines.particle_potentials import FKPotential
from plugguide.pipelines.particle_sampling import ParticleDiffusionPipeline
from plugguide.pipelines.resampling import (
    effective_sample_size,
    group_uniforms,
    inverse_cdf,
    normalized_weights,
    resample_indices,
)
from plugguide.pipelines.twisted_weights import transition_log_ratio, twisted_log_weight
from tests.conftest import learned_variance_model, tiny_scheduler, tiny_unet
from tests.test_guided_stock_pipelines import (  # noqa: F401 (sd_path: a fixture)
    flux_pipeline,
    rgb_classifier,
    sd_path,
    sd_pipeline,
    sdxl_pipeline,
    seeded,
)
from tests.test_model_families import MEANS, MixtureDenoiser, mixture_posterior

# -- the authors' few lines, restated (nothing is imported from their code) ------------------------------------------


def tds_inverse_cdf(su: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`inverse_cdf` of TDS's smc_utils/smc_utils.py (numba removed), as the authors wrote it."""
    j, s, m = 0, weights[0], su.shape[0]
    indices = np.empty(m, dtype=np.int64)
    for n in range(m):
        while su[n] > s:
            if j == m - 1:
                break
            j += 1
            s += weights[j]
        indices[n] = j
    return indices


def tds_ess(log_w: torch.Tensor) -> torch.Tensor:
    """TDS's `compute_ess_from_log_w`: (sum w)^2 / sum w^2 of the normalised weights."""
    log_w = log_w - log_w.max(dim=0, keepdims=True)[0]
    w = torch.exp(log_w - torch.logsumexp(log_w, dim=0, keepdims=True))
    return w.sum(0) ** 2 / (w**2).sum(0)


def fk_weights(kind: str, lmbda: float, rewards: list[torch.Tensor], indices: list[torch.Tensor]) -> list:
    """The weights `FKD.resample` (fkd_class.py) computes at each of `rewards`' steps, the last one final, resampling
    at every step with the given `indices` (theirs come from torch.multinomial); `population_rs` starts at the
    authors' `reward_min_value` 0, except for max, whose floor here is -inf (see particle_potentials.py)."""
    population_rs = torch.full_like(rewards[0], -torch.inf if kind == "max" else 0.0)
    product = torch.ones_like(rewards[0])
    out = []
    for step, (rs, idx) in enumerate(zip(rewards, indices)):
        if kind == "max":
            rs = torch.max(rs, population_rs)
            w = torch.exp(lmbda * rs)
        elif kind == "add":
            rs = rs + population_rs
            w = torch.exp(lmbda * rs)
        elif kind == "diff":
            w = torch.exp(lmbda * (rs - population_rs))
        else:
            w = torch.exp(lmbda * rs)
        if step == len(rewards) - 1 and kind != "diff":
            w = torch.exp(lmbda * rs) / product
        out.append(w)
        population_rs = rs[idx]
        product = product[idx] * w[idx]
    return out


# -- resampling -----------------------------------------------------------------------------------------------------


def test_inverse_cdf_ess_and_systematic_points_are_the_authors():
    torch.manual_seed(0)
    log_w = torch.randn(3, 7) * 2
    weights = normalized_weights(log_w)
    uniforms = torch.rand(3, 7).sort(-1).values
    for b in range(3):
        expected = tds_inverse_cdf(uniforms[b].double().numpy(), weights[b].double().numpy())
        assert inverse_cdf(weights[b : b + 1], uniforms[b : b + 1])[0].tolist() == expected.tolist()
    torch.testing.assert_close(effective_sample_size(log_w), tds_ess(log_w.T))
    # FK steering's ESS: 1 / sum of the squared normalised weights
    torch.testing.assert_close(effective_sample_size(log_w), 1 / (weights**2).sum(-1))
    assert effective_sample_size(torch.zeros(1, 5)).item() == pytest.approx(5)
    # systematic: one uniform per group, then K evenly spaced points (TDS's `systematic`)
    points = group_uniforms("systematic", 2, 4, torch.Generator().manual_seed(1))
    first = torch.rand(2, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(points, (first + torch.arange(4)) / 4)


@pytest.mark.parametrize("method", ["multinomial", "systematic"])
def test_resampling_draws_each_particle_in_proportion_to_its_weight(method):
    weights = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    draws = 4000
    for _ in range(draws):
        counts += torch.bincount(resample_indices(weights.log(), method, generator)[0], minlength=4)
    frequency = counts / (4 * draws)
    # 16,000 draws: a frequency's standard error is at most 0.004; systematic's is smaller still
    torch.testing.assert_close(frequency, weights[0], atol=0.015, rtol=0)
    if method == "systematic":  # every particle with K W >= 1 is kept at least floor(K W) times
        for _ in range(50):
            kept = torch.bincount(resample_indices(weights.log(), method, generator)[0], minlength=4)
            assert kept[0] >= 2 and kept[1] >= 1


def test_each_group_resamples_from_its_own_generator_only():
    log_w = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    alone = resample_indices(log_w[1:2], "multinomial", [torch.Generator().manual_seed(7)])
    together = resample_indices(log_w, "multinomial", [torch.Generator().manual_seed(s) for s in (3, 7, 9)])
    assert together[1].tolist() == alone[0].tolist()


# -- potentials and weights -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["max", "add", "diff", "rt"])
def test_fk_potentials_are_the_authors_on_the_same_rewards(kind):
    generator = torch.Generator().manual_seed(0)
    rewards = [-torch.rand(6, generator=generator) * 3 for _ in range(4)]
    indices = [torch.randint(0, 6, (6,), generator=generator) for _ in range(4)]
    expected = fk_weights(kind, 2.0, rewards, indices)
    potential = FKPotential(kind, 2.0)
    history, log_product = None, torch.zeros(6)
    for step, (reward, idx) in enumerate(zip(rewards, indices)):
        if step < len(rewards) - 1:
            log_g, history = potential.log_potential(reward, history)
            log_product = log_product + log_g
        else:  # the authors' final potential of max and add reads the running max / sum, not the final reward
            final_rs = {"max": torch.maximum(reward, history), "add": reward + history}.get(kind, reward)
            log_g = potential.final_log_potential(final_rs, history, log_product)
        torch.testing.assert_close(log_g.exp(), expected[step], rtol=1e-5, atol=0)
        history, log_product = history[idx], log_product[idx]


def test_twisted_weights_are_tds_on_the_same_tensors():
    """TDS's G: log p(x_t | x_t+1) + log twist(x_t) - log twist(x_t+1) - log q(x_t | x_t+1), with their
    `log_normal_density` (a Normal's log_prob per pixel, summed)."""
    generator = torch.Generator().manual_seed(0)
    x, mean, shift = (torch.randn(5, 2, 3, 3, generator=generator) for _ in range(3))
    variance = torch.rand(5, 2, 3, 3, generator=generator) + 0.1
    twist, previous = torch.randn(5, generator=generator), torch.randn(5, generator=generator)
    log_p = Normal(mean, variance.sqrt()).log_prob(x).sum((1, 2, 3))
    log_q = Normal(mean + shift, variance.sqrt()).log_prob(x).sum((1, 2, 3))
    transition = transition_log_ratio(x, mean, shift, variance)
    torch.testing.assert_close(twisted_log_weight(twist, previous, transition), log_p + twist - previous - log_q)


def test_population_carries_weights_until_it_resamples_and_picks_by_them():
    settings = ParticleSettings(potential="rt", ess_threshold=0.5)
    population = ParticlePopulation(settings, 2, 4, torch.Generator().manual_seed(0), "cpu")
    # group 0 nearly even (ESS ~ 4: carries its weights), group 1 one dominant particle (ESS ~ 1: resamples)
    population.reweigh(torch.tensor([0.0, 0.01, 0.0, 0.02, -50.0, 0.0, -50.0, -50.0]))
    indices = population.resample()
    assert population.trace.resampled[-1].tolist() == [False, True]
    assert indices[:4].tolist() == [0, 1, 2, 3] and indices[4:].tolist() == [5, 5, 5, 5]
    torch.testing.assert_close(population.log_weights[0], torch.tensor([0.0, 0.01, 0.0, 0.02]))
    assert population.log_weights[1].abs().max() == 0
    picked = population.finish(torch.tensor([0.0, 0.0, 0.0, -30.0, 0.0, 0.0, 0.0, 0.0]))
    assert 0 <= int(picked[0]) < 3 and 4 <= int(picked[1]) < 8


# -- TDS on the Gaussian mixture ------------------------------------------------------------------------------------


class TimedMixtureDenoiser(MixtureDenoiser):
    """The exact eps of the mixture at the noise level of the train timestep it is called with (DDPM's own)."""

    def __init__(self, scheduler: DDPMScheduler):
        super().__init__()
        self.alphas_cumprod = scheduler.alphas_cumprod
        self.output = lambda x0, eps, alpha, sigma: eps

    def forward(self, model_input, timestep, return_dict=True):
        abar = float(self.alphas_cumprod[int(torch.as_tensor(timestep).flatten()[0])])
        self.level = dict(alpha=abar**0.5, sigma=(1 - abar) ** 0.5, input_scale=1.0)
        return super().forward(model_input, timestep, return_dict)


class TimedMixtureClassifier(Guidance):
    """The exact log p(y | x_t) of the mixture at the train timestep it is called with (t = 0: the clean sample)."""

    def __init__(self, scheduler: DDPMScheduler):
        super().__init__(input="x_t")
        self.alphas_cumprod = scheduler.alphas_cumprod

    def log_likelihood(self, inputs, timesteps, targets):
        t = int(timesteps[0])
        abar = float(self.alphas_cumprod[t]) if t > 0 else 1.0
        return mixture_posterior(inputs, abar**0.5, (1 - abar) ** 0.5)[0].gather(1, targets[:, None])[:, 0]


def mixture_pipeline() -> ParticleDiffusionPipeline:
    scheduler = DDPMScheduler(clip_sample=False)
    pipeline = ParticleDiffusionPipeline(TimedMixtureDenoiser(scheduler), scheduler, TimedMixtureClassifier(scheduler))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def final_states(pipeline, labels, **kwargs) -> torch.Tensor:
    """The samples as the sampler leaves them (the images are clamped to [0, 1]; the mixture reaches past it)."""
    final = []

    def keep(pipe, index, timestep, tensors):
        final[:] = [tensors["latents"]]
        return tensors

    pipeline(labels, callback_on_step_end=keep, output_type="pt", **kwargs)
    return final[0].flatten(1)


def test_twisted_smc_at_scale_1_samples_the_class_conditional_model_where_guidance_does_not():
    """With the exact classifier as twist, TDS targets p(x_0) p(y | x_0) of the sampler's own model (the 5-step DDPM
    chain of the exact denoiser): its samples must match that model's class-conditional distribution, estimated by
    weighing 40,000 unguided samples by p(y | x_0). Gradient guidance at s = 1 on the same chain does not: its coarse
    steps leave many samples in the other class. The twist's ratio alone, without the proposal's correction, leans
    toward the guided proposal (measured: 0.033 off on the first coordinate's mean, against 0.004 with it)."""
    pipeline, steps, samples = mixture_pipeline(), 5, 4000
    labels = torch.zeros(samples, dtype=torch.long)
    common = dict(num_inference_steps=steps, classifier_scale=1.0)
    twisted = final_states(
        pipeline,
        labels,
        num_particles=16,
        particle_settings=ParticleSettings(potential="twisted"),
        generator=torch.Generator().manual_seed(0),
        **common,
    )
    guided = final_states(
        pipeline,
        labels,
        num_particles=1,
        particle_settings=ParticleSettings(resample_interval=None),
        generator=torch.Generator().manual_seed(0),
        **common,
    )
    unguided = final_states(
        pipeline,
        torch.zeros(40000, dtype=torch.long),
        num_particles=1,
        particle_settings=ParticleSettings(resample_interval=None),
        generator=torch.Generator().manual_seed(1),
        num_inference_steps=steps,
    )
    weights = mixture_posterior(unguided.view(-1, 2, 1, 1), 1.0, 0.0)[0][:, 0].exp()
    weights = weights / weights.sum()
    mean = (weights[:, None] * unguided).sum(0)
    std = (weights[:, None] * (unguided - mean) ** 2).sum(0).sqrt()
    in_class = (weights * ((unguided[:, None] - MEANS).norm(dim=-1).argmin(1) == 0)).sum()

    def statistics(x):
        return x.mean(0), x.std(0), ((x[:, None] - MEANS).norm(dim=-1).argmin(1) == 0).float().mean()

    # 4000 independent picks, coordinate std <= 0.27: the mean's standard error is 0.0042, the reference's (effective
    # sample size ~20,000) 0.0019, together 0.0046; the std's 0.003; the class fraction's (p ~ 0.97) 0.0025. The
    # tolerances are ~3.3 standard errors (the bias of 16 particles, measured 0.004, is inside them).
    twisted_mean, twisted_std, twisted_in_class = statistics(twisted)
    torch.testing.assert_close(twisted_mean, mean, atol=0.015, rtol=0)
    torch.testing.assert_close(twisted_std, std, atol=0.012, rtol=0)
    assert abs(twisted_in_class - in_class) < 0.01
    guided_mean, _, guided_in_class = statistics(guided)
    assert in_class - guided_in_class > 0.15
    assert (guided_mean - mean).abs().max() > 0.15


# -- every model family, and what resampling means on each -----------------------------------------------------------

STOCHASTIC = ("DDPMScheduler", "EulerAncestralDiscreteScheduler")
FAMILY_SAMPLERS = [
    "DDPMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "HeunDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
]


def tiny_particle_pipeline(name: str, classifier, guidance: str = "x0_hat") -> ParticleDiffusionPipeline:
    scheduler = (
        diffusers.FlowMatchEulerDiscreteScheduler()
        if name == "FlowMatchEulerDiscreteScheduler"
        else getattr(diffusers, name).from_config(tiny_scheduler().config)
    )
    guide = PredictedCleanImageGuidance(classifier) if guidance == "x0_hat" else NaiveClassifierGuidance(classifier)
    pipeline = ParticleDiffusionPipeline(tiny_unet(), scheduler, guide)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def states_after_each_step(pipeline, **kwargs) -> list[torch.Tensor]:
    states = []

    def keep(pipe, index, timestep, tensors):
        states.append(tensors["latents"].clone())
        return tensors

    output = pipeline(callback_on_step_end=keep, output_type="pt", **kwargs)
    return states, output


@pytest.mark.parametrize("name", FAMILY_SAMPLERS)
@pytest.mark.parametrize("potential", ["max", "diff"])
def test_fk_steering_runs_on_every_family_and_a_copy_goes_on_as_its_ancestor(name, potential, tiny_classifier):
    """FK potentials on each sampler. A population made of copies of one particle at step 2 (lambda so large that one
    particle holds all the weight) goes on, on a deterministic sampler, exactly as that particle did in the run that did
    not resample: the copies carry its state and its multistep history (DPM-Solver's model outputs, Heun's predictor).
    On a stochastic sampler the copies draw their own noise and part."""
    pipeline = tiny_particle_pipeline(name, tiny_classifier, guidance="x_t" if potential == "max" else "x0_hat")

    def run(settings):
        return states_after_each_step(
            pipeline,
            class_labels=[3, 5],
            num_particles=4,
            num_inference_steps=5,
            generator=[seeded(0), seeded(1)],
            particle_settings=settings,
        )

    free, _ = run(ParticleSettings(potential=potential, resample_interval=None))
    steered, output = run(ParticleSettings(potential=potential, lmbda=1e6, resample_start=2, resample_end=2))
    assert output.images.shape == (2, 1, 16, 16) and output.ess.shape == (1, 2) and output.resampled.all()
    evaluations = len(pipeline.scheduler.timesteps)  # Heun: two per step but the last
    assert output.costs == {"denoiser": 4 * evaluations, "guidance_gradient": 0, "guidance_forward": 8}
    resampled = 2 * pipeline.scheduler.order  # the evaluation that resampled (Heun: two per step)
    for index in range(resampled):  # before the resampling: the same run
        torch.testing.assert_close(steered[index], free[index])
    for group in range(2):
        rows = slice(4 * group, 4 * group + 4)
        copies = steered[resampled][rows]
        if name in STOCHASTIC:  # the copies took the step with their own noise
            assert not torch.allclose(copies[0], copies[1])
            continue
        # each copy's ancestor: the particle of the free run it continues (ties of the top weight split the copies)
        ancestors = (free[resampled][rows][None] - copies[:, None]).flatten(2).norm(dim=2).argmin(1)
        assert len(set(ancestors.tolist())) <= 2 and (ancestors != torch.arange(4)).any()
        for index in range(resampled, resampled + 2):
            torch.testing.assert_close(steered[index][rows], free[index][rows][ancestors], rtol=1e-5, atol=1e-5)


def test_twisted_weights_are_refused_on_a_deterministic_sampler_and_without_a_scale(tiny_classifier):
    pipeline = tiny_particle_pipeline("DDIMScheduler", tiny_classifier)
    twisted = ParticleSettings(potential="twisted")
    with pytest.raises(ValueError, match="DDIMScheduler has none"):
        pipeline([3], particle_settings=twisted, classifier_scale=1.0, num_inference_steps=2)
    pipeline = tiny_particle_pipeline("DDPMScheduler", tiny_classifier)
    with pytest.raises(ValueError, match="`classifier_scale`, which must be > 0"):
        pipeline([3], particle_settings=twisted, num_inference_steps=2)
    with pytest.raises(ValueError, match="`potential` to be one of"):
        ParticleSettings(potential="best")
    with pytest.raises(ValueError, match="`num_particles` to be an integer >= 1"):
        pipeline([3], num_particles=0)


def test_a_samples_particles_follow_from_its_own_seed_whatever_the_batch(tiny_classifier):
    """Per-sample generators: each sample's K particles draw their noise from generators seeded from its own, and
    its resampling from it, so a sample is the same alone and in a batch, and a rerun is the same run."""
    pipeline = tiny_particle_pipeline("DDPMScheduler", tiny_classifier)
    settings = ParticleSettings(potential="rt", resampling="multinomial", lmbda=5.0)
    common = dict(num_particles=3, num_inference_steps=4, particle_settings=settings, output_type="pt")
    batch = pipeline([3, 5], generator=[seeded(0), seeded(1)], **common)
    alone = pipeline([5], generator=[seeded(1)], **common)
    again = pipeline([3, 5], generator=[seeded(0), seeded(1)], **common)
    torch.testing.assert_close(batch.images[1:], alone.images)
    torch.testing.assert_close(batch.log_weights[1:], alone.log_weights)
    torch.testing.assert_close(batch.images, again.images, rtol=0, atol=0)
    assert batch.ess.shape == (4, 2) and batch.resampled.all()


def test_best_of_n_keeps_the_highest_reward_and_its_initial_noise(tiny_classifier):
    """Best-of-N / random search: no resampling, the particle whose final sample the guide scores highest, and the
    initial noise it came from, which sampled again alone gives the same sample (DDIM is deterministic)."""
    pipeline = tiny_particle_pipeline("DDIMScheduler", tiny_classifier)
    guide = pipeline.guidance
    common = dict(num_inference_steps=3, output_type="pt")
    noise = torch.randn(6, 1, 16, 16, generator=seeded(0))
    best = pipeline([3], num_particles=6, particle_settings=ParticleSettings.random_search(), latents=noise, **common)
    everyone = pipeline(
        [3] * 6, num_particles=1, particle_settings=ParticleSettings.best_of_n(), latents=noise, **common
    )
    timesteps = torch.zeros(6, dtype=torch.long)
    scores = guide.log_likelihood(everyone.images * 2 - 1, timesteps, torch.full((6,), 3))
    torch.testing.assert_close(best.images[0], everyone.images[int(scores.argmax())])
    torch.testing.assert_close(best.initial_noise[0], noise[int(scores.argmax())])
    assert best.ess.shape == (0, 1) and best.costs == {"denoiser": 18, "guidance_gradient": 0, "guidance_forward": 6}


# -- inside stock diffusers pipelines -------------------------------------------------------------------------------


def stock_pipeline(name: str, path: str):
    builders = {"sd": lambda: sd_pipeline(path), "sdxl": sdxl_pipeline, "flux": flux_pipeline}
    pipe, call = builders[name]()
    call = {key: value[:1] if key.endswith("embeds") else value for key, value in call.items()}
    return pipe, call


def resampled_run(pipe, call, settings, num_particles=4, guide=None, seed=0, gradient_scale=0.0):
    """(the pipeline's images, the latents after each step's callback, the callback) of one run of K particles, the
    pipeline guided by the same guide at `gradient_scale` > 0."""
    guide = guide or PredictedCleanImageGuidance(rgb_classifier())
    states = []
    resampling = ParticleResampling(pipe, guide, [3], num_particles, settings, generator=seeded(1))
    gradient = guided(pipe, guide, gradient_scale, [3] * num_particles) if gradient_scale else contextlib.nullcontext()
    with gradient, resampling:

        def record(pipeline, index, timestep, tensors):
            tensors = resampling(pipeline, index, timestep, tensors)
            states.append(tensors["latents"].clone())
            return tensors

        images = pipe(
            num_images_per_prompt=num_particles,
            generator=seeded(seed),
            output_type="pt",
            callback_on_step_end=record,
            **call,
        ).images
    return images, states, resampling


@pytest.mark.parametrize("name", ["sd", "sdxl", "flux"])
def test_stock_pipeline_callback_resamples_the_latents_by_the_guides_potential(
    name,
    sd_path,  # noqa: F811 (the fixture imported above)
):
    """Tiny SD and SDXL (UNet + VAE) and Flux (a transformer on packed latents): lambda = 0 gives even weights, whose systematic resampling keeps
    every particle, so the run is the stock pipeline's; a huge lambda makes the population copies of its best
    particle at the step it resamples; the pick keeps one image."""
    pipe, call = stock_pipeline(name, sd_path)
    stock = pipe(num_images_per_prompt=4, generator=seeded(0), output_type="pt", **call).images
    even, _, _ = resampled_run(pipe, call, ParticleSettings(potential="rt", lmbda=0.0))
    torch.testing.assert_close(even, stock)
    settings = ParticleSettings(potential="diff", lmbda=1e6, resample_start=1, resample_end=1)
    images, states, resampling = resampled_run(pipe, call, settings)
    assert len(set(map(tuple, states[1].flatten(1).tolist()))) <= 2  # all copies of the top one or two
    assert resampling.population.trace.resampled[-1].all()
    assert resampling.pick(images).shape == (1, *images.shape[1:])
    assert len(resampling.pick(list(images))) == 1


def test_stock_callback_runs_inside_guided_and_refuses_twisted_weights(
    sd_path,  # noqa: F811 (the fixture imported above)
):
    pipe, call = stock_pipeline("sd", sd_path)
    guide = PredictedCleanImageGuidance(rgb_classifier())
    settings = ParticleSettings(potential="rt", lmbda=1e6, resample_start=1, resample_end=1)
    images, states, resampling = resampled_run(pipe, call, settings, guide=guide, gradient_scale=2.0)
    assert len(set(map(tuple, states[1].flatten(1).tolist()))) <= 2 and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="does not expose"):
        ParticleResampling(pipe, guide, [3], 4, ParticleSettings(potential="twisted"))
    with guided(pipe, guide, 1.0, [3] * 4), pytest.raises(ValueError, match="before entering `guided`"):
        ParticleResampling(pipe, guide, [3], 4)


# -- the sampling job -----------------------------------------------------------------------------------------------


def test_sampling_job_samples_with_particles_and_logs_their_ess(tiny_assets, tmp_path, monkeypatch):
    """`lightning predict -c configs/sample.yaml --model.particles 3 --model.potential twisted ...`: one image per
    requested sample, the ESS and weights in TensorBoard; the job's step gives the same samples from the same seeds."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from plugguide.modules import GuidedSampling
    from plugguide.pipelines.guidance import NaiveClassifierGuidance
    from tests.test_cli import run, sampling_overrides

    monkeypatch.chdir(tmp_path)
    job = {
        "diffusion_model": tiny_assets["ddpm-uncond"],
        "scheduler": "DDPMScheduler",
        "num_inference_steps": 3,
        "evaluator_path": None,
        "classifier_scale": 1.0,
        "particles": 3,
        "potential": "twisted",
        "ess_threshold": 0.5,
    }
    guidance = {
        "class_path": "plugguide.pipelines.guidance.NaiveClassifierGuidance",
        "init_args": {"classifier": tiny_assets["classifier-resnet"]},
    }
    data = {"num_per_class": 1, "num_classes": 4, "batch_size": 4}
    overrides = sampling_overrides(tmp_path, job | {"guidance": guidance}, data)
    run("predict", "sample.yaml", overrides, tmp_path)
    assert np.load(tmp_path / "out" / "samples.npz")["images"].shape == (4, 1, 16, 16)
    events = EventAccumulator(str(next((tmp_path / "runs/sample").rglob("events.out.tfevents*")))).Reload()
    assert len(events.Scalars("particles/ess")) == 3 and "particles/log_weights" in events.Tags()["histograms"]
    assert all(1 <= event.value <= 3 for event in events.Scalars("particles/ess"))
    module = GuidedSampling(**job, guidance=NaiveClassifierGuidance(tiny_assets["classifier-resnet"]))
    batch = {"label": torch.tensor([3, 8]), "seed": torch.tensor([0, 1]), "index": torch.tensor([0, 1])}
    first, second = (module.predict_step(batch, 0)["images"] for _ in range(2))
    assert first.shape == (2, 1, 16, 16)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_sampling_job_refuses_particles_without_a_guide(tiny_assets):
    from plugguide.modules import GuidedSampling

    with pytest.raises(ValueError, match="`model.particles`=4 weighs particles by `model.guidance`"):
        GuidedSampling(tiny_assets["ddpm-uncond"], particles=4, evaluator_path=None)
    with pytest.raises(ValueError, match="`potential` to be one of"):
        GuidedSampling(tiny_assets["ddpm-uncond"], potential="best", evaluator_path=None)


@pytest.mark.parametrize("learned", [False, True])
def test_twisted_transition_ratio_reads_the_schedulers_own_step(learned, tiny_classifier):
    """The two Gaussians of TDS's correction are diffusers' own DDPM step, unguided and guided: their means are the
    step's output less its noise (replayed from the same seed), with x0_hat clipped as `clip_sample` does, and the
    variance is the step's (a learned-range UNet's per-pixel one)."""
    from diffusers.utils.torch_utils import randn_tensor

    from plugguide.pipelines.guided_diffusion import SamplingRun
    from plugguide.pipelines.model_family import ModelFamily

    unet, scheduler = learned_variance_model() if learned else (tiny_unet(), tiny_scheduler())
    pipeline = ParticleDiffusionPipeline(unet, scheduler, NaiveClassifierGuidance(tiny_classifier))
    family = ModelFamily(scheduler)
    family.set_timesteps(5)
    index, t = 2, scheduler.timesteps[2]
    labels = torch.tensor([3, 5, 7, 1])
    x = torch.randn(4, 1, 16, 16, generator=seeded(3))
    run = SamplingRun(family, labels, labels, 3.0, 0.0, seeded(4))
    step = pipeline.propose_step(run, x, index, t)
    x_next = pipeline.take_step(run, step, t)
    noise = randn_tensor(x.shape, generator=seeded(4))
    variance = scheduler._get_variance(int(t), step.predicted_variance)
    std = (0.5 * variance).exp() if learned else variance.sqrt()
    unguided_output = (
        step.denoiser_output if not learned else torch.cat([step.denoiser_output, step.predicted_variance], 1)
    )
    unguided = scheduler.step(unguided_output, t, x, generator=seeded(4)).prev_sample - std * noise
    proposal = x_next - std * noise
    expected = (Normal(unguided, std).log_prob(x_next) - Normal(proposal, std).log_prob(x_next)).sum((1, 2, 3))
    level = family.noise_level(index, t)
    torch.testing.assert_close(pipeline.transition_ratio(run, step, x_next, level, t), expected, rtol=1e-3, atol=1e-3)
    assert step.mean_shift is not None and expected.abs().max() > 0.01
