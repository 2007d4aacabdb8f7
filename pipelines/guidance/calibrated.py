"""Calibrated off-the-shelf classifier guidance (Ma et al., 2023, "Elucidating the design space of classifier-guided diffusion generation")."""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn

from plugguide.pipelines.guidance.base import GuidanceInput
from plugguide.pipelines.guidance.classifier import ClassifierGuidance, as_classifier
from plugguide.pipelines.tasks import Task

# ReLU-type activations that Softplus(beta) approximates (Softplus -> ReLU as beta -> inf).
RELU_TYPES = (nn.ReLU, nn.ReLU6)
SCHEDULES = ("ddpm", "edm")


def replace_relu_with_softplus(model: nn.Module, beta: float, threshold: float = 20.0) -> int:
    """Swaps every ReLU-type module of `model` (any timm model) for `nn.Softplus(beta)`, in place.

    Ma et al. (2023), section 4.3: a smooth classifier has better-calibrated gradients; beta = 3 is best.
    Functional `F.relu` calls inside a model's `forward` cannot be swapped; a warning says when no
    ReLU-type module was found (e.g. GELU transformers such as DeiT), so the user knows nothing changed.

    Args:
        model: the classifier to modify.
        beta: Softplus sharpness, > 0.
        threshold: Softplus reverts to the identity above `threshold / beta` (numerical stability).

    Returns:
        The number of modules replaced.
    """
    if not beta > 0 or math.isinf(beta):
        raise ValueError(f"Expected `softplus_beta` to be a positive finite number, but got {beta}.")
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RELU_TYPES):
                setattr(parent, name, nn.Softplus(beta=beta, threshold=threshold))
                replaced += 1
    if replaced == 0:
        warnings.warn(
            f"replace_relu_with_softplus found no ReLU-type module (nn.ReLU, nn.ReLU6) in {type(model).__name__}; "
            "the classifier is unchanged (`softplus_beta` has no effect on it).",
            stacklevel=2,
        )
    return replaced


