"""The shared shape of classifier-type guidance: a model's output on its input, scored against the target by a task."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from plugguide.models import load_off_the_shelf
from plugguide.pipelines.guidance.base import Guidance, GuidanceInput
from plugguide.pipelines.tasks import Task, default_task


def as_classifier(classifier: nn.Module | str, setting: str = "classifier") -> nn.Module:
    """An off-the-shelf model: the module itself, or, given a path, a saved `TimmClassifier` or `DenseModel` (or a hub
    model) loaded frozen and in eval mode."""
    if isinstance(classifier, str):
        classifier = load_off_the_shelf(classifier, setting).eval().requires_grad_(False)
    return classifier


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode for the block (BatchNorm reads its running statistics), every submodule's mode restored after.

    A guide may be a network that is still training (PPAP experts read by a grid mid-fit): it is run as a guide without
    being changed.
    """
    modes = [(child, child.training) for child in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for child, training in modes:
            child.training = training


class ClassifierGuidance(Guidance):
    """log p(y | input) = the task's log-likelihood of the target under `logits(input, t)`; subclasses choose input and logits.

    For a classifier (the default task) that is log softmax(logits)_y; a segmenter gives the per-pixel
    log-likelihood of a target label map and a dense regressor minus its loss to a target map (`pipelines.tasks`).

    Args:
        classifier (`nn.Module | str`): a module returning logits, per-pixel logits or maps, or the path of a saved
            `TimmClassifier` or `DenseModel`. A module handed in is used as it is, never changed: it runs in eval mode
            for each call (`evaluating`), and only the input's gradient is taken (its parameters may keep training).
        input (`GuidanceInput`, defaults to 'x_t'): `"x_t"` or `"x0_hat"`.
        clip_gradient (`float | None`, *optional*): see `Guidance`.
        task (`Task | None`, *optional*): what the model predicts and how a target is scored; None: the model's own (`default_task`: a
            classifier's, a segmenter's or a regressor's), or the wrapped guidance's.
    """

    def __init__(
        self,
        classifier: nn.Module | str,
        input: GuidanceInput = "x_t",
        clip_gradient: float | None = None,
        task: Task | None = None,
    ) -> None:
        super().__init__(input=input, clip_gradient=clip_gradient)
        # Where the model came from, for errors about it (a wrapped guidance passes its own on).
        path = classifier if isinstance(classifier, str) else getattr(classifier, "classifier_path", None)
        self.classifier_path = path
        classifier = as_classifier(classifier)
        self.classifier = classifier
        self.num_classes = getattr(classifier, "num_classes", None)
        if task is None:
            task = classifier.task if isinstance(classifier, ClassifierGuidance) else default_task(classifier)
        self.task = task

    @property
    def in_chans(self) -> int | None:
        """Input channels of the classifier, where it says (a wrapped guidance passes its own on)."""
        return getattr(self.classifier, "in_chans", None)

    def logits(self, inputs: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The guide's output on its input at `timesteps`: class logits (what calibration curves measure), per-pixel
        logits or maps."""
        with evaluating(self.classifier):
            return self.classifier(inputs)

    def log_likelihood(self, inputs: torch.Tensor, timesteps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.task.log_likelihood(self.logits(inputs, timesteps), targets)

    def check_targets(self, targets: torch.Tensor) -> None:
        self.task.check_targets(targets, self.num_classes)
