"""Off-the-shelf classifier guidance on the predicted clean image x0_hat."""

from __future__ import annotations

from torch import nn

from plugguide.pipelines.guidance.naive_classifier import NaiveClassifierGuidance


class PredictedCleanImageGuidance(NaiveClassifierGuidance):
    """grad log softmax(f(x0_hat))_y with x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clipped, detached.

    PPAP's "gradients on x0" row (Table 1): the classifier sees an image closer to its training data.

    Args:
        classifier: a classifier returning logits (or the path of a saved `TimmClassifier`), kept frozen.
        clip_gradient: see `Guidance`.
    """

    def __init__(self, classifier: nn.Module | str, clip_gradient: float | None = None) -> None:
        super().__init__(classifier, input="x0_hat", clip_gradient=clip_gradient)
