"""Exporting a trained model in its standard format when `fit` ends."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only


class ExportPretrained(L.Callback):
    """Calls `pl_module.export(directory)` at the end of `fit` (after EMA weights are swapped in).

    Args:
        directory: where the model is written (diffusers `save_pretrained` or safetensors + config).
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.export(self.directory)
        rank_zero_info(f"Exported {type(pl_module).__name__} to {self.directory}")
