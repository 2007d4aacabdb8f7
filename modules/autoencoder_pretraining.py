"""Training the digits autoencoder whose latent space is a feature space of the sample-quality metrics."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from lightning.pytorch.cli import OptimizerCallable

from plugguide.models import save_atomically
from plugguide.models.seeding import step_generator


class AutoencoderPretraining(L.LightningModule):
    """A KL-regularised autoencoder (diffusers `AutoencoderKL`, Rombach et al., 2022) trained to reconstruct clean images.

    Loss `||x - D(z)||^2 + kl_weight * KL(q(z|x) || N(0, I))`, z sampled from the posterior. Its posterior means
    are the "autoencoder" feature space of `plugguide.metrics`: a reconstruction objective has to keep what a
    classifier is trained to ignore (stroke width, blobs, a digit's style), so a Frechet distance there sees
    artifacts that keep the class. The same class loads Stable Diffusion's VAE for hub-scale evaluation.

    Args:
        autoencoder (`dict`): the `AutoencoderKL` to train, as its diffusers config (`AutoencoderKL.from_config`; its
            constructor annotates `block_out_channels` as a 1-tuple, which the CLI would enforce).
        optimizer (`OptimizerCallable`, defaults to `torch.optim.AdamW`): optimiser factory.
        kl_weight (`float`, defaults to 1e-4): weight of the KL term (small: a near-deterministic code, as in latent
            diffusion).
        seed (`int`, defaults to 0): seed of the posterior samples (with the step and the rank), so a resumed run draws
            what an uninterrupted one would.
    """

    def __init__(
        self,
        autoencoder: dict,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        kl_weight: float = 1e-4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if kl_weight < 0:
            raise ValueError(f"Expected `kl_weight` to be >= 0, but got {kl_weight}.")
        self.save_hyperparameters(ignore=["optimizer"])
        self.autoencoder = AutoencoderKL.from_config(autoencoder)
        self.optimizer = optimizer

    def _step(self, batch: dict, stage: str, generator: torch.Generator | None = None) -> torch.Tensor:
        images = batch["image"]
        posterior = self.autoencoder.encode(images).latent_dist
        latents = posterior.sample(generator) if stage == "train" else posterior.mean
        reconstruction = F.mse_loss(self.autoencoder.decode(latents).sample, images)
        kl = posterior.kl().mean() / images[0].numel()
        loss = reconstruction + self.hparams.kl_weight * kl
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", sync_dist=stage != "train")
        self.log(f"{stage}/reconstruction_mse", reconstruction, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(
            batch,
            "train",
            step_generator(self.hparams.seed, self.global_step, self.global_rank, batch["image"].device),
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self):
        return self.optimizer(self.autoencoder.parameters())

    def export(self, directory: str) -> None:
        """Writes the autoencoder with diffusers' `save_pretrained` (config.json + safetensors), atomically."""
        save_atomically(directory, self.autoencoder.save_pretrained)
