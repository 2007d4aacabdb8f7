"""Calibrated off-the-shelf classifier guidance (Ma et al., 2023, "Elucidating the design space of classifier-guided diffusion generation")."""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn

from plugguide.pipelines.guidance.base import GuidanceInput, GuidanceStep
from plugguide.pipelines.guidance.classifier import ClassifierGuidance, as_classifier, evaluating
from plugguide.pipelines.tasks import Task

# ReLU-type activations that Softplus(beta) approximates (Softplus -> ReLU as beta -> inf).
RELU_TYPES = (nn.ReLU, nn.ReLU6)
SCHEDULES = ("ddpm", "edm_continuous")


def replace_relu_with_softplus(model: nn.Module, beta: float, threshold: float = 20.0) -> int:
    """Swaps every ReLU-type module of `model` (any timm model) for `nn.Softplus(beta)`, in place.

    Ma et al. (2023), section 4.3: a smooth classifier has better-calibrated gradients; beta = 3 is best.
    Functional `F.relu` calls inside a model's `forward` cannot be swapped; a warning says when no
    ReLU-type module was found (e.g. GELU transformers such as DeiT), so the user knows nothing changed.

    Args:
        model (`nn.Module`): the classifier to modify.
        beta (`float`): Softplus sharpness, > 0.
        threshold (`float`, defaults to 20.0): Softplus reverts to the identity above `threshold / beta` (numerical stability).

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
    - schedule ("ddpm"): `mean += s (Sigma_t + max(sin(pi k / n) * max_var * gamma, 0)) grad`, as the authors' DDPM
      sampler writes it (AlexMaOLS/EluCD `DDPM/guided_diffusion/gaussian_diffusion.py`, `p_sample`): k = n - 1 - i is
      the respaced step counting down from n - 1 at step i of n (not t / T of the train timestep, which differs by up
      to 0.31 at n = 300), max_var the largest Sigma_t so far in the run, and the sine term one uniform value added to
      Sigma_t (`variance_offset`), also where the UNet learns a per-pixel Sigma_t. Deliberate differences: the authors
      read Sigma_t and max_var off one pixel of the first sample, here their mean over pixels and samples (the same for
      fixed variances). As in the authors' DDIM sampler, score-shift samplers (DDIM, DPM-Solver++, Euler, Heun, flow)
      take no sine term: carried over as the same offset relative to the step's Sigma_t, it multiplied the last
      steps' guidance many times over and left salt-and-pepper samples (measured in docs/results/samplers.md).
    - schedule ("edm_continuous"): EluCD's EDM schedule as a function of t, `g(t) = s (max(t / T, 1e-5) + gamma sin(pi t / T))`,
      on the usual score shift and classifier input; it ends at 0 and lags the authors' step grid by one step, and is
      kept because it guides the digits better than their Algorithm 2 at equal FID on Heun/EDM-18
      (docs/results/samplers.md). Algorithm 2 as the authors wrote it is `CalibratedEDMGuidance` (calibrated_edm.py).

    Each option can be switched off (`softplus_beta=None`, `marginal_discount=1`, `sine_gamma=0`,
    `input="x_t"`), and all off is plain classifier guidance. Calibrated PPAP experts: pass an
    `ExpertGuidance` as `classifier`; its routing `logits(inputs, t)` is kept (composition) and the
    Softplus swap and temperatures are applied to a copy of its experts, on the input it uses (x_t).
    Dense guides (`task`): a segmenter takes the temperatures at every pixel; a dense regressor has no class scores,
    so it takes Softplus, x0_hat and the schedule, with both temperatures left at 1.

    Args:
        classifier (`nn.Module | str`): a classifier returning logits, the path of a saved `TimmClassifier`, or a
            `ClassifierGuidance` whose logits are wrapped. It is copied before the Softplus swap.
        input (`str`, *optional*): `"x0_hat"` or `"x_t"`; None: `"x0_hat"`, or the wrapped guidance's input.
        softplus_beta (`float`, defaults to 3.0): Softplus sharpness replacing ReLU (the paper's); None or inf keeps ReLU.
        joint_temperature (`float`, defaults to 1.0): tau1.
        marginal_discount (`float`, defaults to 0.5): tau2 / tau1; 1.0 gives log-softmax, 0 the joint term alone.
        sine_gamma (`float`, defaults to 0.3): gamma of the sine-augmented schedule; 0 switches it off.
        schedule (`str`, defaults to "ddpm"): `"ddpm"` (the variance form) or `"edm_continuous"`.
        clip_gradient (`float`, *optional*): see `Guidance`.
        task (`Task`, *optional*): see `ClassifierGuidance`.
    """

    def __init__(
        self,
        classifier: nn.Module | str,
        *,
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
        if marginal_discount < 0:
            raise ValueError(f"Expected `marginal_discount` to be >= 0, but got {marginal_discount}.")
        if sine_gamma < 0:
            raise ValueError(f"Expected `sine_gamma` to be >= 0, but got {sine_gamma}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"Expected `schedule` to be one of {SCHEDULES}, but got {schedule!r}.")
        path = classifier if isinstance(classifier, str) else None
        classifier = as_classifier(classifier)
        wrapped = isinstance(classifier, ClassifierGuidance)
        if input is None:
            input = classifier.input if wrapped else "x0_hat"
        if softplus_beta is not None and not math.isinf(softplus_beta):
            classifier = copy.deepcopy(classifier)  # never change the caller's (possibly still training) model
            replace_relu_with_softplus(classifier.classifier if wrapped else classifier, softplus_beta)
        super().__init__(classifier, input=input, clip_gradient=clip_gradient, task=task)
        self.classifier_path = path or self.classifier_path
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

    def logits(self, inputs: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The (Softplus-smoothed) classifier's logits times the joint temperature, what calibration measures."""
        if isinstance(self.classifier, ClassifierGuidance):
            logits = self.classifier.logits(inputs, timesteps)
        else:
            with evaluating(self.classifier):
                logits = self.classifier(inputs)
        return logits * self.joint_temperature

    def log_likelihood(self, inputs: torch.Tensor, timesteps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # tau1 * f_y - logsumexp(tau2 * f): the task takes tau1 * f and the ratio tau2 / tau1 (per pixel for a segmenter).
        return self.task.log_likelihood(
            self.logits(inputs, timesteps), targets, marginal_ratio=self.marginal_temperature / self.joint_temperature
        )

    def step_scale(self, scale: float, step: GuidanceStep) -> float:
        if self.schedule == "edm_continuous":
            sine = math.sin(math.pi * step.timestep / step.num_train_timesteps)
            return scale * (max(step.timestep / step.num_train_timesteps, 1e-5) + self.sine_gamma * sine)
        return scale

    def variance_offset(self, step: GuidanceStep) -> float:
        if self.schedule != "ddpm":
            return 0.0
        respaced = step.num_steps - 1 - step.index  # the authors' t: the respaced step, counting down
        return max(math.sin(math.pi * respaced / step.num_steps) * step.max_variance * self.sine_gamma, 0.0)
