"""Loading frozen diffusion models and choosing their sampler, the same way for assets and hub ids."""

from __future__ import annotations

import os

import diffusers
from diffusers import AutoModel, DDPMScheduler, DiffusionPipeline, SchedulerMixin
from safetensors import SafetensorError
from torch import nn

# Samplers that work on variance-preserving x_t (init_noise_sigma == 1), where x0_hat and the guidance
# shifts of METHODS.md apply as written. Sigma-space solvers (Euler, Heun, ...) would need x rescaled.
SUPPORTED_SCHEDULERS = (
    "DDPMScheduler",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "PNDMScheduler",
)


def check_model_path(path: str, setting: str = "diffusion_model") -> None:
    """Fails with the setting named when `path` is neither an existing directory nor shaped like a hub id (`owner/name`)."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"Expected `{setting}` to be a pipeline directory or a hub id, but got {path!r}.")
    if not os.path.isdir(path) and (os.sep in path.strip("/").split("/", 1)[-1] or path.startswith((".", "/"))):
        raise FileNotFoundError(f"`{setting}`={path!r} does not exist; give a pipeline directory (assets/digits/...) or a hub id.")


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
            raise FileNotFoundError(f"`{setting}`={path!r} holds no diffusers denoiser (expected unet/, transformer/ or config.json).")
    try:
        if not os.path.isdir(path):
            components = DiffusionPipeline.load_config(path)  # model_index.json names the pipeline's parts
            subfolder = next((f for f in DENOISER_FOLDERS if f in components), "unet")
        return AutoModel.from_pretrained(path, subfolder=subfolder)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise OSError(f"`{setting}`={path!r} could not be loaded: {unloadable(path, 'denoiser')} ({error}).") from error


def load_scheduler(path: str, name: str = "DDPMScheduler", setting: str = "scheduler", path_setting: str = "diffusion_model") -> SchedulerMixin:
    """The pipeline's training noise schedule, as the sampler class `name` (a diffusers scheduler).

    `setting` names the sampler setting and `path_setting` the model-path setting in error messages.
    """
    if name not in SUPPORTED_SCHEDULERS:
        raise ValueError(f"Unknown `{setting}`={name!r}; allowed: {', '.join(SUPPORTED_SCHEDULERS)}.")
    check_model_path(path, path_setting)
    subfolder = "scheduler" if not os.path.isdir(path) or os.path.isdir(os.path.join(path, "scheduler")) else None
    try:
        config = DDPMScheduler.load_config(path, subfolder=subfolder)
    except OSError as error:
        where = "a directory needs scheduler/scheduler_config.json" if os.path.isdir(path) else "hub ids need network access"
        raise OSError(f"`{path_setting}`={path!r} has no loadable noise scheduler: {where} ({error}).") from error
    return getattr(diffusers, name).from_config(config)


def load_vae(path: str, setting: str = "vae") -> nn.Module:
    """The `AutoencoderKL` of a latent model: a pipeline directory / hub id with a `vae/` sub-folder, or a bare VAE."""
    from diffusers import AutoencoderKL

    check_model_path(path, setting)
    subfolder = "vae" if os.path.isdir(os.path.join(path, "vae")) else None
    try:
        return AutoencoderKL.from_pretrained(path, subfolder=subfolder)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise OSError(f"`{setting}`={path!r} could not be loaded: {unloadable(path, 'VAE')} ({error}).") from error
