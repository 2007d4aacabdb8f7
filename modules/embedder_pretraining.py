"""Training the digits' image embedder without labels: SimCLR's contrastive loss on two augmentations of each image."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable

from plugguide.models.image_embedder import ImageEmbedder
from plugguide.models.seeding import step_generator
from plugguide.modules.pretraining_steps import PretrainingSteps


def random_affine(
    images: torch.Tensor,
    max_rotation: float,
    max_scale: float,
    max_shift: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Each image rotated by up to `max_rotation` degrees, scaled by 1 +- `max_scale` and shifted by up to `max_shift`
    pixels (bilinear; the background, -1, fills the border)."""
    batch, _, height, width = images.shape

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(batch, generator=generator, device=images.device) * 2 - 1) * limit

    angle, scale = torch.deg2rad(uniform(max_rotation)), 1 + uniform(max_scale)
    theta = torch.zeros(batch, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / scale, -torch.sin(angle) / scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / scale, torch.cos(angle) / scale
    theta[:, 0, 2], theta[:, 1, 2] = 2 * uniform(max_shift) / width, 2 * uniform(max_shift) / height
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def contrastive_loss(first: torch.Tensor, second: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al., 2020, Eq. 1) on unit embeddings of two views of the same B images: each of the 2B
    views classifies its partner among the other 2B - 1 by the logits `logit_scale` * cos."""
    embeddings = torch.cat([first, second])
    logits = logit_scale * embeddings @ embeddings.T
    logits = logits.masked_fill(torch.eye(len(embeddings), dtype=torch.bool, device=logits.device), float("-inf"))
    batch = len(first)
    partners = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(logits.device)
    return F.cross_entropy(logits, partners)


def nearest_neighbour_accuracy(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The fraction of images whose nearest other image in the set (by cosine) has the same label: a measurement of the
    embedding's class structure (labels are read here only, never in training)."""
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(float("-inf"))
    return (labels[similarity.argmax(1)] == labels).float().mean()


class EmbedderPretraining(PretrainingSteps, L.LightningModule):
    """Contrastive training of an `ImageEmbedder` on unlabelled images (SimCLR, Chen et al., 2020).

    Each batch is augmented twice (random rotation, scale and shift, then Gaussian noise); the loss pulls the two views
    of an image together and pushes the other images' views away, at the embedder's own `logit_scale` (1 /
    temperature), so the scale it is guided at is the one it was trained at. Labels are never read by the loss: the
    embedder learns what the images look like, as CLIP learns from captions rather than classes. Validation reports the
    loss on the held-out split and the nearest-neighbour label agreement of its embeddings within each batch
    (`val/nn_acc`), a measurement only.

    Args:
        embedder (`ImageEmbedder`): the network to train.
        optimizer (`OptimizerCallable`, defaults to `torch.optim.AdamW`): optimiser factory.
        max_rotation (`float`, defaults to 15.0): largest rotation of an augmentation, in degrees.
        max_scale (`float`, defaults to 0.1): largest relative change of size.
        max_shift (`float`, defaults to 2.0): largest shift, in pixels.
        noise_std (`float`, defaults to 0.1): std of the Gaussian noise added to each view.
        seed (`int`, defaults to 0): seed of the augmentations (with the step and the rank), so that a resumed run
            augments as an uninterrupted one would; validation views use a fixed seed.
        export_dtype (`str`, defaults to `"float32"`): "float32", or "float16" to halve the exported weights (loading
            casts them back to float32).
    """

    trained_network = "embedder"

    def __init__(
        self,
        embedder: ImageEmbedder,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        max_rotation: float = 15.0,
        max_scale: float = 0.1,
        max_shift: float = 2.0,
        noise_std: float = 0.1,
        seed: int = 0,
        export_dtype: Literal["float32", "float16"] = "float32",
    ) -> None:
        super().__init__()
        for name, value in (
            ("max_rotation", max_rotation),
            ("max_scale", max_scale),
            ("max_shift", max_shift),
            ("noise_std", noise_std),
        ):
            if value < 0:
                raise ValueError(f"Expected `{name}` to be >= 0, but got {value}.")
        if export_dtype not in ("float32", "float16"):
            raise ValueError(f"Expected `export_dtype` to be 'float32' or 'float16', but got {export_dtype!r}.")
        self.save_hyperparameters(ignore=["embedder", "optimizer"])
        self.embedder = embedder
        self.optimizer = optimizer

    def augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One random view of each image."""
        hparams = self.hparams
        views = random_affine(images, hparams.max_rotation, hparams.max_scale, hparams.max_shift, generator)
        noise = torch.randn(views.shape, generator=generator, device=views.device)
        return views + hparams.noise_std * noise

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        images = batch["image"]
        step = self.global_step if stage == "train" else 0
        generator = step_generator(self.hparams.seed, step, self.global_rank, images.device)
        first, second = (self.embedder(self.augment(images, generator)) for _ in range(2))
        loss = contrastive_loss(first, second, self.embedder.logit_scale)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", sync_dist=stage != "train")
        if stage != "train":
            accuracy = nearest_neighbour_accuracy(self.embedder(images), batch["label"])
            self.log(f"{stage}/nn_acc", accuracy, prog_bar=True, sync_dist=True)
        return loss
