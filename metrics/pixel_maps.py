"""Maps read directly off the pixels of a digit: its strokes, the distance to them, and its strokes labelled by class.

The same definitions make the dense models' training labels (datamodules) and score the samples guided by them
(`DenseMapMetrics`), so a sample is judged by what its pixels show, never by the model that guided it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

# Images are in [-1, 1]: a pixel brighter than mid-grey is stroke.
STROKE_THRESHOLD = 0.0
# The digits' segmentation labels: 0 is background, 1 + k the stroke of digit k.
BACKGROUND = 0
NUM_SEGMENTATION_CLASSES = 11


def stroke_mask(images: torch.Tensor, threshold: float = STROKE_THRESHOLD) -> torch.Tensor:
    """(B, H, W) booleans: the pixels (mean over channels) brighter than `threshold`."""
    return images.mean(1) > threshold


def distance_to_stroke(images: torch.Tensor, threshold: float = STROKE_THRESHOLD) -> torch.Tensor:
    """(B, H, W) Euclidean distance in pixels from each pixel to the nearest stroke pixel (0 on strokes).

    The digits' stand-in for depth: a smooth map of the image's geometry, not a copy of its pixels, that any sample
    can be given by thresholding (scipy's exact distance transform). An image without strokes is at the image's
    diagonal everywhere, farther than any pixel can be from a stroke.
    """
    masks = stroke_mask(images, threshold).cpu().numpy()
    diagonal = math.hypot(*masks.shape[1:])
    maps = [distance_transform_edt(~mask) if mask.any() else np.full(mask.shape, diagonal) for mask in masks]
    return torch.as_tensor(np.stack(maps), dtype=torch.float32, device=images.device)


def digit_segmentation(
    images: torch.Tensor, digits: torch.Tensor, threshold: float = STROKE_THRESHOLD
) -> torch.Tensor:
    """(B, H, W) label maps: 1 + digit on each image's strokes, `BACKGROUND` elsewhere."""
    return torch.where(stroke_mask(images, threshold), digits.to(images.device).view(-1, 1, 1) + 1, BACKGROUND).long()


def majority_digit(label_maps: torch.Tensor) -> torch.Tensor:
    """(B,) the digit whose stroke class covers most pixels of each label map; -1 for a map without strokes."""
    counts = torch.stack(
        [(label_maps == 1 + digit).flatten(1).sum(1) for digit in range(NUM_SEGMENTATION_CLASSES - 1)], dim=1
    )
    return torch.where(counts.sum(1) > 0, counts.argmax(1), -1)
