"""Naive off-the-shelf classifier guidance: a clean-image classifier applied to the noisy x_t."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plugguide.pipelines.guidance.base import Guidance, GuidanceInput


class NaiveClassifierGuidance(Guidance):
    """Classifier guidance of Dhariwal & Nichol (2021) with an off-the-shelf classifier: grad log softmax(f(x_t))_y.

    The PPAP paper's "naive" baseline: f never saw noise, so its gradients on x_t are mostly useless.

    Args:
        classifier: a classifier returning logits (or the path of a saved `TimmClassifier`), kept frozen.
        input: `"x_t"` (default, the naive baseline) or `"x0_hat"`.
        clip_gradient: see `Guidance`.
    """

    def __init__(self, classifier: nn.Module | str, input: GuidanceInput = "x_t", clip_gradient: float | None = None) -> None:
        super().__init__(input=input, clip_gradient=clip_gradient)
        if isinstance(classifier, str):
            from plugguide.modules.classifier import load_classifier  # lazy: modules imports pipelines

            classifier = load_classifier(classifier, "classifier")
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_classes = getattr(classifier, "num_classes", None)

    def log_likelihood(self, inputs: torch.Tensor, timesteps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.classifier(inputs), dim=-1).gather(1, targets[:, None])[:, 0]
