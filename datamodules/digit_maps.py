"""The digits with dense labels, for training the off-the-shelf segmenter and depth stand-in on clean images."""

from __future__ import annotations

from plugguide.datamodules.digits import DigitsDataModule
from plugguide.metrics.pixel_maps import digit_segmentation, distance_to_stroke


class DigitMapsDataModule(DigitsDataModule):
    """`DigitsDataModule` (same images, same fixed split) whose batches also carry two maps derived from each digit:

    - `"segmentation"`: (B, H, W) int64, 11 classes per pixel: 0 background, 1 + k on the strokes of digit k (the
      strokes are the pixels above mid-grey, the label the digit's class);
    - `"depth"`: (B, H, W) float32, the distance in pixels to the nearest stroke, the digits' stand-in for a depth
      map (`metrics.pixel_maps.distance_to_stroke`: smooth, a function of the geometry rather than of single pixels,
      and computable from any generated image, so samples can be scored without the model that guided them).

    Args: as `DigitsDataModule`.
    """

    def _batch_transform(self, batch: dict) -> dict:
        rows = super()._batch_transform(batch)
        return rows | {
            "segmentation": digit_segmentation(rows["image"], rows["label"]),
            "depth": distance_to_stroke(rows["image"]),
        }
