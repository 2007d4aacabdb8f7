"""Scores for generated images, all from an independent evaluator classifier (never the guiding model)."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore


class EvaluatorFeatures(nn.Module):
    """The evaluator's penultimate features, the feature space of FID here (`num_features` for torchmetrics)."""

    def __init__(self, evaluator: nn.Module) -> None:
        super().__init__()
        self.evaluator = evaluator
        self.num_features = evaluator.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.evaluator.features(images)


class GenerationMetrics(nn.Module):
    """Guided accuracy, FID and Inception-Score-style score of generated images, plus evaluator confidence.

    - `guided_accuracy`: evaluator top-1 agreement with the target class.
    - `fid`: Frechet distance between evaluator features of generated and real images.
    - `inception_score`: exp(E KL(p(y|x) || p(y))) with the evaluator's class probabilities.
    - `evaluator_confidence`: mean max-probability of the evaluator on generated images.

    Images are (B, C, H, W) in [-1, 1]. FID depends on the number of samples: compare rows of equal size.

    Args:
        evaluator: a classifier with `features()` and `num_features` (a `TimmClassifier`); frozen here.
        num_classes: number of classes.
    """

    def __init__(self, evaluator: nn.Module, num_classes: int) -> None:
        super().__init__()
        evaluator = evaluator.eval().requires_grad_(False)
        self.evaluator = evaluator
        self.accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.fid = FrechetInceptionDistance(feature=EvaluatorFeatures(evaluator), reset_real_features=False)
        self.inception = InceptionScore(feature=evaluator, splits=1)
        self.confidence = MeanMetric()

    def train(self, mode: bool = True) -> "GenerationMetrics":
        return super().train(False)  # the evaluator always runs in eval mode

    @torch.no_grad()
    def update_real(self, images: torch.Tensor) -> None:
        self.fid.update(images, real=True)

    @torch.no_grad()
    def update_generated(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        logits = self.evaluator(images)
        self.confidence.update(logits.softmax(-1).max(-1).values)
        self.fid.update(images, real=False)
        self.inception.update(images)
        if targets is not None and bool((targets >= 0).all()):
            self.accuracy.update(logits, targets)

    def compute(self) -> dict[str, float]:
        results = {"evaluator_confidence": float(self.confidence.compute()), "inception_score": float(self.inception.compute()[0])}
        if self.fid.real_features_num_samples > 1 and self.fid.fake_features_num_samples > 1:
            results["fid"] = float(self.fid.compute())
        if self.accuracy.update_count:
            results["guided_accuracy"] = float(self.accuracy.compute())
        return results

    def reset(self) -> None:
        for metric in (self.accuracy, self.fid, self.inception, self.confidence):
            metric.reset()
