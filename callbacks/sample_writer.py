"""Writing sampled images: samples.npz and grid.png."""

from __future__ import annotations

import os

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torchvision.utils import save_image


class SampleWriter(BasePredictionWriter):
    """Writes `samples.npz` (`images` float32 N x C x H x W in [-1, 1], `labels` int64, -1 for none) and `grid.png`.

    Both files are written under a temporary name and renamed, so a reader never sees half a file.
    Under DDP every rank gathers its predictions to rank 0, which writes the files.

    Args:
        output_dir: directory of the files; defaults to the trainer's log directory.
        nrow: images per grid row (the number of samples per class makes one class per row).
    """

    def __init__(self, output_dir: str | None = None, nrow: int = 8) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.nrow = nrow

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        images = torch.cat([p["images"] for p in predictions])
        labels = torch.cat([p["labels"] for p in predictions])
        if trainer.world_size > 1:
            images = trainer.strategy.all_gather(images.to(pl_module.device)).flatten(0, 1).cpu()
            labels = trainer.strategy.all_gather(labels.to(pl_module.device)).flatten(0, 1).cpu()
        if not trainer.is_global_zero:
            return
        directory = self.output_dir or trainer.log_dir or trainer.default_root_dir
        os.makedirs(directory, exist_ok=True)
        npz, grid = os.path.join(directory, "samples.npz"), os.path.join(directory, "grid.png")
        np.savez(npz + ".tmp.npz", images=images.float().numpy(), labels=labels.long().numpy())
        os.replace(npz + ".tmp.npz", npz)
        save_image(images / 2 + 0.5, grid + ".tmp.png", nrow=self.nrow, padding=1, pad_value=1.0)
        os.replace(grid + ".tmp.png", grid)
        rank_zero_info(f"Wrote {len(images)} samples to {npz} and {grid}")
