"""PPAP guidance: the expert whose noise range holds t guides step t."""

from __future__ import annotations

import torch
from torch import nn

from plugguide.models import MultiExpertModel
from plugguide.pipelines.guidance.classifier import ClassifierGuidance, evaluating
from plugguide.pipelines.tasks import Task


class ExpertGuidance(ClassifierGuidance):
    """Practical Plug-And-Play guidance (Go et al., 2023): grad_x_t log softmax(f_{n(t)}(x_t))_y.

    n(t) is the expert whose timestep range holds t; only that expert runs, so a step costs what one
    classifier costs, and switching experts switches adapters, never the backbone. Experts of a segmenter or a depth
    regressor guide toward a target map the same way (the task's log-likelihood in place of the log-softmax).

    Args:
        experts (`nn.Module | str`): a `MultiExpertModel`, or the directory it was saved to.
        clip_gradient (`float | None`, *optional*): see `Guidance`.
        task (`Task | None`, *optional*): see `ClassifierGuidance` (None: the task of the experts' off-the-shelf model).
        merge_adapters (`bool | None`, *optional*): run each expert with its LoRA update merged into the frozen weights
            (`MultiExpertModel.merge_adapters`), so a guided step costs what the off-the-shelf model costs.
            None: merged for experts loaded from a directory (sampling), unmerged for a module handed in (it may be
            training).
        normalize_gradient (`bool`, defaults to `False`): the authors' DeepFloyd rule for dense experts: on the
            ancestral DDPM step, rescale the batch's gradient to ||step mean of the first sample|| / ||gradient||
            before the mean shift (`pipelines.guided_diffusion.batch_normalized_gradient`), so the scale is free of
            the loss's magnitude; the default uses the raw gradient, as the classification guidance of every paper here.
    """

    def __init__(
        self,
        experts: nn.Module | str,
        clip_gradient: float | None = None,
        task: Task | None = None,
        merge_adapters: bool | None = None,
        normalize_gradient: bool = False,
    ) -> None:
        path = experts if isinstance(experts, str) else None
        loaded = path is not None
        if loaded:
            experts = MultiExpertModel.from_pretrained(experts)
        if merge_adapters if merge_adapters is not None else loaded:
            experts.merge_adapters()
        super().__init__(experts, input="x_t", clip_gradient=clip_gradient, task=task)
        self.classifier_path = path or self.classifier_path
        self.normalize_gradient = normalize_gradient

    def logits(self, inputs: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        with evaluating(self.classifier):
            return self.classifier(inputs, timesteps)
