"""Guidance by a distilled guide: the score shift predicted in one forward pass, no classifier and no gradient."""

from __future__ import annotations

import torch

from plugguide.models.shift_guide import ShiftGuide, load_shift_guide
from plugguide.pipelines.guidance.base import Guidance, GuidanceStep


class DistilledGuidance(Guidance):
    """Classifier guidance as a `ShiftGuide` learned it (`GuidanceDistillation`): `eps' = eps + G(x_t, x0_hat, s; t, y)`.

    The guide was trained to give the shift `-s sigma_t grad log p(y | x_t)` of a teacher guidance (PPAP experts,
    calibrated off-the-shelf guidance) from the step's own x_t and x0_hat, so a guided step costs one denoiser pass
    and one small forward pass, with no classifier loaded. The pipeline applies the shift to eps on every sampler
    (`ModelFamily.shift_output`), the ancestral DDPM step included: the guide learned the score shift, not
    Dhariwal & Nichol's variance-scaled mean shift. A guide halved to N steps (`GuidanceHalving`) is meant for DDIM
    with those N steps.

    Args:
        guide (`ShiftGuide | str`): the guide, or the folder it was exported to (`<run>/guides/shift/steps-<n>`).
    """

    predicts_shift = True

    def __init__(self, guide: ShiftGuide | str) -> None:
        super().__init__(input="x0_hat")
        self.guide = load_shift_guide(guide, "guide").eval().requires_grad_(False) if isinstance(guide, str) else guide
        self.num_classes = self.guide.num_classes

    def log_likelihood(self, inputs: torch.Tensor, timesteps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "A distilled guide has no likelihood to differentiate: it predicts the score shift itself (`predicted_shift`)."
        )

    def predicted_shift(
        self, x_t: torch.Tensor, step: GuidanceStep, x0_hat: torch.Tensor, targets: torch.Tensor, scale: float
    ) -> torch.Tensor:
        return self.guide(x_t, x0_hat, torch.tensor(step.timestep, device=x_t.device), targets, scale)

    def check_targets(self, targets: torch.Tensor) -> None:
        if targets.dim() != 1 or targets.is_floating_point():
            raise ValueError(
                f"A distilled guide takes one target class per sample, but got targets of shape {tuple(targets.shape)}."
            )
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.num_classes):
            raise ValueError(
                f"`class_labels` hold classes {int(targets.min())}..{int(targets.max())}, but the distilled guide "
                f"knows classes 0..{self.num_classes - 1}."
            )
