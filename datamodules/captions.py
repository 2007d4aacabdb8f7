"""Image-caption pairs for text-to-image guide distillation (Stable Diffusion), through Hugging Face `datasets`."""

from __future__ import annotations

import datasets

from plugguide.datamodules.image_folder import ImageDataModule


class CaptionedImageDataModule(ImageDataModule):
    """Batches `{"image": float32 (B, 3, H, W) in [-1, 1], "caption": list[str]}` from a captioned image dataset.

    Args:
        source (`str`, defaults to `"lambdalabs/naruto-blip-captions"`): a hub dataset with an image and a text column
            (`lambdalabs/naruto-blip-captions`), or a directory written by `save_to_disk`. Hub names need network
            access.
        image_size (`int`, defaults to 512): side of the square images (512 for Stable Diffusion 1.5).
        caption_column (`str`, defaults to `"text"`): column holding the caption; a list of captions uses its first
            entry.
        image_column (`str`, defaults to `"image"`): column holding the image.
        val_fraction (`float`, defaults to 0.02): fraction held out as `val` when the source has no such split.
        test_fraction (`float`, defaults to 0.0): fraction held out as `test` when the source has no such split.
        split_seed (`int`, defaults to 0): seed of the permutation that carves the missing splits.
        batch_size (`int`, defaults to 4): images per batch.
        num_workers (`int`, defaults to 0): DataLoader workers.
    """

    def __init__(
        self,
        source: str = "lambdalabs/naruto-blip-captions",
        image_size: int = 512,
        caption_column: str = "text",
        image_column: str = "image",
        val_fraction: float = 0.02,
        test_fraction: float = 0.0,
        split_seed: int = 0,
        batch_size: int = 4,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            source=source,
            image_size=image_size,
            channels=3,
            image_column=image_column,
            label_column="label",
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            split_seed=split_seed,
            batch_size=batch_size,
            num_workers=num_workers,
        )
        self.caption_column = caption_column

    def load_source(self) -> datasets.DatasetDict:
        loaded = super().load_source()
        for split in loaded.values():
            if self.caption_column not in split.column_names:
                raise ValueError(
                    f"`caption_column`={self.caption_column!r} is not a column of `source`; columns: {split.column_names}."
                )
        return loaded

    def _batch_transform(self, batch: dict) -> dict:
        captions = [c[0] if isinstance(c, (list, tuple)) else c for c in batch[self.caption_column]]
        return {"image": self.to_tensor(batch["image"]), "caption": [str(c) for c in captions]}

    @property
    def num_classes(self) -> int:
        raise AttributeError("A caption dataset has no classes.")
