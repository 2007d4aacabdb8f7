"""FK steering inside a stock diffusers pipeline: a `callback_on_step_end` that resamples its K images per prompt.

    with ParticleResampling(pipe, guidance, targets=[3], num_particles=4) as resampling:
        images = resampling.pick(pipe(prompt, num_images_per_prompt=4, callback_on_step_end=resampling).images)

The pipeline's loop, scheduler, CFG and VAE run unchanged; after each step the callback weighs the K particles of
each prompt by an FK potential of the guide's log p(y | .) (pipelines/particle_potentials.py) on the clean estimate of
the evaluation that step made, resamples the pipeline's `latents` within each prompt's K, and returns them; at the end
`pick` keeps one image per prompt. The evaluation is read off the denoiser by a forward hook, and placed in the run
by the callback's step index and `ModelFamily`, as `guided` places its calls (the denoiser's input over the
scheduler's input scale is the state; under CFG the conditional half, under Flux's true CFG the first call); the
guide reads x_t or x0_hat, decoded by the pipeline's VAE. Inside `guided` the output is the guided one, and its
clean estimate the guided x0_hat.

What it cannot do: a stock scheduler hands back the next state, not the density of the step that drew it, so TDS's
proposal correction (pipelines/twisted_weights.py) has nothing to read: potentials only, and `potential`="twisted"
is refused. The callback runs after the step, so it resamples the step's output by the weights of the state the step
started from, as FK's authors' pipelines do; copies of one particle take the next step from the same state, and part
there only where the sampler draws noise (DDPM, Euler ancestral, DDIM with eta > 0).
"""

from __future__ import annotations

import torch

from plugguide.pipelines.guidance.base import Guidance
from plugguide.pipelines.guided_denoiser import (
    DENOISER_NAMES,
    GuidedDenoiser,
    guidance_on,
    guided_denoiser,
    split_learned_variance,
)
from plugguide.pipelines.model_family import ModelFamily, NoiseLevel
from plugguide.pipelines.particle_population import ParticlePopulation, ParticleSettings, reorder_sampler_state
from plugguide.pipelines.particle_potentials import check_potential_guidance, guidance_log_likelihood


