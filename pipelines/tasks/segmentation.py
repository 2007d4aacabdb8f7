"""Semantic segmentation: a class per pixel (PPAP guiding GLIDE with DeepLabV3, Sec. 5.2)."""

from __future__ import annotations

import torch

from plugguide.pipelines.tasks.classification import ClassificationTask


class SegmentationTask(ClassificationTask):
    """Per-pixel classification: outputs (B, C, H, W) logits, targets (B, H, W) label maps.

    Distillation is the per-pixel KL to the teacher's tempered per-pixel softmax, summed over classes and averaged
    over pixels and samples (the paper's Eq. 7 at every pixel); guidance follows the gradient of the log-likelihood
    of a target label map, the sum of the per-pixel log-likelihoods (log p(map | x) for pixels independent given x):
    each pixel's term pulls mostly on its own neighbourhood, so a guidance scale means about the same at any
    resolution (a mean over pixels would weaken every pixel's pull by H W).

    Args:
        temperature: tau of the teacher's per-pixel softmax.
    """

    label_key = "segmentation"

    def check_targets(self, targets: torch.Tensor, num_classes: int | None) -> None:
        if targets.dim() != 3 or targets.is_floating_point():
            raise ValueError(
                f"Expected `targets` of segmentation guidance to be one integer label map per sample, (B, H, W) (TargetMapDataModule "
                f"gives them to the sampling job), but got {targets.dtype} targets of shape {tuple(targets.shape)}."
            )
        if targets.numel() and (
            int(targets.min()) < 0 or (num_classes is not None and int(targets.max()) >= num_classes)
        ):
            raise ValueError(
                f"`targets` hold classes {int(targets.min())}..{int(targets.max())}, but the segmenter knows classes 0..{num_classes - 1}."
            )
