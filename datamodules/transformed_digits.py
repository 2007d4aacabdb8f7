"""Digits with a style shift, the data of the fine-tuned base that guides are plugged into without retraining."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from plugguide.datamodules.digits import DigitsDataModule


class ThickDigitsDataModule(DigitsDataModule):
    """The UCI digits of `DigitsDataModule` (same fixed split), with thicker strokes.

    Strokes are bright on a dark background in [-1, 1], so a grey-scale dilation (a stride-1 max-pool of
    side `stroke_kernel`, applied after resizing to `image_size`) thickens them by (k - 1) / 2 pixels each side.

    Args:
        stroke_kernel (`int`, defaults to 3): odd side of the dilation window (3 adds one pixel on each side at 16x16).
        image_size (`int`, defaults to 16): side of the upsampled square image.
        batch_size (`int`, defaults to 128): images per batch.
        split_seed (`int`, defaults to 0): seed of the fixed split permutation.
        num_workers (`int`, defaults to 0): DataLoader workers.
    """

    def __init__(
        self,
        stroke_kernel: int = 3,
        image_size: int = 16,
        batch_size: int = 128,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        if stroke_kernel < 1 or stroke_kernel % 2 == 0:
            raise ValueError(f"Expected `stroke_kernel` to be an odd number >= 1, but got {stroke_kernel}.")
        super().__init__(image_size=image_size, batch_size=batch_size, split_seed=split_seed, num_workers=num_workers)
        self.stroke_kernel = stroke_kernel

    def to_tensor(self, images: list) -> torch.Tensor:
        images = super().to_tensor(images)
        return F.max_pool2d(images, self.stroke_kernel, stride=1, padding=self.stroke_kernel // 2)
