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


def load_unet(path: str, setting: str = "diffusion_model") -> nn.Module:
    """The UNet of a diffusers pipeline directory or hub id (`unet/` sub-folder), or of a bare model dir."""
    is_local = os.path.isdir(path)
    if is_local:
        subfolder = "unet" if os.path.isdir(os.path.join(path, "unet")) else None
        if not os.path.isfile(os.path.join(path, subfolder or "", "config.json")):
            raise FileNotFoundError(f"`{setting}`={path!r} holds no diffusers UNet (expected unet/config.json or config.json).")
    elif os.sep in path.strip("/").split("/", 1)[-1] or path.startswith((".", "/")):
        raise FileNotFoundError(f"`{setting}`={path!r} does not exist; give a pipeline directory (assets/digits/...) or a hub id.")
    else:
        subfolder = "unet"
    try:
        return AutoModel.from_pretrained(path, subfolder=subfolder)
    except OSError as error:
        raise OSError(f"`{setting}`={path!r} could not be loaded: hub ids need network access ({error}).") from error


def load_scheduler(path: str, name: str = "DDPMScheduler", setting: str = "scheduler") -> SchedulerMixin:
    """The pipeline's training noise schedule, as the sampler class `name` (a diffusers scheduler)."""
    if name not in SUPPORTED_SCHEDULERS:
        raise ValueError(f"Unknown `{setting}`={name!r}; allowed: {', '.join(SUPPORTED_SCHEDULERS)}.")
    subfolder = "scheduler" if not os.path.isdir(path) or os.path.isdir(os.path.join(path, "scheduler")) else None
    config = DDPMScheduler.load_config(path, subfolder=subfolder)
    return getattr(diffusers, name).from_config(config)
