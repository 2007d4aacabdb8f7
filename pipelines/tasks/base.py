"""The task seam: what an off-the-shelf model predicts, and how far a prediction is from a teacher's or a target."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Task(ABC):
    """One kind of off-the-shelf model (classifier, segmenter, depth regressor), as PPAP's Eq. 6 leaves it open.

    PPAP distils every kind the same way, `L_KT = E_t L( sg(f(x0~)), f_n(x_t) )` with a task-specific loss L
    (Go et al., 2023, Sec. 4.2), and guides with the gradient of the log-likelihood of a target (or minus a task
    loss to it). A task is those few functions of tensors; expert distillation, guidance and the sampling job
    take one, so a new kind of model is one small file.

    Outputs are what the model returns on a batch: class logits (B, C), per-pixel logits (B, C, H, W), or a
    map (B, H, W). Targets and references are what `prediction` returns: class indices (B,), label maps
    (B, H, W) or maps (B, H, W).
    """

    #: Whether outputs are class scores, on which temperatures (calibrated guidance) act.
    scores_classes: bool = False
    #: The key under which labelled batches carry this task's real labels (validation, supervised distillation).
    label_key: str | None = None

    @abstractmethod
    def distillation_loss(self, teacher_outputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """L(sg(f(x0~)), f_n(x_t)): the scalar loss of a batch of expert outputs against the teacher's."""

    @abstractmethod
    def supervised_loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The scalar loss of a batch of outputs against real labels (pretraining, the paper's supervised rows)."""

    @abstractmethod
    def log_likelihood(
        self, outputs: torch.Tensor, targets: torch.Tensor, marginal_ratio: float = 1.0
    ) -> torch.Tensor:
        """Per-sample log p(target | input), shape (B,), whose gradient guides.

        `marginal_ratio` = tau2 / tau1 of calibrated guidance (Ma et al., 2023): tasks that score classes use it for
        the marginal term; 1 is the plain log-likelihood.
        """

    @abstractmethod
    def prediction(self, outputs: torch.Tensor) -> torch.Tensor:
        """What the model says: the class, the label map or the map itself; targets have this form."""

    @abstractmethod
    def agreement(self, outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """A scalar in [-1, 1] or [0, 1] saying how well outputs match a reference prediction (logged per expert)."""

    @abstractmethod
    def check_targets(self, targets: torch.Tensor, num_classes: int | None) -> None:
        """Fails, naming the problem, before sampling, on targets `log_likelihood` cannot take."""

    def check_target_shape(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Fails naming `targets` and the shape expected unless targets have the shape of `prediction(outputs)`.

        Only the guide's output says what size a map must have (a dense model may predict at another resolution than
        the image), so `log_likelihood` checks it on every call, before a map of another size is broadcast over the
        image (a (B, 1, W) or (B, 1, 1) map) or fails with a bare tensor-size error.
        """
        expected = tuple(self.prediction(outputs).shape)
        if tuple(targets.shape) != expected:
            raise ValueError(
                f"Expected `targets` of {type(self).__name__} guidance to have the shape of the guide's prediction on "
                f"these images, {expected} (one {'map' if len(expected) > 1 else 'class'} per sample), but got "
                f"{tuple(targets.shape)}."
            )
