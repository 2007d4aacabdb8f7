"""Exporting a trained model in its standard format when `fit` ends."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from plugguide.callbacks.run_folder import in_run_folder


class ExportPretrained(L.Callback):
    """Calls `pl_module.export(directory)` at the end of `fit` (after EMA weights are swapped in).

    The export belongs to the run: a relative `directory` is taken under the run's folder, so two runs never write
    the same files (`experts` -> `runs/ppap/version_0/experts`). An absolute `directory` is used as given, e.g. to
    replace a shipped model on purpose (`$PWD/assets/digits/ddpm-uncond`).

    Args:
        directory (str): where the model is written (diffusers `save_pretrained` or safetensors + config), relative to
            the run's folder or absolute.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.path = in_run_folder(trainer, self.directory)  # on every process (rank 0's folder is broadcast)

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.export(self.path)
        rank_zero_info(f"Exported {type(pl_module).__name__} to {self.path}")
