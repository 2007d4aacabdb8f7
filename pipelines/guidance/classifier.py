"""The shared shape of classifier-type guidance: logits of a classifier, log-softmax at the target."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plugguide.models import load_classifier
from plugguide.pipelines.guidance.base import Guidance, GuidanceInput


def as_classifier(classifier: nn.Module | str, setting: str = "classifier") -> nn.Module:
    """A classifier module, loading a saved `TimmClassifier` when given its path."""
    if isinstance(classifier, str):
        classifier = load_classifier(classifier, setting)
    return classifier


class ClassifierGuidance(Guidance):
    """log p(y | input) = log softmax(logits(input, t))_y for a classifier; subclasses choose input and logits.

    Args:
        classifier: a module returning logits (or the path of a saved `TimmClassifier`), kept frozen.
        input: `"x_t"` or `"x0_hat"`.
        clip_gradient: see `Guidance`.
    """

    def __init__(self, classifier: nn.Module | str, input: GuidanceInput = "x_t", clip_gradient: float | None = None) -> None:
        super().__init__(input=input, clip_gradient=clip_gradient)
        classifier = as_classifier(classifier)
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_classes = getattr(classifier, "num_classes", None)

    @property
    def in_chans(self) -> int | None:
        """Input channels of the classifier, where it says (a wrapped guidance passes its own on)."""
        return getattr(self.classifier, "in_chans", None)

    def train(self, mode: bool = True) -> "ClassifierGuidance":
        return super().train(False)  # a guide always runs in eval mode (BatchNorm running statistics)

    def logits(self, inputs: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Class logits of the guide on its input at `timesteps` (what calibration curves measure)."""
        return self.classifier(inputs)

    def log_likelihood(self, inputs: torch.Tensor, timesteps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.logits(inputs, timesteps), dim=-1).gather(1, targets[:, None])[:, 0]
