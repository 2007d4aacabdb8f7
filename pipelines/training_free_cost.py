"""What a training-free guidance run costs: denoiser and guide calls per sample, counted from the method's settings."""

from __future__ import annotations

from dataclasses import dataclass

from plugguide.pipelines.guidance.training_free import TFG


@dataclass(frozen=True)
class TrainingFreeCost:
    """Calls per sample of one sampling run (CFG doubles the denoiser's batch, not these counts).

    Args:
        denoiser_forwards (`int`): denoiser evaluations (NFE).
        denoiser_backwards (`int`): backward passes through the denoiser (the rho term's Jacobian).
        guide_forwards (`int`): images the guide reads (each smoothing draw is one).
        guide_backwards (`int`): backward passes through the guide, one per gradient taken.
    """

    denoiser_forwards: int
    denoiser_backwards: int
    guide_forwards: int
    guide_backwards: int


def training_free_cost(
    guidance: TFG, num_inference_steps: int, guided_steps: int | None = None, evaluations_per_step: int = 1
) -> TrainingFreeCost:
    """The calls of a run of `num_inference_steps` steps with `guidance`, of which `guided_steps` (default: all; a
    flow sampler does not guide its first, pure-noise step) are guided.

    A guided step runs N = `recurrence` times; each run is one denoiser evaluation per evaluation of the step (with
    autograd on where rho > 0, so the rho term's x0_hat costs no second forward, as in TFG's code), the rho term one
    backward through the denoiser and the guide, each of the `iterations` ascent steps on x0_hat one backward through
    the guide; each guide pass reads n = `mc_draws` images where the smoothing is on (sigma > 0), else one.
    """
    guided_steps = num_inference_steps if guided_steps is None else guided_steps
    runs = guided_steps * guidance.recurrence * evaluations_per_step
    draws = guidance.mc_draws if guidance.sigma > 0 else 1
    rho_passes = int(guidance.through_denoiser)
    mu_passes = guidance.iterations if guidance.updates_clean_estimate else 0
    return TrainingFreeCost(
        denoiser_forwards=runs + (num_inference_steps - guided_steps) * evaluations_per_step,
        denoiser_backwards=runs * rho_passes,
        guide_forwards=runs * (rho_passes + mu_passes) * draws,
        guide_backwards=runs * (rho_passes + mu_passes),
    )
