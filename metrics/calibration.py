"""Expected calibration error of a classifier, the measure of a good guide (Ma et al., 2023)."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)| over `n_bins` equal-width confidence bins."""
    return float(multiclass_calibration_error(logits.softmax(-1), labels, num_classes=logits.shape[-1], n_bins=n_bins, norm="l1"))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(multiclass_accuracy(logits, labels, num_classes=logits.shape[-1], average="micro"))
