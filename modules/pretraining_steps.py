"""The Lightning steps the supervised and contrastive pretraining jobs share: one `_step` per stage, one network
trained and exported."""

from __future__ import annotations

import copy

import torch

from plugguide.models.saving import save_atomically


class PretrainingSteps:
    """Mixed into a LightningModule that trains the one network named by `trained_network`, with `self.optimizer`, and
    implements `_step(batch, stage)` for the stages "train", "val" and "test".

    `export` writes that network with `save_pretrained`, atomically; where the job has an `export_dtype`
    hyper-parameter, a copy cast to that dtype is written, so the network being trained keeps its precision.
    """

    trained_network: str

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):
        return self.optimizer(getattr(self, self.trained_network).parameters())

    def export(self, directory: str) -> None:
        """Writes the trained network with `save_pretrained` (in `export_dtype` where the job has one), atomically."""
        network = getattr(self, self.trained_network)
        export_dtype = self.hparams.get("export_dtype")
        if export_dtype is not None:
            network = copy.deepcopy(network).to(getattr(torch, export_dtype))
        save_atomically(directory, network.save_pretrained)
