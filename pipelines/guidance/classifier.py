"""The shared shape of classifier-type guidance: a model's output on its input, scored against the target by a task."""

from __future__ import annotations

import torch
from torch import nn

from plugguide.models import load_off_the_shelf
from plugguide.pipelines.guidance.base import Guidance, GuidanceInput
from plugguide.pipelines.tasks import Task, default_task


def as_classifier(classifier: nn.Module | str, setting: str = "classifier") -> nn.Module:
    """An off-the-shelf model, loading a saved `TimmClassifier` or `DenseModel` (or a hub model) when given its path."""
    if isinstance(classifier, str):
        classifier = load_off_the_shelf(classifier, setting)
    return classifier


class ClassifierGuidance(Guidance):
    """log p(y | input) = the task's log-likelihood of the target under `logits(input, t)`; subclasses choose input and logits.

    For a classifier (the default task) that is log softmax(logits)_y; a segmenter gives the per-pixel
    log-likelihood of a target label map and a dense regressor minus its loss to a target map (`pipelines.tasks`).

    Args:
        classifier: a module returning logits, per-pixel logits or maps (or the path of a saved `TimmClassifier` or
            `DenseModel`), kept frozen.
        input: `"x_t"` or `"x0_hat"`.
        clip_gradient: see `Guidance`.
        task: what the model predicts and how a target is scored; None: the model's own (`default_task`: a
            classifier's, a segmenter's or a regressor's), or the wrapped guidance's.
    """

    def __init__(self, classifier: nn.Module | str, input: GuidanceInput = "x_t", clip_gradient: float | None = None, task: Task | None = None) -> None:
        super().__init__(input=input, clip_gradient=clip_gradient)
        # Where the model came from, for errors about it (a wrapped guidance passes its own on).
        path = classifier if isinstance(classifier, str) else getattr(classifier, "classifier_path", None)
        self.classifier_path = path
        classifier = as_classifier(classifier)
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_classes = getattr(classifier, "num_classes", None)
        if task is None:
            task = classifier.task if isinstance(classifier, ClassifierGuidance) else default_task(classifier)
        self.task = task

    @property
    def in_chans(self) -> int | None:
        """Input channels of the classifier, where it says (a wrapped guidance passes its own on)."""
        return getattr(self.classifier, "in_chans", None)

    def train(self, mode: bool = True) -> "ClassifierGuidance":
        return super().train(False)  # a guide always runs in eval mode (BatchNorm running statistics)

    def logits(self, inputs: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The guide's output on its input at `timesteps`: class logits (what calibration curves measure), per-pixel
        logits or maps."""
        return self.classifier(inputs)

    def log_likelihood(self, inputs: torch.Tensor, timesteps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.task.log_likelihood(self.logits(inputs, timesteps), targets)

    def check_targets(self, targets: torch.Tensor) -> None:
        self.task.check_targets(targets, self.num_classes)
