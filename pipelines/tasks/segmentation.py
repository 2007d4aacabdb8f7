"""Semantic segmentation: a class per pixel (PPAP guiding GLIDE with DeepLabV3, Sec. 5.2)."""

from __future__ import annotations

import torch

from plugguide.pipelines.tasks.classification import ClassificationTask


class SegmentationTask(ClassificationTask):
    """Per-pixel classification: outputs (B, C, H, W) logits, targets (B, H, W) label maps.

    Distillation is the per-pixel KL to the teacher's tempered per-pixel softmax, summed over classes and averaged
    over pixels and samples (the paper's Eq. 7 at every pixel); guidance follows the gradient of the per-pixel
    log-likelihood of a target label map, averaged over pixels, i.e. log p(map | x) / (H W) for pixels
    independent given x, so that a guidance scale means the same at any resolution.

    Args:
        temperature: tau of the teacher's per-pixel softmax.
    """

    label_key = "segmentation"

    def check_targets(self, targets: torch.Tensor, num_classes: int | None) -> None:
        if targets.dim() != 3 or targets.is_floating_point():
            raise ValueError(
                f"Segmentation guidance takes one integer label map per sample, shape (B, H, W), but got "
                f"{'float ' if targets.is_floating_point() else ''}targets of shape {tuple(targets.shape)}."
            )
        if targets.numel() and (int(targets.min()) < 0 or (num_classes is not None and int(targets.max()) >= num_classes)):
            raise ValueError(
                f"The target maps hold classes {int(targets.min())}..{int(targets.max())}, but the segmenter knows classes 0..{num_classes - 1}."
            )
