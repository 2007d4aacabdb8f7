"""Any image-classification dataset, through Hugging Face `datasets`."""

from __future__ import annotations

import os

import datasets
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from plugguide.datamodules.resumable_loader import ResumableDataLoader

SPLITS = ("train", "val", "test")


class IndexedRows(Dataset):
    """The rows of a split, each with its position in the split as `index`.

    Evaluation derives a sample's noise seed from it and counts each index once: Lightning's DistributedSampler
    pads the last batch with repeated rows, so scores and seeds would otherwise depend on the number of processes.
    A wrapper rather than a column, so that no split is rewritten on disk (`add_column` copies a carved split).
    """

    def __init__(self, split: datasets.Dataset) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        return [row | {"index": index} for row, index in zip(self.split.__getitems__(indices), indices)]

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]


class ImageDataModule(L.LightningDataModule):
    """Labelled images as `{"image": float32 (B, C, H, W) in [-1, 1], "label": int64 (B,)}` batches.

    Evaluation batches (`val`, `test`) also carry `"index"`, each image's position in its split (`IndexedRows`).

    Args:
        source (`str`, defaults to `""`): a hub dataset name (`uoft-cs/cifar10`), a directory written by
            `save_to_disk`, or an image folder (one sub-folder per class). Hub names need network access.
        image_size (`int`, defaults to 32): side of the square images the models see; images are resized to it.
        channels (`int`, defaults to 3): 1 (grayscale) or 3 (RGB); images are converted to it.
        image_column (`str`, defaults to `"image"`): column holding the image.
        label_column (`str`, defaults to `"label"`): column holding the integer class.
        split_names (`dict[str, str]`, *optional*): the source's names for this module's `train`, `val` and `test`
            splits. A split missing from the source is carved out of `train` (`val_fraction`, `test_fraction`).
        val_fraction (`float`, defaults to 0.1): fraction of `train` held out as `val` when the source has no such
            split.
        test_fraction (`float`, defaults to 0.2): fraction of `train` held out as `test` when the source has no such
            split.
        split_seed (`int`, defaults to 0): seed of the permutation that carves the missing splits; fixed, so splits are
            stable.
        batch_size (`int`, defaults to 128): images per batch.
        num_workers (`int`, defaults to 0): DataLoader workers.
    """

    def __init__(
        self,
        source: str = "",
        image_size: int = 32,
        channels: int = 3,
        image_column: str = "image",
        label_column: str = "label",
        split_names: dict[str, str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"Expected `channels` to be 1 or 3, but got {channels}.")
        if image_size < 4:
            raise ValueError(f"Expected `image_size` to be at least 4, but got {image_size}.")
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= fraction < 1.0:
                raise ValueError(f"Expected `{name}` to be in [0, 1), but got {fraction}.")
        # Saved explicitly: subclasses (DigitsDataModule) fix some of these arguments themselves.
        self.save_hyperparameters(
            dict(
                source=source,
                image_size=image_size,
                channels=channels,
                image_column=image_column,
                label_column=label_column,
                split_names=split_names,
                val_fraction=val_fraction,
                test_fraction=test_fraction,
                split_seed=split_seed,
                batch_size=batch_size,
                num_workers=num_workers,
            )
        )
        self.splits: datasets.DatasetDict | None = None

    @property
    def num_classes(self) -> int:
        train = self.load_splits()["train"]
        feature = train.features["label"]
        if isinstance(feature, datasets.ClassLabel):
            return feature.num_classes
        return len(np.unique(train.with_format(None)["label"]))

    def load_source(self) -> datasets.DatasetDict:
        """Reads the raw dataset; subclasses that build their data in memory override this."""
        source = self.hparams.source
        if not source:
            raise ValueError(
                "Expected `source` to name a hub dataset, a `save_to_disk` directory or an image folder, but got ''."
            )
        if os.path.isdir(source):
            if os.path.exists(os.path.join(source, "dataset_dict.json")) or os.path.exists(
                os.path.join(source, "dataset_info.json")
            ):
                loaded = datasets.load_from_disk(source)
            else:
                loaded = datasets.load_dataset("imagefolder", data_dir=source)
        else:
            try:
                loaded = datasets.load_dataset(source)
            except Exception as error:  # noqa: BLE001 - re-raised with the setting named
                raise ValueError(
                    f"`source`={source!r} is neither a local directory nor a loadable hub dataset ({error})."
                ) from error
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict(train=loaded)
        return loaded

    def load_splits(self) -> datasets.DatasetDict:
        """The three splits, with missing ones carved out of `train` by a fixed permutation."""
        if self.splits is not None:
            return self.splits
        raw = self.load_source()
        names = {split: split for split in SPLITS} | (self.hparams.split_names or {})
        if names["train"] not in raw:
            raise ValueError(
                f"The dataset has splits {list(raw)}; `split_names['train']`={names['train']!r} is not one of them."
            )
        train = raw[names["train"]]
        missing = [split for split in ("val", "test") if names[split] not in raw]
        order = np.random.default_rng(self.hparams.split_seed).permutation(len(train))
        carved, start = {}, 0
        for split in missing:
            count = int(round(len(train) * self.hparams[f"{split}_fraction"]))
            carved[split] = train.select(sorted(order[start : start + count]))
            start += count
        splits = {"train": train.select(sorted(order[start:])) if missing else train}
        for split in ("val", "test"):
            splits[split] = carved[split] if split in carved else raw[names[split]]
        columns = {self.hparams.image_column: "image", self.hparams.label_column: "label"}
        self.splits = datasets.DatasetDict(
            {split: ds.rename_columns({k: v for k, v in columns.items() if k != v}) for split, ds in splits.items()}
        )
        return self.splits

    def split_images(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One split's images as one (N, C, H, W) tensor in [-1, 1] and their labels, e.g. a metrics reference set.

        Args:
            split (`str`): "train", "val" or "test".
        """
        if split not in SPLITS:
            raise ValueError(f"Expected `split` to be one of {list(SPLITS)}, but got {split!r}.")
        rows = self.load_splits()[split].with_format(None)
        return self.to_tensor(rows["image"]), torch.as_tensor(rows["label"], dtype=torch.int64)

    def to_tensor(self, images: list) -> torch.Tensor:
        """PIL images or arrays to float32 (B, C, H, W) in [-1, 1] at `image_size`."""
        size, channels = self.hparams.image_size, self.hparams.channels
        tensors = []
        for image in images:
            if hasattr(image, "convert"):
                image = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 127.5 - 1.0
                image = torch.from_numpy(image).reshape(image.shape[0], image.shape[1], -1).permute(2, 0, 1)
            else:
                image = torch.as_tensor(np.asarray(image), dtype=torch.float32)
            tensors.append(
                F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
            )
        return torch.stack(tensors)

    def _batch_transform(self, batch: dict) -> dict:
        return {"image": self.to_tensor(batch["image"]), "label": torch.as_tensor(batch["label"], dtype=torch.int64)}

    def setup(self, stage: str | None = None) -> None:
        # `datasets` fingerprints the transform by pickling it, bound instance included; detached, the
        # instance does not drag the trainer and its model along (seconds per setup, on every rank).
        trainer, self.trainer = self.trainer, None
        try:
            for split in self.load_splits().values():
                split.set_transform(self._batch_transform)
        finally:
            self.trainer = trainer

    def dataloader(self, split: str, shuffle: bool = False) -> DataLoader:
        if shuffle:
            # Seeded per-epoch permutation, sharded per rank, resumable mid-epoch (datamodules/resumable_loader.py).
            dataset = self.load_splits()[split]
            return ResumableDataLoader(
                dataset,
                batch_size=self.hparams.batch_size,
                num_workers=self.hparams.num_workers,
                drop_last=len(dataset) > self.hparams.batch_size,
            )
        return DataLoader(
            IndexedRows(self.load_splits()[split]),
            batch_size=self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")
