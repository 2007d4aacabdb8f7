"""scikit-learn's bundled handwritten digits: the project's embedded, offline dataset."""

from __future__ import annotations

import datasets
import numpy as np
from sklearn.datasets import load_digits

from plugguide.datamodules.image_folder import ImageDataModule


class DigitsDataModule(ImageDataModule):
    """The 1,797 8x8 UCI digits, upsampled to `image_size` and scaled to [-1, 1].

    Split: a permutation with seed `split_seed` (default 0) holds out 10% as `val` (180 images) and
    20% as `test` (359 images); the remaining 1,258 are `train`. The split never changes between runs,
    so the shipped models' test accuracy is measured on the same images everywhere.

    Args:
        image_size (`int`, defaults to 16): side of the upsampled square image (16 for every embedded model).
        batch_size (`int`, defaults to 128): images per batch.
        split_seed (`int`, defaults to 0): seed of the fixed split permutation.
        num_workers (`int`, defaults to 0): DataLoader workers.
    """

    def __init__(self, image_size: int = 16, batch_size: int = 128, split_seed: int = 0, num_workers: int = 0) -> None:
        super().__init__(
            source="sklearn:digits",
            image_size=image_size,
            channels=1,
            val_fraction=0.1,
            test_fraction=0.2,
            split_seed=split_seed,
            batch_size=batch_size,
            num_workers=num_workers,
        )

    def load_source(self) -> datasets.DatasetDict:
        digits = load_digits()
        # Raw intensities are 0..16; keep them as (1, 8, 8) arrays in [-1, 1] and let `to_tensor` resize.
        images = (digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]
        features = datasets.Features(
            image=datasets.Array3D(shape=(1, 8, 8), dtype="float32"), label=datasets.ClassLabel(num_classes=10)
        )
        return datasets.DatasetDict(
            train=datasets.Dataset.from_dict({"image": images, "label": digits.target}, features=features)
        )
