"""The schedule every grid callback shares: draw after every n-th validation epoch and once more at fit end."""

from __future__ import annotations

import lightning as L


class PeriodicGrid(L.Callback):
    """Calls `draw(trainer, pl_module)` after every `every_n_epochs`-th validation epoch (never in the sanity
    check) and at the end of fit, so the last model always has a grid. Subclasses implement `draw`."""

    def __init__(self, every_n_epochs: int = 1) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"Expected `every_n_epochs` to be >= 1, but got {every_n_epochs}.")
        self.every_n_epochs = every_n_epochs

    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self.draw(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.draw(trainer, pl_module)
