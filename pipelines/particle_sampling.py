"""Particle samplers on `GuidedDiffusionPipeline`: twisted SMC, Feynman-Kac steering, best-of-N, random search."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from plugguide.pipelines.guided_diffusion import (
    GuidedDiffusionPipeline,
    GuidedSamplesOutput,
    SamplingRun,
    step_mean,
    step_variance,
)
from plugguide.pipelines.model_family import ModelFamily, NoiseLevel
from plugguide.pipelines.particle_population import (
    ParticlePopulation,
    ParticleSettings,
    reorder_sampler_state,
)
from plugguide.pipelines.particle_potentials import check_potential_guidance, guidance_log_likelihood
from plugguide.pipelines.score_shift import clean_estimate
from plugguide.pipelines.twisted_weights import check_twisted_sampler, transition_log_ratio


@dataclass
class ParticleSamplesOutput(GuidedSamplesOutput):
    """Samples of a particle run, one per requested sample, and how the population went.

    Args:
        images: as `GuidedSamplesOutput`, one per requested sample (the picked particle).
        class_labels (`torch.Tensor`): the target class of each sample, -1 where none.
        log_weights (`torch.Tensor`): (B, K) the normalised final log-weights of each sample's particles.
        ess (`torch.Tensor`): (S, B) the effective sample size of each group at each of the S steps that weighed.
        resampled (`torch.Tensor`): (S, B) whether the group resampled there.
        initial_noise (`torch.Tensor`): (B, C, H, W) the initial noise the picked particle descends from (random
            search's answer: the noise to sample again).
        costs (`dict[str, int]`): network passes per requested sample: `denoiser` (CFG's two branches count two),
            `guidance_gradient` (a guide's forward and backward pass) and `guidance_forward` (a potential's read).
    """

    log_weights: torch.Tensor | None = None
    ess: torch.Tensor | None = None
    resampled: torch.Tensor | None = None
    initial_noise: torch.Tensor | None = None
    costs: dict | None = None


@dataclass
class ParticleRun:
    """What one particle run carries between its steps (the pipeline holds it for the length of a call)."""

    population: ParticlePopulation
    settings: ParticleSettings
    num_particles: int
    on_step: Callable[[dict], None] | None
    costs: dict


class ParticleDiffusionPipeline(GuidedDiffusionPipeline):
    """Samples K particles per requested sample with `GuidedDiffusionPipeline`'s step, weighs them by a potential read
    off the pipeline's `guidance`, resamples between steps, and returns one per sample.

    Each step is the pipeline's own (`propose_step`, then `take_step`), on B * K particles: between the two, the
    population reads its potential at the evaluation, the guide's log p(y | .) on x_t or x0_hat
    (`particle_potentials.guidance_log_likelihood`), and may resample; the evaluation's outputs, the scheduler's
    multistep history and the records of the population are then taken at the resampled indices, so a copy goes on
    from its ancestor's state with its own noise. Resampling before the step (as TDS does), not after it (as FK's
    pipeline does), lets copies of one particle take different steps at once on a stochastic sampler.

    - FK steering (Singhal et al., 2025): `potential` "max", "add", "diff" or "rt" with lambda, on any sampler; the
      gradient guidance (`classifier_scale` > 0) may propose as well, uncorrected.
    - Twisted SMC (Wu et al., 2023): `potential`="twisted" on `DDPMScheduler` with `classifier_scale` s > 0; the guided
      step proposes and the weight corrects for it (pipelines/twisted_weights.py), so at s = 1 the target is
      p(x) p(y | x). Deterministic samplers are refused for it: their step has no density.
    - Best-of-N and random search over the initial noise (Ma et al., 2025): `ParticleSettings.best_of_n()`.

    Heun's corrector evaluations never resample (the predictor's state is carried inside the scheduler). The final
    state is read as the clean sample (its reward at the train timestep 0). Images are decoded for the picked
    particles only; a `callback_on_step_end` sees all B * K states after each step but the last, and the B picked
    ones after it.
    """

    def progress_bar(self, iterable=None, total=None):
        """diffusers' bar, kept for the particle run to show its effective sample size on."""
        self._particle_bar = super().progress_bar(iterable=iterable, total=total)
        return self._particle_bar

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | torch.Tensor | None = None,
        *,
        num_particles: int = 4,
        particle_settings: ParticleSettings | None = None,
        particle_callback: Callable[[dict], None] | None = None,
        targets: torch.Tensor | None = None,
        batch_size: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        **kwargs,
    ) -> ParticleSamplesOutput | tuple:
        """Generates one image per entry of `class_labels` (or `batch_size` unlabelled ones) from K particles each.

        Args:
            class_labels, targets, batch_size, output_type, return_dict: as `GuidedDiffusionPipeline.__call__`, one
                per requested sample.
            num_particles (`int`, defaults to 4): K particles per sample.
            particle_settings (`ParticleSettings`, *optional*): potential, resampling and pick; None: FK's "diff".
            particle_callback (`Callable[[dict], None]`, *optional*): called after each step that weighed with
                `{"step", "ess" (B,), "log_weights" (B, K), "resampled" (B,)}`, for a logger.
            generator (`torch.Generator | list[torch.Generator]`, *optional*): one generator, or one per requested
                sample: each sample's K particles then draw their noise from K generators seeded from its own, and
                its resampling from it, so a sample's particles do not depend on the rest of the batch.
            latents (`Tensor`, *optional*): the B * K initial noises, group by group; drawn when None.
            prompt_embeds, negative_prompt_embeds (`Tensor`, *optional*): one (1, L, D) or one per sample (B, L, D).
            **kwargs: passed to `GuidedDiffusionPipeline.__call__` (`num_inference_steps`, `classifier_scale`,
                `guidance_scale`, `prompt`, `callback_on_step_end`, ...).
        """
        settings = ParticleSettings() if particle_settings is None else particle_settings
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"Expected `num_particles` to be an integer >= 1, but got {num_particles}.")
        guidance = check_potential_guidance(self.guidance)
        classifier_scale = kwargs.get("classifier_scale", 0.0)
        if settings.potential == "twisted":
            check_twisted_sampler(ModelFamily(self.scheduler))
            if not classifier_scale > 0:
                raise ValueError(
                    "`potential`='twisted' weighs by the twist p(y | x)^s with s the run's `classifier_scale`, which "
                    f"must be > 0 (s = 1: the target p(x) p(y | x)); got {classifier_scale}."
                )
        device, k = self.unet.device, num_particles
        if isinstance(kwargs.get("prompt"), (list, tuple)):  # one prompt per sample: each for its K particles
            kwargs["prompt"] = [prompt for prompt in kwargs["prompt"] for _ in range(k)]
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).flatten()
            groups = len(labels)
        else:
            groups = len(targets) if batch_size is None and targets is not None else batch_size
            if groups is None:
                raise ValueError("Give `class_labels`, `targets` or `batch_size`.")
            labels = torch.full((groups,), -1, dtype=torch.long, device=device)
        guidance_targets = labels if targets is None else torch.as_tensor(targets, device=device)
        if len(guidance_targets) != groups:
            raise ValueError(
                f"Expected one target per sample, but got {len(guidance_targets)} `targets` for {groups} samples."
            )
        guidance.check_targets(guidance_targets)
        guidance.to(device)
        particle_generator, group_generator = particle_generators(generator, k, device)
        shape = self.noise_shape(groups * k)
        if latents is None:
            latents = randn_tensor(shape, generator=particle_generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(
                f"Expected `latents` of shape {shape} ({k} particles for each of {groups} samples), but got "
                f"{tuple(latents.shape)}."
            )
        population = ParticlePopulation(settings, groups, k, group_generator, device, float(classifier_scale))
        costs = {"denoiser": 0, "guidance_gradient": 0, "guidance_forward": 0}
        self._particle_run = ParticleRun(population, settings, k, particle_callback, costs)
        try:
            output = super().__call__(
                labels.repeat_interleave(k),
                targets=None if targets is None else guidance_targets.repeat_interleave(k, dim=0),
                generator=particle_generator,
                latents=latents,
                prompt_embeds=per_particle(prompt_embeds, k),
                negative_prompt_embeds=per_particle(negative_prompt_embeds, k),
                output_type=output_type,
                return_dict=True,
                **kwargs,
            )
        finally:
            self._particle_run = None
        trace = population.trace
        log_weights = population.log_weights - population.log_weights.logsumexp(-1, keepdim=True)
        result = ParticleSamplesOutput(
            images=output.images,
            class_labels=labels,
            log_weights=log_weights.cpu(),
            ess=torch.stack(trace.ess) if trace.ess else torch.zeros(0, groups),
            resampled=torch.stack(trace.resampled) if trace.resampled else torch.zeros(0, groups, dtype=torch.bool),
            initial_noise=latents[population.picked_ancestors].cpu(),
            costs={name: count // groups for name, count in costs.items()},
        )
        return result if return_dict else (result.images, result.class_labels)

    def denoising_step(self, run: SamplingRun, x: torch.Tensor, index: int, t: torch.Tensor) -> torch.Tensor:
        """The pipeline's step on all particles, weighed and resampled between the evaluation and the step; the last
        evaluation returns the picked particle of each group."""
        particles = getattr(self, "_particle_run", None)
        if particles is None:
            return super().denoising_step(run, x, index, t)
        population, settings, family = particles.population, particles.settings, run.family
        level = family.noise_level(index, t)
        step = self.propose_step(run, x, index, t)
        self.count_evaluation(particles, run, level)
        if level.first_evaluation and level.alpha > 0 and settings.weighs_at(level.index, level.num_steps):
            x0_hat = clean_estimate(family, step.denoiser_output, step.x, level, run.clip_first)[0]
            population.reweigh(self.particle_log_likelihood(particles, step.x, level, x0_hat, run.targets))
            indices = population.resample()
            if indices is not None:
                step = take_particles(step, indices)
                reorder_sampler_state(family.scheduler, indices, x)
            self.report(particles, level.index)
        x_next = self.take_step(run, step, t)
        if settings.potential == "twisted":
            population.set_transition(self.transition_ratio(run, step, x_next, level, t))
        if index < len(family.scheduler.timesteps) - 1:
            return x_next
        final_level = NoiseLevel(0, level.num_steps, level.num_steps, 1.0, 0.0, 0.0, level.num_train_timesteps)
        picked = population.finish(self.particle_log_likelihood(particles, x_next, final_level, x_next, run.targets))
        return x_next[picked]

    def count_evaluation(self, particles: ParticleRun, run: SamplingRun, level) -> None:
        costs, batch = particles.costs, len(run.labels)
        costs["denoiser"] += batch * (2 if run.cfg_weight > 0 else 1)
        if run.classifier_scale > 0 and level.alpha > 0 and not self.guidance.predicts_shift:
            costs["guidance_gradient"] += batch

    def particle_log_likelihood(self, particles: ParticleRun, x, level, x0_hat, targets) -> torch.Tensor:
        """The guide's log p(y | .) of every particle at `level` (one forward pass of the guide, counted)."""
        particles.costs["guidance_forward"] += x.shape[0]
        return guidance_log_likelihood(self.guidance, self.guidance_decoder, x, level, x0_hat, targets)

    def transition_ratio(self, run: SamplingRun, step, x_next, level, t) -> torch.Tensor:
        """TDS's log p(x' | x) - log q(x' | x, y) of the DDPM step just taken (0 where it drew no noise, t = 0).

        Both means are the scheduler's, `step_mean` of its clipped x0_hat: the unguided one of the denoiser's output,
        the proposal's of the output it stepped with plus the mean shift, so a guide that shifts the output (a
        distilled guide, `cfg_guidance`="normalized") is corrected as one that shifts the mean."""
        family, channels = run.family, step.x.shape[1]
        if int(t) == 0:
            return torch.zeros(x_next.shape[0], device=x_next.device)

        def mean_of(output: torch.Tensor) -> torch.Tensor:
            x0_hat = family.clip(family.predicted_clean(output[:, :channels], step.x, level))
            return step_mean(family.scheduler, int(t), x0_hat, step.x)

        unguided = mean_of(step.denoiser_output)
        proposal = mean_of(step.output) + (0 if step.mean_shift is None else step.mean_shift)
        variance = step_variance(family.scheduler, int(t), step.predicted_variance)
        return transition_log_ratio(x_next, unguided, proposal - unguided, variance)

    def report(self, particles: ParticleRun, step: int) -> None:
        """The step's ESS to the progress bar (mean over samples, of K) and to `particle_callback`."""
        population = particles.population
        ess, resampled = population.trace.ess[-1], population.trace.resampled[-1]
        bar = getattr(self, "_particle_bar", None)
        if bar is not None and hasattr(bar, "set_postfix"):
            bar.set_postfix(ess=f"{float(ess.mean()):.2f}/{particles.num_particles}", refresh=False)
        if particles.on_step is not None:
            particles.on_step(
                {"step": step, "ess": ess, "log_weights": population.log_weights.cpu(), "resampled": resampled}
            )


def take_particles(step, indices: torch.Tensor):
    """The proposed step with every per-particle tensor taken at `indices`."""
    taken = {name: None if value is None else value[indices] for name, value in vars(step).items()}
    return type(step)(**taken)


def per_particle(embeds: torch.Tensor | None, num_particles: int) -> torch.Tensor | None:
    """Per-sample prompt embeddings (B, L, D) repeated for each sample's K particles; one shared (1, L, D) as it is."""
    if embeds is None or embeds.shape[0] == 1:
        return embeds
    return embeds.repeat_interleave(num_particles, dim=0)


def particle_generators(
    generator: torch.Generator | list[torch.Generator] | None, num_particles: int, device
) -> tuple[torch.Generator | list[torch.Generator] | None, torch.Generator | list[torch.Generator] | None]:
    """(the particles' noise generators, the groups' resampling generators): for one generator per sample, K
    generators per sample seeded from its own draws (its particles then depend on its seed only) and that generator
    for its resampling; one generator or None serves both."""
    if not isinstance(generator, list):
        return generator, generator
    seeds = [torch.randint(0, 2**62, (num_particles,), generator=g, device=g.device).tolist() for g in generator]
    return [torch.Generator(g.device).manual_seed(seed) for g, row in zip(generator, seeds) for seed in row], generator
