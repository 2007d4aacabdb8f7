"""Training-free guidance (TFG's design space and its presets) on every model family, in the project pipeline and in
stock pipelines, checked against the exact mixture posterior and against the authors' own step."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from plugguide.pipelines import GuidedDiffusionPipeline
from plugguide.pipelines.guidance import DPS, LGD, MPGD, TFG, UGD, FreeDoM
from tests.test_model_families import MEANS, SPREAD


class TimestepMixtureDenoiser(UNet2DModel):
    """The exact eps of the 2-D mixture of `tests.test_model_families` under a VP schedule, read off the timestep, and
    differentiable in its input (the rho term's gradient runs through it)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__(
            sample_size=1,
            in_channels=2,
            out_channels=2,
            block_out_channels=(4,),
            down_block_types=("DownBlock2D",),
            up_block_types=("UpBlock2D",),
            layers_per_block=1,
            norm_num_groups=2,
        )
        self.register_buffer("abar", alphas_cumprod.clone(), persistent=False)

    def forward(self, sample, timestep, return_dict=True):
        abar = self.abar[torch.as_tensor(timestep).long().expand(sample.shape[0])].view(-1, 1, 1)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        x = sample.flatten(1)[:, None]  # (B, 1, 2)
        variance = alpha**2 * SPREAD**2 + sigma**2
        log_density = -((x - alpha * MEANS) ** 2).sum(-1, keepdim=True) / (2 * variance)  # (B, K, 1)
        clean = MEANS + (alpha * SPREAD**2 / variance) * (x - alpha * MEANS)  # E[x0 | x_t, k]
        x0 = (log_density.softmax(1) * clean).sum(1)
        eps = (x[:, 0] - alpha[:, 0] * x0) / sigma[:, 0]
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
    guided = mixture_samples(TFG(CleanMixtureClassifier()), 1.0)
    assert abs(in_class(unguided) - 0.5) < 0.05
    assert in_class(guided) > 0.97
    distance = lambda points: float((points.mean(0) - MEANS[0]).norm())  # noqa: E731
    assert distance(guided) < 0.2 < 0.7 < distance(unguided)
    spread = float((guided - MEANS[0]).norm(dim=1).pow(2).mean().sqrt())  # N(mu_0, s^2 I): sqrt(2) s = 0.42
    assert spread < 2 * SPREAD


PRESETS = [TFG, DPS, LGD, FreeDoM, MPGD, UGD]
