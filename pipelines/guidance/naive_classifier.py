"""Naive off-the-shelf classifier guidance: a clean-image classifier applied to the noisy x_t."""

from __future__ import annotations

from torch import nn

from plugguide.pipelines.guidance.classifier import ClassifierGuidance
from plugguide.pipelines.tasks import Task


class NaiveClassifierGuidance(ClassifierGuidance):
    """Classifier guidance of Dhariwal & Nichol (2021) with an off-the-shelf classifier: grad_x_t log softmax(f(x_t))_y.

    The PPAP paper's "naive" baseline (Table 1, Figs. 10-11 for depth and segmentation): f never saw noise, so its
    gradients on x_t are mostly useless.

    Args:
        classifier (`nn.Module | str`): an off-the-shelf model, or the path of a saved `TimmClassifier` or `DenseModel`
            (a module is used as handed, see `ClassifierGuidance`).
        clip_gradient (`float`, *optional*): see `Guidance`.
        task (`Task`, *optional*): see `ClassifierGuidance`.
    """

    def __init__(
        self, classifier: nn.Module | str, clip_gradient: float | None = None, task: Task | None = None
    ) -> None:
        super().__init__(classifier, input="x_t", clip_gradient=clip_gradient, task=task)
