"""Target classes and per-sample seeds for sampling jobs."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


class _TargetsDataset(Dataset):
    def __init__(self, labels: torch.Tensor, seed: int) -> None:
        self.labels = labels
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"label": self.labels[index], "seed": self.seed + index, "index": index}


class ClassLabelDataModule(L.LightningDataModule):
    """`num_per_class` samples of each class (or unlabelled ones), each with its own seed.

    A sample's noise depends only on `seed + index`, never on the batch size or the number of
    processes, so a sampling run is reproducible on one CPU and on eight GPUs. Batches carry the
    global `index`, so that rows a distributed sampler repeats are counted and written once.

    Args:
        num_per_class (`int`, defaults to 8): samples per class.
        num_classes (`int`, defaults to 10): classes 0..num_classes-1; 0 for unconditional samples (label -1).
        num_unlabelled (`int`, defaults to 80): samples when `num_classes` is 0.
        batch_size (`int`, defaults to 80): samples per batch.
        seed (`int`, defaults to 0): seed of sample 0.
    """

    def __init__(
        self,
        num_per_class: int = 8,
        num_classes: int = 10,
        num_unlabelled: int = 80,
        batch_size: int = 80,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_per_class < 1:
            raise ValueError(f"Expected `num_per_class` to be >= 1, but got {num_per_class}.")
        if num_classes < 0:
            raise ValueError(f"Expected `num_classes` to be >= 0, but got {num_classes}.")
        for name, value in (("num_unlabelled", num_unlabelled), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"Expected `{name}` to be >= 1, but got {value}.")
        self.save_hyperparameters()
        if num_classes:
            labels = torch.arange(num_classes).repeat_interleave(num_per_class)
        else:
            labels = torch.full((num_unlabelled,), -1)
        self.dataset = _TargetsDataset(labels, seed)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.predict_dataloader()
