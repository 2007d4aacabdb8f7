"""Feature spaces in which generated images are compared with real ones, each blind to different things."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PooledPixels(nn.Module):
    """The image itself, average-pooled to `size` x `size` per channel and flattened.

    No network, so nothing it was trained to ignore: thickened strokes, blobs and a collapse to one
    prototype per class all change these statistics, while a classifier's features (trained to keep only
    the class) may not move at all.

    Args:
        size (`int`, defaults to 8): side of the pooled image (8 for the 16x16 digits: the resolution of the original
            UCI data).
    """

    def __init__(self, size: int = 8) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"Expected `size` to be >= 1, but got {size}.")
        self.size = size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images, self.size).flatten(1)


class AutoencoderLatents(nn.Module):
    """Posterior means of an autoencoder's latents (a diffusers `AutoencoderKL`), flattened.

    A reconstruction objective keeps what a classifier discards (stroke width, style), so distances here see
    within-class artifacts; with Stable Diffusion's VAE the same class serves hub-scale images.

    Args:
        autoencoder (`nn.Module`): the `AutoencoderKL` (frozen here), e.g. `assets/digits/autoencoder`.
    """

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "AutoencoderLatents":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(images).latent_dist.mean.flatten(1)
