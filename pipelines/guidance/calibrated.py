"""Calibrated off-the-shelf classifier guidance (Ma et al., 2023, "Elucidating the design space of classifier-guided diffusion generation")."""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn

from plugguide.pipelines.guidance.base import GuidanceInput, GuidanceStep, GuidanceTarget
from plugguide.pipelines.guidance.classifier import ClassifierGuidance, as_classifier, evaluating
from plugguide.pipelines.tasks import Task

# ReLU-type activations that Softplus(beta) approximates (Softplus -> ReLU as beta -> inf).
RELU_TYPES = (nn.ReLU, nn.ReLU6)
SCHEDULES = ("ddpm", "edm", "edm_continuous")


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
    - schedule ("ddpm"): `mean += s (Sigma_t + max(sin(pi k / n) * max_var * gamma, 0)) grad`, as the authors' DDPM
      sampler writes it (AlexMaOLS/EluCD `DDPM/guided_diffusion/gaussian_diffusion.py`, `p_sample`): k = n - 1 - i is
      the respaced step counting down from n - 1 at step i of n (not t / T of the train timestep, which differs by up
      to 0.31 at n = 300), max_var the largest Sigma_t so far in the run, and the sine term one uniform value added to
      Sigma_t (`variance_offset`), also where the UNet learns a per-pixel Sigma_t. Deliberate differences: the authors
      read Sigma_t and max_var off one pixel of the first sample, here their mean over pixels and samples (the same for
      fixed variances). As in the authors' DDIM sampler, score-shift samplers (DDIM, DPM-Solver++, Euler, Heun, flow)
      take no sine term: carried over as the same offset relative to the step's Sigma_t, it multiplied the last
      steps' guidance many times over and left salt-and-pepper samples (measured in docs/results/samplers.md).
    - schedule ("edm"): EluCD's EDM sampler as the authors wrote it (Algorithm 2, AlexMaOLS/EluCD `EDM/generate.py`).
      The classifier sees the sample in EDM's space, x = x0 + s eps, scaled to unit RMS where its RMS exceeds 1:
      `x / max(rms(x), 1)`; the gradient is rescaled to the sample's RMS, `grad * rms(x) / rms(grad)`, times
      `g_i = max(s (N + 1 - i) / (N + 1), 1e-5) + sin(pi i / N) * s * gamma` at step i of N (so the last step,
      i = N - 1, still guides with about 0.16 s for N = 18), and added to the sample before the denoiser sees it
      (`shifts = "sample"`), once per step: on Heun the corrector evaluation is not guided, as in their sampler.
      The authors' ImageNet-64 run: softplus_beta 5, marginal_discount 0 (joint term only), gamma 0.3, s = 0.004
      at 10 and 18 steps.
    - schedule ("edm_continuous"): the EDM schedule as a function of t, `g(t) = s (max(t / T, 1e-5) + gamma sin(pi t / T))`,
      on the usual score shift and classifier input; it ends at 0 and lags the authors' step grid by one step, and is
      kept because it guides the digits better than Algorithm 2 at equal FID on Heun/EDM-18 (docs/results/samplers.md).

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
        marginal_discount: tau2 / tau1 (paper: 0.5); 1.0 gives log-softmax, 0 the joint term alone.
        sine_gamma: gamma of the sine-augmented schedule (paper: 0.3); 0 switches it off.
        schedule: `"ddpm"` (variance form), `"edm"` (Algorithm 2 as written) or `"edm_continuous"`.
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
        if marginal_discount < 0:
            raise ValueError(f"Expected `marginal_discount` to be >= 0, but got {marginal_discount}.")
        if sine_gamma < 0:
            raise ValueError(f"Expected `sine_gamma` to be >= 0, but got {sine_gamma}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"Expected `schedule` to be one of {SCHEDULES}, but got {schedule!r}.")
        path = classifier if isinstance(classifier, str) else None
        classifier = as_classifier(classifier)
        wrapped = isinstance(classifier, ClassifierGuidance)
        if schedule == "edm" and input not in (None, "x_t"):
            raise ValueError(f"`schedule`='edm' (EluCD's Algorithm 2) guides on the normalised sample, so `input` must be 'x_t' or None, but got {input!r}.")
        if input is None:
            input = "x_t" if schedule == "edm" else classifier.input if wrapped else "x0_hat"
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
        self._max_variance = 0.0

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
        return self.task.log_likelihood(self.logits(inputs, timesteps), targets, marginal_ratio=self.marginal_temperature / self.joint_temperature)

    @property
    def shifts(self) -> GuidanceTarget:
        return "sample" if self.schedule == "edm" else "score"

    def gradient(self, x_t: torch.Tensor, timesteps: torch.Tensor, x0_hat: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.schedule != "edm":
            return super().gradient(x_t, timesteps, x0_hat, targets)
        # Algorithm 2: x_t is the sample in EDM's space; the classifier sees it at unit RMS at most, and the gradient
        # comes back at the sample's RMS (per sample), so the schedule g_i is a fraction of the sample's size.
        norm = x_t.square().flatten(1).mean(1).sqrt().view(-1, *[1] * (x_t.dim() - 1))
        inputs = x_t / norm.clamp_min(1.0)
        grad = super().gradient(inputs, timesteps, inputs, targets)
        grad_norm = grad.square().flatten(1).mean(1).sqrt().view_as(norm)
        return grad / grad_norm.clamp_min(1e-20) * norm

    def step_scale(self, scale: float, step: GuidanceStep) -> float:
        if self.schedule == "edm":
            total = step.num_steps + 1  # the authors' len(t_steps): N levels and the final 0
            return max(scale / total * (total - step.index), 1e-5) + math.sin(step.index / step.num_steps * math.pi) * scale * self.sine_gamma
        if self.schedule == "edm_continuous":
            sine = math.sin(math.pi * step.timestep / step.num_train_timesteps)
            return scale * (max(step.timestep / step.num_train_timesteps, 1e-5) + self.sine_gamma * sine)
        return scale

    def variance_offset(self, step: GuidanceStep) -> float:
        if self.schedule != "ddpm":
            return 0.0
        if step.index == 0:  # a new sampling run: forget the previous run's largest variance
            self._max_variance = 0.0
        self._max_variance = max(self._max_variance, step.variance)
        respaced = step.num_steps - 1 - step.index  # the authors' t: the respaced step, counting down
        return max(math.sin(math.pi * respaced / step.num_steps) * self._max_variance * self.sine_gamma, 0.0)
