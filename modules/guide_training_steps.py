"""The Lightning steps every guide-training job shares: one loss per batch, seeded by the step, the guide alone trained."""

from __future__ import annotations

import torch

from plugguide.models.seeding import default_seed, step_generator


class GuideTrainingSteps:
    """Mixed into a LightningModule that sets `self.guide` and `self.optimizer` and implements `_loss(batch, generator)`.

    Training draws (timesteps, targets, scales, noise) come from a generator seeded by (seed_everything's seed, step,
    rank), not from the global RNG, which Lightning does not restore: a run resumed mid-epoch draws exactly what it
    would have drawn, and every DDP process draws its own. Validation draws are fixed per batch, so the validation
    losses of different epochs compare.
    """

    def _loss(self, batch: dict, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def _step(self, batch: dict, stage: str, generator: torch.Generator | None = None) -> torch.Tensor:
        loss = self._loss(batch, generator)
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=stage != "train", batch_size=batch["image"].shape[0])
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(
            batch, "train", step_generator(default_seed(), self.global_step, self.global_rank, self.device)
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val", torch.Generator(self.device).manual_seed(batch_idx))

    def configure_optimizers(self):
        return self.optimizer(self.guide.parameters())