class CalibratedGuidance(ClassifierGuidance):
    """Calibrated off-the-shelf classifier guidance of Ma et al. (2023), all four pre-conditioning steps.

    - input: the classifier sees `x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`, clipped and
      detached from the UNet (the pipeline forms it); the gradient w.r.t. x0_hat is the guidance gradient.
    - smoothness: every ReLU of the classifier becomes `Softplus(beta)` (`replace_relu_with_softplus`).
    - joint vs marginal temperature: the guided log-likelihood is
      `log( exp(tau1 * f_y(x)) / sum_i exp(tau2 * f_i(x)) )`, tau2 = tau1 * `marginal_discount`;
      with tau2 = tau1 = 1 it is the plain log-softmax.
    - schedule ("ddpm"): `mean += (Sigma_t + max(sin(pi t / T) * max_var * gamma, 0)) * s * grad`, max_var
      the largest step variance seen so far in this run, i.e. the scale is multiplied by
      `1 + max(sin(pi t / T) * gamma * max_var / Sigma_t, 0)`; on eps-based samplers the same factor
      multiplies the eps shift. ("edm"): the continuous form of the paper's EDM schedule,
      `g(t) = s * (max(t / T, 1e-5) + gamma * sin(pi t / T))`.

    Each option can be switched off (`softplus_beta=None`, `marginal_discount=1`, `sine_gamma=0`,
    `input="x_t"`), and all off is plain classifier guidance. Calibrated PPAP experts: pass an
    `ExpertGuidance` as `classifier`; its routing `logits(inputs, t)` is kept (composition) and the
    Softplus swap and temperatures are applied to a copy of its experts, on the input it uses (x_t).
    Dense guides (`task`): a segmenter takes the temperatures at every pixel; a dense regressor has no class scores,
    so it takes Softplus, x0_hat and the schedule, with both temperatures left at 1.

    Args:
        classifier: a classifier returning logits, the path of a saved `TimmClassifier`, or a
            `ClassifierGuidance` whose logits are wrapped. It is copied before the Softplus swap.
        input: `"x0_hat"` (default for classifiers) or `"x_t"`; None: `"x0_hat"`, or the wrapped guidance's input.
        softplus_beta: Softplus sharpness replacing ReLU (paper: 3.0); None or inf keeps ReLU.
        joint_temperature: tau1 (paper: 1.0).
        marginal_discount: tau2 / tau1 (paper: 0.5); 1.0 gives log-softmax.
        sine_gamma: gamma of the sine-augmented schedule (paper: 0.3); 0 switches it off.
        schedule: `"ddpm"` (variance form) or `"edm"`.
        clip_gradient: see `Guidance`.
        task: see `ClassifierGuidance`.
    """

    def __init__(
        self,
        classifier: nn.Module | str,
        input: GuidanceInput | None = None,
        softplus_beta: float | None = 3.0,
        joint_temperature: float = 1.0,
        marginal_discount: float = 0.5,
        sine_gamma: float = 0.3,
        schedule: str = "ddpm",
        clip_gradient: float | None = None,
        task: Task | None = None,
    ) -> None:
        if joint_temperature <= 0:
            raise ValueError(f"Expected `joint_temperature` to be > 0, but got {joint_temperature}.")
        if marginal_discount <= 0:
            raise ValueError(f"Expected `marginal_discount` to be > 0, but got {marginal_discount}.")
        if sine_gamma < 0:
            raise ValueError(f"Expected `sine_gamma` to be >= 0, but got {sine_gamma}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"Expected `schedule` to be one of {SCHEDULES}, but got {schedule!r}.")
        classifier = as_classifier(classifier)
        wrapped = isinstance(classifier, ClassifierGuidance)
        if input is None:
            input = classifier.input if wrapped else "x0_hat"
        if softplus_beta is not None and not math.isinf(softplus_beta):
            classifier = copy.deepcopy(classifier)  # never change the caller's (possibly still training) model
            replace_relu_with_softplus(classifier.classifier if wrapped else classifier, softplus_beta)
        super().__init__(classifier, input=input, clip_gradient=clip_gradient, task=task)
        if not self.task.scores_classes and (joint_temperature != 1 or marginal_discount != 1):
            raise ValueError(
                f"Temperatures act on class scores; a {type(self.task).__name__} has none, so `joint_temperature` and `marginal_discount` "
                f"must be 1, but got {joint_temperature} and {marginal_discount}."
            )
        self.softplus_beta = softplus_beta
        self.joint_temperature = joint_temperature
        self.marginal_temperature = joint_temperature * marginal_discount
        self.sine_gamma = sine_gamma
        self.schedule = schedule
        self._max_variance = 0.0
        self._last_timestep: int | None = None

    def logits(self, inputs: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The (Softplus-smoothed) classifier's logits times the joint temperature, what calibration measures."""
        if isinstance(self.classifier, ClassifierGuidance):
            logits = self.classifier.logits(inputs, timesteps)
        else:
            logits = self.classifier(inputs)
        return logits * self.joint_temperature

    def log_likelihood(self, inputs: torch.Tensor, timesteps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # tau1 * f_y - logsumexp(tau2 * f): the task takes tau1 * f and the ratio tau2 / tau1 (per pixel for a segmenter).
        return self.task.log_likelihood(self.logits(inputs, timesteps), targets, marginal_ratio=self.marginal_temperature / self.joint_temperature)

    def scale_multiplier(self, timestep: int, step_variance: float, num_train_timesteps: int) -> float:
        sine = math.sin(math.pi * timestep / num_train_timesteps)
        if self.schedule == "edm":
            return max(timestep / num_train_timesteps, 1e-5) + self.sine_gamma * sine
        # A timestep not below the previous one starts a new sampling run: forget its largest variance.
        if self._last_timestep is None or timestep >= self._last_timestep:
            self._max_variance = 0.0
        self._last_timestep = timestep
        self._max_variance = max(self._max_variance, step_variance)
        if self.sine_gamma == 0 or step_variance <= 0:
            return 1.0
        return 1.0 + max(sine * self._max_variance * self.sine_gamma, 0.0) / step_variance
