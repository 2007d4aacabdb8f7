"""Writing sampled images: samples.npz and grid.png."""

from __future__ import annotations

import os

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.utilities.distributed import gather_all_tensors
from torchvision.utils import save_image

from plugguide.callbacks.labelled_grid import labelled_grid
from plugguide.callbacks.run_folder import in_run_folder
from plugguide.metrics.generation import unique_rows


def class_rows(labels: torch.Tensor, nrow: int) -> list[str] | None:
    """ "class k" for each grid row whose samples all target class k; None (no label column) where any row is mixed
    or untargeted."""
    rows = [labels[start : start + nrow] for start in range(0, len(labels), nrow)]
    if not all(int(row[0]) >= 0 and bool((row == row[0]).all()) for row in rows):
        return None
    return [f"class {int(row[0])}" for row in rows]


class SampleWriter(BasePredictionWriter):
    """Writes `samples.npz` (`images` float32 N x C x H x W in [-1, 1], `labels` int64, -1 for none) and `grid.png`.

    Samples guided toward target maps (`TargetMapDataModule`) also get `target_maps` (N, H, W): the label maps
    (int64) or depth maps (float32) they were guided toward, so anyone can score them independently.

    Both files are written under a temporary name and renamed, so a reader never sees half a file.
    Under DDP the ranks' predictions (of different sizes: the predict sampler does not pad) are gathered and
    rank 0 writes them in the order of their global `index`, each sample once, as one process would.

    Args:
        output_dir (`str`, *optional*): directory of the files, relative to the run's folder
            (`<default_root_dir>/version_N`) or absolute; default: the run's folder itself.
        nrow (`int`, defaults to 8): images per grid row (the number of samples per class makes one class per row).
    """

    def __init__(self, output_dir: str | None = None, nrow: int = 8) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.nrow = nrow

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        rows = {
            "images": torch.cat([p["images"] for p in predictions]),
            "labels": torch.cat([p["labels"] for p in predictions]),
            "index": torch.cat(
                [p.get("index", torch.full((len(p["labels"]),), -1)) for p in predictions]
            ),  # -1: kept in order
        }
        if "target_maps" in predictions[0]:
            rows["target_maps"] = torch.cat([p["target_maps"] for p in predictions])
        if trainer.world_size > 1:
            rows = {
                name: torch.cat(gather_all_tensors(values.to(pl_module.device))).cpu() for name, values in rows.items()
            }
        rows = unique_rows(rows)
        images, labels = rows["images"], rows["labels"]
        directory = in_run_folder(trainer, self.output_dir or "")  # on every process (rank 0's folder is broadcast)
        if not trainer.is_global_zero:
            return
        maps = {"target_maps": rows["target_maps"].numpy()} if "target_maps" in rows else {}
        os.makedirs(directory, exist_ok=True)
        npz, grid = os.path.join(directory, "samples.npz"), os.path.join(directory, "grid.png")
        np.savez(npz + ".tmp.npz", images=images.float().numpy(), labels=labels.long().numpy(), **maps)
        os.replace(npz + ".tmp.npz", npz)
        save_image(labelled_grid(images / 2 + 0.5, self.nrow, class_rows(labels, self.nrow)), grid + ".tmp.png")
        os.replace(grid + ".tmp.png", grid)
        rank_zero_info(f"Wrote {len(images)} samples to {npz} and {grid}")
