"""The one conversion between a denoiser's output, a diffusers sampler's state and what guidance works with.

Guidance methods (`pipelines/guidance/`) see every model the same way: a variance-preserving sample
`x_t = alpha x0 + sigma eps` (alpha^2 + sigma^2 = 1), the predicted clean image `x0_hat`, and the discrete
train timestep t of that noise level. Models differ in two ways, both handled here and nowhere else:

- the sampler's space (`SCHEDULER_FAMILIES`): its state is `x = scale * x_t` with
    vp     (DDPM, DDIM, DPM-Solver, UniPC, DEIS, PNDM)   x = sqrt(abar) x0 + sqrt(1 - abar) eps   scale = 1
    sigma  (Euler, Euler ancestral, Heun)                x = x0 + s eps                          scale = sqrt(1 + s^2)
    edm    (EDM Euler, EDM DPM-Solver)                   x = x0 + s eps                          scale = sqrt(1 + s^2)
    flow   (flow-matching Euler)                         x = (1 - s) x0 + s eps                  scale = sqrt((1 - s)^2 + s^2)
  with alpha = 1 / scale, sigma = s / scale in the sigma spaces and alpha = (1 - s) / scale, sigma = s / scale in flow;
- the network's output o (`prediction_type`), always an affine function of the state, `x0_hat = a x + b o`:
    epsilon        a = 1 / (scale alpha)   b = -sigma / alpha      (o = eps)
    v_prediction   a = alpha / scale       b = -sigma              (o = alpha eps - sigma x0, Salimans & Ho 2022)
    sample         a = 0                   b = 1                   (o = x0)
    flow velocity  a = 1                   b = -s                  (o = eps - x0, Liu et al. 2022)
    edm            a = c_skip(s)           b = c_out(s)            (the scheduler's own `precondition_outputs`)
  and eps = (x_t - alpha x0_hat) / sigma.

Guidance is a shift of the score of x_t: grad log p(x_t | y) = grad log p(x_t) + s grad log p(y | x_t), and
grad log p(x_t) = -eps / sigma, so every family takes the same shift (Dhariwal & Nichol 2021, "condition_score"):

    eps' = eps - s sigma grad,     x0' = x0_hat + s (sigma^2 / alpha) grad,     o' = o + (d o / d eps) (eps' - eps),

with d o / d eps = -(sigma / alpha) / b (1 for epsilon models, 1 / alpha for v, 1 / (1 - s) for flow velocity);
`scheduler.step` then consumes o' as it would the network's output. The ancestral DDPM step keeps the mean shift
`mean += s Sigma_t grad` instead (`GuidedDiffusionPipeline`). At alpha = 0 (flow's first step, s = 1) the sample is
pure noise, p(y | x_t) = p(y) carries no information and d o / d eps is infinite: the pipeline does not guide there.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass

import diffusers
import torch
from diffusers import DDPMScheduler, SchedulerMixin

from plugguide.models.diffusion_model import SCHEDULER_FAMILIES
from plugguide.pipelines.guidance.base import GuidanceStep

# The network outputs each sampler's own `step` implements (diffusers 0.42), by family, and where a sampler has fewer.
# PNDM accepts v_prediction but its linear multistep averages raw outputs taken at different timesteps, and v's relation
# to eps changes with t: the average is the v of no state (an exact v copy of an eps model ends far off, even unguided).
PREDICTION_TYPES = {
    "vp": ("epsilon", "v_prediction", "sample"),
    "sigma": ("epsilon", "v_prediction", "sample"),
    "edm": ("epsilon", "v_prediction"),
    "flow": ("flow",),
}
FEWER_PREDICTION_TYPES = {
    "PNDMScheduler": ("epsilon",),
    "EulerAncestralDiscreteScheduler": ("epsilon", "v_prediction"),
}


@dataclass(frozen=True)
class NoiseLevel(GuidanceStep):
    """One denoiser evaluation: what guidance sees (`GuidanceStep`), plus how the sampler's state relates to it.

    Args:
        scale (`float`, defaults to 1.0): the state is `x = scale * x_t`.
        sampler_sigma (`float`, defaults to 0.0): the noise level s in the sampler's own table: x = x0 + s eps in the sigma spaces (s = sigma / alpha,
            what EDM's preconditioning reads), x = (1 - s) x0 + s eps in flow matching; sqrt((1 - abar) / abar) in vp.
        first_evaluation (`bool`, defaults to True): False for Heun's second (corrector) evaluation of a step.
    """

    scale: float = 1.0
    sampler_sigma: float = 0.0
    first_evaluation: bool = True


class ModelFamily:
    """How one diffusers sampler's state and its network's output convert to (eps, x0_hat, x_t, t) and back.

    Built per sampling run (`set_timesteps` starts it). Refuses, naming them, a scheduler that is no (subclass of a)
    sampler it handles, a `prediction_type` it does not handle, and scheduler settings that would make the conversion
    wrong.

    Args:
        scheduler (`SchedulerMixin`): a diffusers scheduler of `SCHEDULER_FAMILIES`, or of a subclass of one.
        sets_timesteps (`bool`, defaults to True): True (default) where the family starts each run itself (`set_timesteps`, as
            `GuidedDiffusionPipeline` does); False where the caller's own pipeline sets the scheduler's timesteps (a stock
            pipeline under `guided`), which may pass dynamic shifting's `mu` (Flux), so `use_dynamic_shifting` is allowed.
    """

    def __init__(self, scheduler: SchedulerMixin, sets_timesteps: bool = True) -> None:
        # The nearest stock sampler the scheduler's class is or derives from (diffusers' class itself, not a namesake):
        # subclasses step as their base does.
        name = next(
            (
                base.__name__
                for base in type(scheduler).__mro__
                if base.__name__ in SCHEDULER_FAMILIES and getattr(diffusers, base.__name__, None) is base
            ),
            None,
        )
        if name is None:
            raise ValueError(
                f"`scheduler` {type(scheduler).__name__} is not handled by guided sampling; allowed: "
                f"{', '.join(SCHEDULER_FAMILIES)} and their subclasses."
            )
        self.kind = SCHEDULER_FAMILIES[name]
        self.prediction_type = "flow" if self.kind == "flow" else scheduler.config.prediction_type
        allowed = FEWER_PREDICTION_TYPES.get(name, PREDICTION_TYPES[self.kind])
        if self.prediction_type not in allowed:
            raise ValueError(
                f"`prediction_type`={self.prediction_type!r} of {name} is not handled; allowed for this sampler: {', '.join(allowed)}."
            )
        if self.kind == "flow":
            for setting in (("use_dynamic_shifting",) if sets_timesteps else ()) + (
                "invert_sigmas",
                "stochastic_sampling",
            ):
                if scheduler.config.get(setting):
                    raise ValueError(
                        f"{name} with `{setting}`=True is not handled by guided sampling; set it to False."
                    )
        if isinstance(scheduler, DDPMScheduler) and scheduler.config.variance_type == "fixed_large_log":
            raise ValueError(
                "DDPMScheduler with `variance_type`='fixed_large_log' is not handled: diffusers' `step` takes the square root of log(beta_t) < 0 "
                "and samples NaN; use 'fixed_large' (the same variance beta_t)."
            )
        if self.kind == "vp" and scheduler.config.get("use_flow_sigmas"):
            raise ValueError(
                f"{name} with `use_flow_sigmas`=True is not handled by guided sampling: its state is (1 - s) x0 + s eps, not the "
                "variance-preserving x_t its `prediction_type` assumes; set it to False, or sample a flow model with FlowMatchEulerDiscreteScheduler."
            )
        self.scheduler = scheduler
        self.clipping = scheduler  # whose clip_sample / thresholding settings `clip` applies
        self.ancestral = isinstance(scheduler, DDPMScheduler)
        self.reads_abar = self.kind == "vp" and not hasattr(
            scheduler, "sigmas"
        )  # DDPM, DDIM, PNDM: abar of t, no sigma table
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        if self.kind == "edm":  # the training sigma table, T + 1 levels from sigma_max down to sigma_min
            self._train_log_sigmas = type(scheduler).from_config(scheduler.config).sigmas[:-1].double().log()
        elif self.kind in ("vp", "sigma"):
            abar = scheduler.alphas_cumprod.double()
            self._train_log_snr = (abar / (1 - abar)).log()

    # -- the run's noise levels -------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """The sampler's steps for a run that starts at its first timestep.

        Samplers with a step index also learn that they begin at index 0: left alone, they find their start by
        looking the first timestep up, and where rounding repeats it (Karras sigmas on a cosine schedule, whose
        sigma_max is 20,291, give 998, 998, 983, ...) they start at the second entry, as for img2img, and run past
        their table's end; the evaluation index would also no longer name the state's noise level.
        """
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise in the sampler's space, as the stock diffusers pipelines scale it."""
        return float(getattr(self.scheduler, "init_noise_sigma", 1.0))

    @property
    def evaluations_per_step(self) -> int:
        return self.scheduler.order  # 2 for Heun: a predictor and a corrector evaluation per step

    def _coefficients(self, index: int, timestep: torch.Tensor) -> tuple[float, float, float, float]:
        """(alpha, sigma, scale, s) of evaluation `index` (s: the noise level in the sampler's own table)."""
        if self.reads_abar:
            abar = float(self.scheduler.alphas_cumprod[int(timestep)])
            return math.sqrt(abar), math.sqrt(1 - abar), 1.0, math.sqrt((1 - abar) / abar) if abar > 0 else math.inf
        s = float(self.scheduler.sigmas[index])
        if self.kind == "flow":
            scale = math.hypot(1 - s, s)
            return (1 - s) / scale, s / scale, scale, s
        alpha = 1 / math.sqrt(1 + s**2)
        return alpha, s * alpha, (1.0 if self.kind == "vp" else 1 / alpha), s

    def train_timestep(self, timestep: torch.Tensor, alpha: float, sigma: float, s: float) -> int:
        """The discrete train timestep of this noise level, from the scheduler's own tables (PPAP experts route by it).

        vp without a sigma table: t itself. DDPM-trained models under a sigma table (Euler, Heun, DPM-Solver with
        Karras sigmas): the t whose abar has the nearest log-SNR. Flow: the model's own timestep s T. EDM: the
        entry of the scheduler's training sigma table (T + 1 levels, sigma_max first) nearest in log sigma, counted
        from the clean end, so larger t is noisier as everywhere else.
        """
        last = self.num_train_timesteps - 1
        if self.reads_abar:
            return int(timestep)
        if self.kind == "flow":
            return min(max(round(s * self.num_train_timesteps), 0), last)
        if self.kind == "edm":
            nearest = int((self._train_log_sigmas - math.log(s)).abs().argmin())
            return min(len(self._train_log_sigmas) - 1 - nearest, last)
        return int((self._train_log_snr - 2 * math.log(alpha / sigma)).abs().argmin())

    def noise_level(self, index: int, timestep: torch.Tensor) -> NoiseLevel:
        """Evaluation `index` of the run (the loop's position in `scheduler.timesteps`) at the scheduler's `timestep`."""
        alpha, sigma, scale, s = self._coefficients(index, timestep)
        per_step = self.evaluations_per_step
        step, num_steps = index // per_step, -(-len(self.scheduler.timesteps) // per_step)
        return NoiseLevel(
            timestep=self.train_timestep(timestep, alpha, sigma, s),
            index=step,
            num_steps=num_steps,
            alpha=alpha,
            sigma=sigma,
            variance=0.0,
            num_train_timesteps=self.num_train_timesteps,
            scale=scale,
            sampler_sigma=s,
            first_evaluation=index % per_step == 0,
        )

    # -- output <-> (eps, x0_hat) --------------------------------------------------------------------------------
    def affine(self, level: NoiseLevel, x: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """(a x, b, d o / d eps) of `x0_hat = a x + b o` at `level` (see the module docstring; alpha > 0)."""
        alpha, sigma, scale, s = level.alpha, level.sigma, level.scale, level.sampler_sigma
        if self.kind == "edm":
            skip = self.scheduler.precondition_outputs(x, torch.zeros_like(x), s)  # c_skip x
            b = float(self.scheduler.precondition_outputs(torch.zeros(()), torch.ones(()), s))  # c_out
            return skip, b, -(sigma / alpha) / b
        if self.prediction_type == "epsilon":
            return x / (scale * alpha), -sigma / alpha, 1.0
        if self.prediction_type == "v_prediction":
            return x * (alpha / scale), -sigma, 1 / alpha
        if self.prediction_type == "sample":
            return torch.zeros_like(x), 1.0, -sigma / alpha
        return x, -s, 1 / (1 - s)  # flow velocity: x0 = x - s v

    def predicted_clean(self, output: torch.Tensor, x: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        """x0_hat = a x + b o."""
        ax, b, _ = self.affine(level, x)
        return ax + b * output

    def output_from_clean(self, x0: torch.Tensor, x: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        """The output o that predicts `x0` from `x`: o = (x0 - a x) / b."""
        ax, b, _ = self.affine(level, x)
        return (x0 - ax) / b

    def noise_difference(self, difference: torch.Tensor, x: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        """eps(o + difference) - eps(o) = -(alpha b / sigma) difference: an output difference (CFG's) in eps units."""
        _, b, _ = self.affine(level, x)
        return -(level.alpha * b / level.sigma) * difference

    def model_input(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The denoiser's input: the sampler's `scale_model_input` (flow samplers have none and feed x as it is)."""
        if self.kind == "flow":
            return x
        return self.scheduler.scale_model_input(x, timestep)

    def step(self, output: torch.Tensor, timestep: torch.Tensor, x: torch.Tensor, generator) -> torch.Tensor:
        """`scheduler.step` to the next state; the generator goes only to samplers that draw noise (as diffusers' pipelines pass it)."""
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        return self.scheduler.step(
            output, timestep, x, **({"generator": generator} if takes_generator else {})
        ).prev_sample

    def shift_output(
        self, output: torch.Tensor, eps_shift: torch.Tensor, x: torch.Tensor, level: NoiseLevel
    ) -> torch.Tensor:
        """o' = o + (d o / d eps) * eps_shift: the output that predicts eps + eps_shift at the same x."""
        _, _, d_output = self.affine(level, x)
        return output + d_output * eps_shift

    # -- clipping, in the authors' order -----------------------------------------------------------------------
    @property
    def clips_clean_image(self) -> bool:
        """True when the sampler clips or thresholds x0_hat inside `step` (`clip_sample`, `thresholding`)."""
        return bool(self.clipping.config.get("thresholding") or self.clipping.config.get("clip_sample"))

    def clip(self, x0: torch.Tensor) -> torch.Tensor:
        """x0_hat clipped as the sampler's own `step` would: dynamic thresholding, else `clip_sample_range`."""
        if self.clipping.config.get("thresholding"):
            return self.clipping._threshold_sample(x0)
        if self.clipping.config.get("clip_sample"):
            limit = self.clipping.config.clip_sample_range
            return x0.clamp(-limit, limit)
        return x0

    def without_clipping(self) -> "ModelFamily":
        """This family stepping through a copy of the sampler that neither clips nor thresholds x0_hat; its `clip` still
        clips as the original does. For guided runs that clip before the shift (guided-diffusion's order)."""
        unclipped = copy.deepcopy(self.scheduler)  # with whatever the instance holds beside its config (a grid)
        unclipped.register_to_config(clip_sample=False, thresholding=False)
        family = ModelFamily(unclipped)
        family.clipping = self.clipping
        return family
