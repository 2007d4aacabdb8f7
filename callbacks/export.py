"""Exporting a trained model in its standard format when `fit` ends."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from plugguide.callbacks.run_folder import in_run_folder


class ExportPretrained(L.Callback):
    """Calls `pl_module.export(directory)` at the end of `fit` (after EMA weights are swapped in).

    The export belongs to the run: a relative `directory` is taken under the run's folder, so two runs never write
    the same files (`experts` -> `runs/ppap/version_0/experts`), and the job's folder gets a link `latest` to the
    run that exported last (`runs/ppap/latest/experts`), which the next job of a chain names, so a second run of the
    chain reads its own predecessor. An absolute `directory` is used as given, e.g. to replace a shipped model on
    purpose (`$PWD/assets/digits/ddpm-uncond`).

    Args:
        directory (str): where the model is written (diffusers `save_pretrained` or safetensors + config), relative to
            the run's folder or absolute.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path: str | None = None
        self.run_folder: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.path = in_run_folder(trainer, self.directory)  # on every process (rank 0's folder is broadcast)
        self.run_folder = None if os.path.isabs(self.directory) else trainer.log_dir

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.export(self.path)
        rank_zero_info(f"Exported {type(pl_module).__name__} to {self.path}")
        if self.run_folder:  # read in `setup`: `trainer.log_dir` is a collective under DDP, not for rank 0 alone
            link_latest(self.run_folder)


def link_latest(run_folder: str) -> None:
    """Points `<job folder>/latest` at `run_folder` (`<job folder>/version_N`), replacing the link atomically."""
    link = os.path.join(os.path.dirname(os.path.normpath(run_folder)), "latest")
    temporary = f"{link}.tmp-{os.getpid()}"
    os.symlink(os.path.basename(os.path.normpath(run_folder)), temporary)
    os.replace(temporary, link)
