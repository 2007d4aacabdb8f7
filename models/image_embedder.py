"""A small image-embedding network, the digits' stand-in for CLIP's image tower, and embedding reference images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plugguide.models.saving import HubModelMixin, load_saved


class ImageEmbedder(nn.Module, HubModelMixin):
    """e(x) = g(f(x)) / |g(f(x))|: a small conv net and an MLP head onto the unit sphere of `embedding_dim` dimensions.

    The digits have no CLIP; this plays its part: an embedding in which similar images lie close, trained without
    labels (SimCLR's contrastive loss on two augmentations of each image, Chen et al., 2020;
    `modules.EmbedderPretraining`), so guidance toward a reference digit's embedding asks for an image the embedder
    finds alike, not for a class a classifier was taught. `logit_scale` is 1 / the contrastive loss's temperature,
    the scale at which the model scores pairs in training (CLIP's exp(t)), and the default scale of its guidance task.

    Inputs are images in [-1, 1], (B, `in_chans`, H, W) at any size (the network ends in global average pooling).

    Args:
        in_chans (`int`, defaults to 1): input channels.
        channels (`list[int]`, *optional*): widths of the conv stages, each but the first halving the resolution;
            None: [32, 64, 64].
        embedding_dim (`int`, defaults to 32): D, the size of the embedding.
        logit_scale (`float`, defaults to 10.0): 1 / temperature of the contrastive loss (SimCLR's 0.1).
    """

    predicts = "embedding"

    def __init__(
        self, in_chans: int = 1, channels: list[int] | None = None, embedding_dim: int = 32, logit_scale: float = 10.0
    ) -> None:
        super().__init__()
        channels = list(channels or [32, 64, 64])
        if not channels or min(channels) < 1 or embedding_dim < 1 or in_chans < 1:
            raise ValueError(
                f"Expected `in_chans`, `embedding_dim` and every entry of `channels` to be >= 1, but got in_chans="
                f"{in_chans}, channels={channels}, embedding_dim={embedding_dim}."
            )
        if not logit_scale > 0:
            raise ValueError(f"Expected `logit_scale` to be > 0, but got {logit_scale}.")
        layers, width = [], in_chans
        for stage, out in enumerate(channels):
            layers += [nn.Conv2d(width, out, 3, stride=1 if stage == 0 else 2, padding=1), nn.SiLU()]
            width = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, embedding_dim))
        self.in_chans = in_chans
        self.embedding_dim = embedding_dim
        self.logit_scale = float(logit_scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) unit-norm embeddings of (B, C, H, W) images in [-1, 1]."""
        return F.normalize(self.head(self.features(images)), dim=-1)


def load_image_embedder(path: str, setting: str = "classifier") -> ImageEmbedder:
    """An `ImageEmbedder` saved with `save_pretrained` (e.g. assets/digits/embedder)."""
    return load_saved(ImageEmbedder, path, setting, "image embedder", "assets/digits/embedder")


@torch.no_grad()
def embed_images(embedder: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, D) embeddings of reference images (N, C, H, W) in [-1, 1], in eval mode, in batches: the targets of
    guidance toward those images (any embedding model: `ImageEmbedder`, `CLIPImageEmbedder`). Every submodule's mode
    is restored after, so a module still training is left as it was handed in."""
    modes = [(module, module.training) for module in embedder.modules()]
    embedder.eval()
    try:
        device = next(embedder.parameters()).device
        return torch.cat([embedder(batch.to(device)) for batch in images.split(batch_size)])
    finally:
        for module, training in modes:
            module.training = training