class ParticleResampling:
    """A `callback_on_step_end` for stock diffusers pipelines that resamples K particles per target by an FK potential.

    Use it as a context manager (it hooks the denoiser's forward to read each step's evaluation, and unhooks it on
    exit), with or without `guided` around the same call; build it before entering `guided`. The pipeline's batch must hold each target's K images
    together, as `num_images_per_prompt` = K orders them.

    Args:
        pipe (`DiffusionPipeline`): a pipeline that `guided` can guide (a `unet` or `transformer`, a scheduler of
            `SCHEDULER_FAMILIES`, `vae` for latents).
        guidance (`Guidance`): the guide whose log-likelihood is the reward.
        targets (`Sequence | torch.Tensor`): one target per group (prompt), B of them.
        num_particles (`int`): K images per target.
        settings (`ParticleSettings`, *optional*): an FK potential, resampling, pick; None: "diff" with lambda 1.
        generator (`torch.Generator | list[torch.Generator]`, *optional*): the resampling draws: one generator, or one
            per target.
        guidance_vae (*optional*): a lighter decoder of the same latent space for the reward (as for `guided`).
    """

    def __init__(
        self,
        pipe,
        guidance: Guidance,
        targets,
        num_particles: int,
        settings: ParticleSettings | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        guidance_vae=None,
    ) -> None:
        self.settings = ParticleSettings() if settings is None else settings
        if self.settings.potential == "twisted":
            raise ValueError(
                "`potential`='twisted' corrects for the step's proposal density, which a stock scheduler does not "
                "expose; inside a stock pipeline use an FK potential ('max', 'add', 'diff', 'rt')."
            )
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"Expected `num_particles` to be an integer >= 1, but got {num_particles}.")
        self.pipe, self.num_particles, self.generator = pipe, num_particles, generator
        self.guidance = check_potential_guidance(guidance)
        self.targets = torch.as_tensor(targets)
        if any(
            isinstance(vars(getattr(pipe, name, None) or pipe).get("forward"), GuidedDenoiser)
            for name in DENOISER_NAMES
        ):
            raise ValueError(
                "`pipe`'s denoiser is inside `guided`; build `ParticleResampling` before entering `guided` (it reads "
                "the denoiser's own call signature), then use it inside."
            )
        # How the denoiser's calls read (its input, CFG halves, packed latents), as `guided` reads them; scale 0.
        self.reader = guided_denoiser(
            pipe, self.guidance, 0.0, self.targets.repeat_interleave(num_particles, 0), guidance_vae=guidance_vae
        )
        self.denoiser = self.reader.denoiser
        self.population: ParticlePopulation | None = None
        self.picked: torch.Tensor | None = None
        self._hook = None
        self._call = None  # (args, kwargs, output) of the first denoiser call since the last step

    def __enter__(self) -> "ParticleResampling":
        self._hook = self.denoiser.register_forward_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()
        self._hook = None

    def _record(self, module, args, kwargs, output) -> None:
        if self._call is None:
            self._call = (args, kwargs, output)

    @property
    def tensor_inputs(self) -> list[str]:
        return ["latents"]

    def __call__(self, pipeline, step_index: int, timestep, callback_kwargs: dict) -> dict:
        if self._hook is None:
            raise RuntimeError("Use `ParticleResampling` as a context manager around the pipeline call.")
        latents = callback_kwargs["latents"]
        reader = self.reader
        reader.family = ModelFamily(pipeline.scheduler, sets_timesteps=False)  # the one stepping (`guided`'s copy)
        if step_index == 0:
            if latents.shape[0] != len(reader.targets):
                raise ValueError(
                    f"`targets` has {len(self.targets)} entries of {self.num_particles} particles, but the pipeline's "
                    f"batch is {latents.shape[0]}; give one target per prompt and `num_images_per_prompt`="
                    f"{self.num_particles}."
                )
            self.population = ParticlePopulation(
                self.settings, len(self.targets), self.num_particles, self.generator, latents.device
            )
            self.picked = None
        call, self._call = self._call, None
        if call is None:
            raise RuntimeError(f"No denoiser call was seen before step {step_index}; the hook reads each step's call.")
        guidance = guidance_on(self.guidance, latents.device)
        targets = reader.targets.to(latents.device)
        arguments = reader.signature.bind(*call[0], **call[1]).arguments
        vae = reader.vae  # the pipeline's, or `guidance_vae`
        decode = None if vae is None else reader.decoder(arguments)
        scheduler = reader.family.scheduler
        if step_index == len(scheduler.timesteps) - 1:  # the final latents: the clean samples, at t = 0
            clean = NoiseLevel(0, 0, 1, 1.0, 0.0, 0.0, reader.family.num_train_timesteps)
            reward = guidance_log_likelihood(guidance, vae, latents, clean, latents, targets, decode=decode)
            self.picked = self.population.finish(reward)
            return callback_kwargs
        level = reader.family.noise_level(step_index, scheduler.timesteps[step_index])
        if not (level.first_evaluation and level.alpha > 0 and self.settings.weighs_at(level.index, level.num_steps)):
            return callback_kwargs
        model_input, output = arguments[reader.input_name], call[2]
        prediction = output[0] if isinstance(output, tuple) else output.sample
        branches = reader.cfg_branches(model_input.shape[0])
        x = reader.conditional_half_of(reader.sampler_state(model_input, scheduler.timesteps[step_index]), branches)
        prediction = reader.conditional_half_of(split_learned_variance(prediction, model_input.shape[1])[0], branches)
        x0_hat = reader.family.predicted_clean(prediction, x, level)
        self.population.reweigh(guidance_log_likelihood(guidance, vae, x, level, x0_hat, targets, decode=decode))
        indices = self.population.resample()
        if indices is not None:
            callback_kwargs["latents"] = latents[indices.to(latents.device)]
            reorder_sampler_state(pipeline.scheduler, indices, latents)
        return callback_kwargs

    def pick(self, images):
        """One image per target from the pipeline's B * K: a list (PIL), an array or a tensor, batch first."""
        if self.picked is None:
            raise RuntimeError("`pick` reads the final weights of a finished run; call the pipeline first.")
        indices = self.picked.tolist()
        if isinstance(images, list):
            return [images[index] for index in indices]
        return images[indices] if isinstance(images, torch.Tensor) else images[self.picked.cpu().numpy()]
