"""Target maps for dense guidance: an off-the-shelf model's output on held-out real images (PPAP, Sec. 5.2)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from plugguide.datamodules.digits import DigitsDataModule
from plugguide.datamodules.image_folder import SPLITS, ImageDataModule
from plugguide.metrics.pixel_maps import majority_digit
from plugguide.models import load_dense_model
from plugguide.pipelines.tasks import default_task


class _TargetMapsDataset(Dataset):
    def __init__(self, rows: dict[str, torch.Tensor], seed: int) -> None:
        self.rows = rows
        self.seed = seed

    def __len__(self) -> int:
        return len(self.rows["target_map"])

    def __getitem__(self, index: int) -> dict:
        return {name: values[index] for name, values in self.rows.items()} | {
            "label": -1,
            "seed": self.seed + index,
            "index": index,
        }


class TargetMapDataModule(L.LightningDataModule):
    """One target map per sample: the dense model's prediction on a held-out real image, as the paper takes depth
    and segmentation maps from real ImageNet images ("it is hard to provide an arbitrary depth map").

    The targets are what the off-the-shelf model sees in a real digit (its per-pixel argmax, or its map), not the
    digit's labels: guidance asks for an image the model would read the same way. Batches:
    `{"target_map": (B, H, W), "target_class": (B,), "source_image": (B, C, H, W), "label": -1, "seed", "index"}`,
    sample i seeded with `seed + i`, like `ClassLabelDataModule`. `target_class` is the digit the target names:
    the majority stroke class of a segmentation map (label layout of `metrics.pixel_maps`), and for a regressor's
    map, which names none, the real digit's label; the evaluator's agreement with it is the samples' class score.

    Args:
        model_path (`str`, defaults to `"assets/digits/segmenter"`): the dense model (`DenseModel` directory, or
            `torchvision:` / `transformers:` hub id).
        labelled_data (`ImageDataModule`, *optional*): the real images (default: the digits).
        splits (`list[str]`, *optional*): the splits whose images give targets, in order (held out from the dense
            model's training: "val", "test").
        num_samples (`int`, *optional*): the first N of those images; None: all of them.
        batch_size (`int`, defaults to 80): samples per batch.
        seed (`int`, defaults to 0): seed of sample 0.
    """

    def __init__(
        self,
        model_path: str = "assets/digits/segmenter",
        labelled_data: ImageDataModule | None = None,
        splits: list[str] | None = None,
        num_samples: int | None = None,
        batch_size: int = 80,
        seed: int = 0,
    ) -> None:
        super().__init__()
        splits = list(splits or ["test"])
        unknown = [split for split in splits if split not in SPLITS]
        if not splits or unknown:
            raise ValueError(f"Expected `splits` to be a non-empty list of {SPLITS}, but got {splits}.")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"Expected `num_samples` to be >= 1 (or None for every image), but got {num_samples}.")
        if batch_size < 1:
            raise ValueError(f"Expected `batch_size` to be >= 1, but got {batch_size}.")
        self.save_hyperparameters(ignore=["labelled_data", "splits"], logger=False)
        self.splits = splits
        self.labelled_data = labelled_data or DigitsDataModule()
        self.model = load_dense_model(model_path, "model_path").eval().requires_grad_(False)
        self.dataset: _TargetMapsDataset | None = None

    @torch.no_grad()
    def target_rows(self) -> dict[str, torch.Tensor]:
        """The real images of `splits` (the first `num_samples`) with the model's maps of them and the digit each names."""
        splits = self.labelled_data.load_splits()
        images, labels = [], []
        for split in self.splits:
            rows = splits[split].with_format(None)
            images.append(self.labelled_data.to_tensor(rows["image"]))
            labels.append(torch.as_tensor(rows["label"], dtype=torch.int64))
        images, labels = torch.cat(images)[: self.hparams.num_samples], torch.cat(labels)[: self.hparams.num_samples]
        task = default_task(self.model)
        maps = torch.cat([task.prediction(self.model(batch)) for batch in images.split(self.hparams.batch_size)])
        target_class = majority_digit(maps) if self.model.num_classes else labels
        return {"target_map": maps, "target_class": target_class, "source_image": images}

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = _TargetMapsDataset(self.target_rows(), self.hparams.seed)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.predict_dataloader()
