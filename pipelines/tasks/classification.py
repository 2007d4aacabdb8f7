"""Image classification: the PPAP paper's own task (Eq. 7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from plugguide.pipelines.tasks.base import Task


class ClassificationTask(Task):
    """Class scores along dimension 1 of the outputs: `KL( softmax(f(x0~) / tau) || softmax(f_n(x_t)) )` (Eq. 7).

    The KL is summed over classes and averaged over the batch (`batchmean`); the guidance log-likelihood is the
    log-softmax at the target class, and with calibrated guidance's `marginal_ratio` r = tau2 / tau1 it is
    `f_y - logsumexp(r f)` (the logits already carry tau1). Any dimensions after the class dimension are pixels
    (`SegmentationTask`): the distillation loss is then averaged over them, the log-likelihood summed.

    Args:
        temperature (`float`, defaults to 0.25): tau of the teacher's softmax (PPAP: 0.25, on the teacher only).
    """

    scores_classes = True
    label_key = "label"

    def __init__(self, temperature: float = 0.25) -> None:
        if not temperature > 0:
            raise ValueError(f"Expected `temperature` to be > 0, but got {temperature}.")
        self.temperature = temperature

    def distillation_loss(self, teacher_outputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        target = F.softmax(teacher_outputs / self.temperature, dim=1)
        # Summed over classes, averaged over every sample (and pixel): `batchmean` when there are no pixels.
        positions = outputs.numel() // outputs.shape[1]
        return F.kl_div(F.log_softmax(outputs, dim=1), target, reduction="sum") / positions

    def supervised_loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, labels)

    def log_likelihood(
        self, outputs: torch.Tensor, targets: torch.Tensor, marginal_ratio: float = 1.0
    ) -> torch.Tensor:
        self.check_target_shape(outputs, targets)
        index = targets.unsqueeze(1)
        if marginal_ratio == 1.0:
            per_position = F.log_softmax(outputs, dim=1).gather(1, index).squeeze(1)
        else:
            per_position = outputs.gather(1, index).squeeze(1) - torch.logsumexp(outputs * marginal_ratio, dim=1)
        return per_position.flatten(1).sum(1) if per_position.dim() > 1 else per_position

    def prediction(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.argmax(1)

    def agreement(self, outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """The fraction of samples (or pixels) whose predicted class is the reference's."""
        return (self.prediction(outputs) == reference).float().mean()

    def check_targets(self, targets: torch.Tensor, num_classes: int | None) -> None:
        if targets.dim() != 1:
            raise ValueError(
                f"Classifier guidance takes one target class per sample, (B,), in `class_labels`, but got `targets` of shape {tuple(targets.shape)}."
            )
        if bool((targets < 0).any()):
            raise ValueError(
                "Classifier guidance needs a target class for every sample; `class_labels` has -1 entries."
            )
        if num_classes is not None and targets.numel() and int(targets.max()) >= num_classes:
            raise ValueError(
                f"`class_labels` has class {int(targets.max())}, but the guidance classifier has only {num_classes} classes."
            )
