"""Loading frozen diffusion models and choosing their sampler, the same way for assets and hub ids."""

from __future__ import annotations

import os

import diffusers
from diffusers import AutoModel, DDPMScheduler, SchedulerMixin
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


def load_unet(path: str, setting: str = "diffusion_model") -> nn.Module:
    """The UNet of a diffusers pipeline directory or hub id (`unet/` sub-folder), or of a bare model dir."""
    check_model_path(path, setting)
    if os.path.isdir(path):
        subfolder = "unet" if os.path.isdir(os.path.join(path, "unet")) else None
        if not os.path.isfile(os.path.join(path, subfolder or "", "config.json")):
            raise FileNotFoundError(f"`{setting}`={path!r} holds no diffusers UNet (expected unet/config.json or config.json).")
    else:
        subfolder = "unet"
    try:
        return AutoModel.from_pretrained(path, subfolder=subfolder)
    except OSError as error:
        raise OSError(f"`{setting}`={path!r} could not be loaded: hub ids need network access ({error}).") from error


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
