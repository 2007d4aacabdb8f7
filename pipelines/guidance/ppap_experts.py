"""PPAP guidance: the expert whose noise range holds t guides step t."""

from __future__ import annotations

import torch
from torch import nn

from plugguide.models import MultiExpertClassifier
from plugguide.pipelines.guidance.classifier import ClassifierGuidance


class ExpertGuidance(ClassifierGuidance):
    """Practical Plug-And-Play guidance (Go et al., 2023): grad_x_t log softmax(f_{n(t)}(x_t))_y.

    n(t) is the expert whose timestep range holds t; only that expert runs, so a step costs what one
    classifier costs, and switching experts switches adapters, never the backbone.

    Args:
        experts: a `MultiExpertClassifier`, or the directory it was saved to.
        clip_gradient: see `Guidance`.
    """

    def __init__(self, experts: nn.Module | str, clip_gradient: float | None = None) -> None:
        if isinstance(experts, str):
            experts = MultiExpertClassifier.from_pretrained(experts)
        super().__init__(experts, input="x_t", clip_gradient=clip_gradient)

    def logits(self, inputs: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.classifier(inputs, timesteps)
