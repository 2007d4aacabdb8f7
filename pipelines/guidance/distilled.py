"""Guidance by a distilled guide: the score shift predicted in one forward pass, no classifier and no gradient."""

from __future__ import annotations

import warnings

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

    A `classifier_scale` outside the scales the guide was trained on (its saved `scale_range`) is refused, once per
    run before the first step, never extrapolated: s reaches the guide as an input map, and outside [low, high] its
    output is a network's answer to an input it never saw, not the teacher's shift (not even linear in s once
    halved), so a sweep would report numbers for a method that was never trained there. Train the guide on a range
    that holds the scale instead. A guide saved without a range is not checked (a warning says so).

    Args:
        guide (`ShiftGuide | str`): the guide, or the folder it was exported to (`<run>/guides/shift/steps-<n>`).
    """

    predicts_shift = True

    def __init__(self, guide: ShiftGuide | str) -> None:
        super().__init__(input="x0_hat")
        self.guide = load_shift_guide(guide, "guide").eval().requires_grad_(False) if isinstance(guide, str) else guide
        self.num_classes = self.guide.num_classes
        if self.guide.scale_range is None:
            warnings.warn(
                "The distilled guide's config records no trained `scale_range`; `classifier_scale` is not checked "
                "against it.",
                stacklevel=2,
            )

    def log_likelihood(self, inputs: torch.Tensor, timesteps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "A distilled guide has no likelihood to differentiate: it predicts the score shift itself (`predicted_shift`)."
        )

    @property
    def timesteps(self) -> list[int] | None:
        """A halved guide's DDIM grid (the pipelines sample it there with `GridDDIMScheduler`); None: any sampler."""
        return self.guide.timesteps

    def predicted_shift(
        self, x_t: torch.Tensor, step: GuidanceStep, x0_hat: torch.Tensor, targets: torch.Tensor, scale: float
    ) -> torch.Tensor:
        if self.timesteps is not None and step.timestep not in self.timesteps:
            raise ValueError(
                f"The distilled guide was halved on the DDIM timesteps {self.timesteps} and is asked for a shift at "
                f"timestep {step.timestep}: sample it with `GridDDIMScheduler` on its grid (`sampler_on_grid`)."
            )
        return self.guide(x_t, x0_hat, torch.tensor(step.timestep, device=x_t.device), targets, scale)

    def check_classifier_scale(self, scale: float, setting: str = "classifier_scale") -> None:
        if self.guide.scale_range is None:
            return
        low, high = self.guide.scale_range
        if not low <= scale <= high:
            raise ValueError(
                f"`{setting}`={scale} is outside the scales the distilled guide was trained on, [{low:g}, {high:g}] "
                "(its `scale_range`); sample within them, or distil a guide whose `scale_range` holds this scale."
            )

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


def describe_teacher(guidance: Guidance) -> dict:
    """What a guide is distilled from, for its saved config: the teacher's class path, where its classifier or experts
    came from (`classifier_path`; None for a module handed in), and the settings that shape its shift, read as its
    public numbers, strings and flags (input, temperatures, Softplus beta, schedule, clipping, its task's own)."""

    def scalars(obj) -> dict:
        return {
            name: value
            for name, value in vars(obj).items()
            if not name.startswith("_")
            and name != "training"
            and isinstance(value, (bool, int, float, str, type(None)))
        }

    settings = scalars(guidance)
    source = settings.pop("classifier_path", None)
    task = getattr(guidance, "task", None)
    if task is not None:
        settings["task"] = {"class": type(task).__name__, **scalars(task)}
    return {
        "class_path": f"{type(guidance).__module__}.{type(guidance).__qualname__}",
        "source": source,
        "settings": settings,
    }
