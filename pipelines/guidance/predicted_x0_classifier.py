"""Off-the-shelf classifier guidance on the predicted clean image x0_hat."""

from __future__ import annotations

from torch import nn

from plugguide.pipelines.guidance.classifier import ClassifierGuidance
from plugguide.pipelines.tasks import Task


class PredictedCleanImageGuidance(ClassifierGuidance):
    """grad log softmax(f(x0_hat))_y, x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clipped, detached from the UNet.

    PPAP's "gradients on x0" row (Table 1): the classifier sees an image closer to its training data.
    The gradient with respect to x0_hat is applied as the guidance gradient (Ma et al., 2023). Its arguments are
    `NaiveClassifierGuidance`'s: the two differ only in the input the classifier reads.
    """

    def __init__(
        self, classifier: nn.Module | str, clip_gradient: float | None = None, task: Task | None = None
    ) -> None:
        super().__init__(classifier, input="x0_hat", clip_gradient=clip_gradient, task=task)
