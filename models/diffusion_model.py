"""Loading frozen diffusion models and choosing their sampler, the same way for assets and hub ids."""

from __future__ import annotations

import os

import diffusers
from diffusers import AutoModel, DDPMScheduler, DiffusionPipeline, SchedulerMixin
from safetensors import SafetensorError
from torch import nn

# Every sampler the guided pipeline handles, by the space its state lives in (pipelines/model_family.py
# holds the conversions): "vp" x_t = sqrt(abar) x0 + sqrt(1 - abar) eps; "sigma" x = x0 + sigma eps (Euler, Heun:
# k-diffusion's form of the same noise schedule); "edm" the same space with EDM's preconditioned network
# (Karras et al., 2022); "flow" x = (1 - sigma) x0 + sigma eps (rectified flow, velocity prediction).
SCHEDULER_FAMILIES = {
    "DDPMScheduler": "vp",
    "DDIMScheduler": "vp",
    "DPMSolverMultistepScheduler": "vp",
    "DPMSolverSinglestepScheduler": "vp",
    "UniPCMultistepScheduler": "vp",
    "DEISMultistepScheduler": "vp",
    "PNDMScheduler": "vp",
    "EulerDiscreteScheduler": "sigma",
    "EulerAncestralDiscreteScheduler": "sigma",
    "HeunDiscreteScheduler": "sigma",
    "EDMEulerScheduler": "edm",
    "EDMDPMSolverMultistepScheduler": "edm",
    "FlowMatchEulerDiscreteScheduler": "flow",
}
SUPPORTED_SCHEDULERS = tuple(SCHEDULER_FAMILIES)


TRAINING_FAMILIES = {"betas": "a DDPM noise schedule", "edm": "EDM preconditioning", "flow": "flow matching"}


def training_family(scheduler_class: str) -> str:
    """How a model saved with `scheduler_class` was trained: "betas" (a DDPM noise schedule, which the vp and sigma
    samplers both read), "edm" (EDM preconditioning) or "flow" (rectified flow); samplers only serve their own."""
    if scheduler_class.startswith("FlowMatch"):
        return "flow"
    if scheduler_class.startswith("EDM"):
        return "edm"
    return "betas"


def check_model_path(path: str, setting: str = "diffusion_model") -> None:
    """Fails with the setting named when `path` is neither an existing directory nor shaped like a hub id (`owner/name`)."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"Expected `{setting}` to be a pipeline directory or a hub id, but got {path!r}.")
    if not os.path.isdir(path) and (os.sep in path.strip("/").split("/", 1)[-1] or path.startswith((".", "/"))):
        raise FileNotFoundError(
            f"`{setting}`={path!r} does not exist; give a pipeline directory (assets/digits/...) or a hub id."
        )


# Where a diffusers pipeline keeps its denoiser: a UNet (DDPM, Stable Diffusion) or a transformer (DiT).
DENOISER_FOLDERS = ("unet", "transformer")


def unloadable(path: str, part: str) -> str:
    """Why a model at `path` may fail to load: a damaged local file, or a hub id without network."""
    if os.path.isdir(path):
        return f"a file of its {part} (config or weights) is damaged, truncated or of another model"
    return "hub ids need network access"


def load_unet(path: str, setting: str = "diffusion_model") -> nn.Module:
    """The denoiser of a diffusers pipeline directory or hub id (`unet/` or `transformer/`), or of a bare model dir."""
    check_model_path(path, setting)
    if os.path.isdir(path):
        subfolder = next((f for f in DENOISER_FOLDERS if os.path.isdir(os.path.join(path, f))), None)
        if not os.path.isfile(os.path.join(path, subfolder or "", "config.json")):
            raise FileNotFoundError(
                f"`{setting}`={path!r} holds no diffusers denoiser (expected unet/, transformer/ or config.json)."
            )
    try:
        if not os.path.isdir(path):
            components = DiffusionPipeline.load_config(path)  # model_index.json names the pipeline's parts
            subfolder = next((f for f in DENOISER_FOLDERS if f in components), "unet")
        return AutoModel.from_pretrained(path, subfolder=subfolder)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise OSError(
            f"`{setting}`={path!r} could not be loaded: {unloadable(path, 'denoiser')} ({error})."
        ) from error


def load_scheduler(
    path: str,
    name: str = "DDPMScheduler",
    setting: str = "scheduler",
    path_setting: str = "diffusion_model",
    overrides: dict | None = None,
) -> SchedulerMixin:
    """The pipeline's training noise schedule, as the sampler class `name` (a diffusers scheduler).

    The sampler must serve the family the model was trained in (its saved scheduler class, see `training_family`):
    Euler or DPM-Solver read a DDPM model's betas, but cannot sample a flow-matching model, and the other way round.
    `overrides` replace config entries (`{"use_karras_sigmas": True}` for Euler-Karras or Heun/EDM steps).
    `setting` names the sampler setting and `path_setting` the model-path setting in error messages.
    """
    if name not in SUPPORTED_SCHEDULERS:
        raise ValueError(f"Unknown `{setting}`={name!r}; allowed: {', '.join(SUPPORTED_SCHEDULERS)}.")
    check_model_path(path, path_setting)
    subfolder = "scheduler" if not os.path.isdir(path) or os.path.isdir(os.path.join(path, "scheduler")) else None
    try:
        config = DDPMScheduler.load_config(path, subfolder=subfolder)
    except OSError as error:
        where = (
            "a directory needs scheduler/scheduler_config.json"
            if os.path.isdir(path)
            else "hub ids need network access"
        )
        raise OSError(f"`{path_setting}`={path!r} has no loadable noise scheduler: {where} ({error}).") from error
    trained_with = config.get("_class_name", "DDPMScheduler")
    if training_family(trained_with) != training_family(name):
        trained = f"`{path_setting}`={path!r} was trained with {trained_with} ({TRAINING_FAMILIES[training_family(trained_with)]})"
        if setting == path_setting:  # a job's own forward process, not a sampler the user chose
            raise ValueError(
                f"{trained}, but this job needs a model trained with {TRAINING_FAMILIES[training_family(name)]}."
            )
        allowed = [n for n in SUPPORTED_SCHEDULERS if training_family(n) == training_family(trained_with)]
        raise ValueError(
            f"{trained}; `{setting}`={name!r} samples models trained with {TRAINING_FAMILIES[training_family(name)]}. Allowed: {', '.join(allowed)}."
        )
    return getattr(diffusers, name).from_config(config, **(overrides or {}))


def load_vae(path: str, setting: str = "vae", tiny: bool = False) -> nn.Module:
    """The `AutoencoderKL` of a latent model: a pipeline directory / hub id with a `vae/` sub-folder, or a bare VAE;
    with `tiny`, an `AutoencoderTiny` (TAESD) instead."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    check_model_path(path, setting)
    subfolder = "vae" if os.path.isdir(os.path.join(path, "vae")) else None
    try:
        return (AutoencoderTiny if tiny else AutoencoderKL).from_pretrained(path, subfolder=subfolder)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise OSError(f"`{setting}`={path!r} could not be loaded: {unloadable(path, 'VAE')} ({error}).") from error
