"""Naive off-the-shelf classifier guidance: a clean-image classifier applied to the noisy x_t."""

from __future__ import annotations

from torch import nn

from plugguide.pipelines.guidance.classifier import ClassifierGuidance


class NaiveClassifierGuidance(ClassifierGuidance):
    """Classifier guidance of Dhariwal & Nichol (2021) with an off-the-shelf classifier: grad_x_t log softmax(f(x_t))_y.

    The PPAP paper's "naive" baseline (Table 1): f never saw noise, so its gradients on x_t are mostly useless.

    Args:
        classifier: a classifier returning logits (or the path of a saved `TimmClassifier`), kept frozen.
        clip_gradient: see `Guidance`.
    """

    def __init__(self, classifier: nn.Module | str, clip_gradient: float | None = None) -> None:
        super().__init__(classifier, input="x_t", clip_gradient=clip_gradient)
