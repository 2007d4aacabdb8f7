"""Sampling where every image's noise follows from its own seed, whatever the batch or the number of processes."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from plugguide.models.seeding import seeded_generators

# Samplers whose state is the variance-preserving x_t itself at the train timestep of `scheduler.timesteps`.
TRAJECTORY_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")


# Batch keys of per-sample guidance targets that are not classes: a dense guide's maps, an embedder's target embeddings.
TARGET_KEYS = ("target_map", "target_embedding")


def sample_batch(pipeline: DiffusionPipeline, batch: dict, **call_kwargs) -> torch.Tensor:
    """Samples one image per (label, seed) of `batch` with `pipeline`, in [-1, 1]; toward `batch["target_map"]` (dense
    guides) or `batch["target_embedding"]` (embedding guides), where it has one.

    Each sample gets its own `torch.Generator` seeded with its seed, so its initial and step noise are the same
    in a batch of 1 and of 500, on one device and on eight.
    """
    generators = seeded_generators(batch["seed"], pipeline.unet.device)
    key = next((key for key in TARGET_KEYS if key in batch), None)
    targets = {} if key is None else {"targets": batch[key]}
    output = pipeline(class_labels=batch["label"], generator=generators, output_type="pt", **targets, **call_kwargs)
    return output.images * 2 - 1


@torch.no_grad()
def sample_trajectory(pipeline: DiffusionPipeline, batch: dict, **call_kwargs) -> dict[int, torch.Tensor]:
    """{train timestep t: the samples x_t (B, C, H, W) on the CPU} of the run `sample_batch` makes of `batch`.

    x_t is the state the denoiser is evaluated on at t, what a guide reads there. diffusers' `callback_on_step_end`
    sees a step's *output*, the sample of the next timestep, so each state is kept until the callback of the step that
    started from it names that step's timestep: the initial noise goes under the first timestep, step i's output under
    step i + 1's, and the last step's output, the final sample, is no x_t. The initial noise is drawn here from the
    per-sample generators and handed to the pipeline, which draws the step noise from where the generators stand, so
    the run is the very one `sample_batch` makes. For EluCD's ECE_t on reverse-process samples
    (`metrics.calibration.reverse_process_calibration_curve`): a class-conditional pipeline, `batch["label"]` its
    condition.

    Args:
        pipeline (`DiffusionPipeline`): a `GuidedDiffusionPipeline` whose scheduler is one of `TRAJECTORY_SCHEDULERS` (their state is x_t).
        batch (`dict`): `label` and `seed` per sample, as for `sample_batch`.
        **call_kwargs: passed to the pipeline (`num_inference_steps`, `classifier_scale`, `guidance_scale`, ...).
    """
    name = type(pipeline.scheduler).__name__
    if name not in TRAJECTORY_SCHEDULERS:
        raise ValueError(
            f"`scheduler` {name} does not sample x_t at train timesteps; trajectories need one of {', '.join(TRAJECTORY_SCHEDULERS)}."
        )
    device = pipeline.unet.device
    generators = seeded_generators(batch["seed"], device)
    noise = randn_tensor(
        pipeline.noise_shape(len(generators)), generator=generators, device=device, dtype=pipeline.unet.dtype
    )
    trajectory, step_input = {}, [(noise * pipeline.scheduler.init_noise_sigma).cpu()]

    def record(pipe: DiffusionPipeline, index: int, timestep: torch.Tensor, tensors: dict) -> dict:
        trajectory[int(timestep)] = step_input[0]  # the state this step's evaluation at `timestep` read
        step_input[0] = tensors["latents"].cpu()
        return tensors

    pipeline(
        class_labels=batch["label"],
        generator=generators,
        latents=noise,
        output_type="pt",
        callback_on_step_end=record,
        **call_kwargs,
    )
    return trajectory
