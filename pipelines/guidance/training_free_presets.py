"""The named training-free methods as presets of `TFG`: each fixes the pieces its paper uses and leaves the rest off."""

from __future__ import annotations

from torch import nn

from plugguide.pipelines.guidance.training_free import TFG
from plugguide.pipelines.guidance.training_free_schedule import StrengthSchedule
from plugguide.pipelines.tasks import Task


class DPS(TFG):
    """Chung et al., 2023, "Diffusion Posterior Sampling for General Noisy Inverse Problems" (ICLR).

    The gradient of log p(y | x0_hat(x_t)) through the denoiser, divided by the guide's loss |log p(y | x0_hat)| per
    sample (DPS's step size zeta / ||y - A(x0_hat)||, as TFG's `dps.py` writes it for any guide): eps' = eps -
    s rho sigma g / |log p|. DPS adds its step to DDIM's x_prev directly; that constant per step is s rho here.

    Args:
        classifier (`nn.Module | str`): the off-the-shelf guide.
        task (`Task | None`, *optional*): how a target is scored (`ClassifierGuidance`).
        rho (`float`, defaults to 1.0): the step's strength.
    """

    def __init__(self, classifier: nn.Module | str, task: Task | None = None, *, rho: float = 1.0) -> None:
        super().__init__(classifier, task, rho=rho, normalize_by_loss=True)


class LGD(TFG):
    """Song et al., 2023, "Loss-Guided Diffusion Models for Plug-and-Play Controllable Generation" (ICML).

    The gradient through the denoiser of a Monte-Carlo estimate of p(y | x_t): log (1/n) sum_k p(y | x0_hat(x_t) +
    sigma_t z_k), the draws' spread sigma~_t = `sigma` sqrt(1 - abar_t) shrinking with the noise (LGD-MC). TFG's
    `lgd.py` also divides the gradient by n, a constant factor that s rho absorbs here.

    Args:
        classifier (`nn.Module | str`): the off-the-shelf guide.
        task (`Task | None`, *optional*): how a target is scored (`ClassifierGuidance`).
        rho (`float`, defaults to 1.0): the strength of the gradient.
        sigma (`float`, defaults to 1.0): the draws' spread, in units of sqrt(1 - abar_t).
        mc_draws (`int`, defaults to 4): n.
    """

    def __init__(
        self,
        classifier: nn.Module | str,
        task: Task | None = None,
        *,
        rho: float = 1.0,
        sigma: float = 1.0,
        mc_draws: int = 4,
    ) -> None:
        super().__init__(classifier, task, rho=rho, sigma=sigma, mc_draws=mc_draws, sigma_schedule="decrease")


class FreeDoM(TFG):
    """Yu et al., 2023, "FreeDoM: Training-Free Energy-Guided Conditional Diffusion Model" (ICCV).

    The gradient of log p(y | x0_hat(x_t)) through the denoiser, each step repeated `recurrence` times with the
    result re-noised between repeats (its time travel).

    Args:
        classifier (`nn.Module | str`): the off-the-shelf guide.
        task (`Task | None`, *optional*): how a target is scored (`ClassifierGuidance`).
        rho (`float`, defaults to 1.0): the mean strength of the gradient.
        recurrence (`int`, defaults to 2): how often each step runs.
        rho_schedule (`str`, defaults to "constant"): "constant", "increase" or "decrease" (`strength_weight`).
    """

    def __init__(
        self,
        classifier: nn.Module | str,
        task: Task | None = None,
        *,
        rho: float = 1.0,
        recurrence: int = 2,
        rho_schedule: StrengthSchedule = "constant",
    ) -> None:
        super().__init__(classifier, task, rho=rho, recurrence=recurrence, rho_schedule=rho_schedule)


class MPGD(TFG):
    """He et al., 2024, "Manifold Preserving Guided Diffusion" (ICLR), Algorithm 1.

    No gradient through the denoiser: `iterations` ascent steps on x0_hat itself, x0 <- x0 + s mu d/dx0 log p(y | x0),
    and the step from the updated x0_hat with the predicted noise kept ("keep_noise").

    Args:
        classifier (`nn.Module | str`): the off-the-shelf guide.
        task (`Task | None`, *optional*): how a target is scored (`ClassifierGuidance`).
        mu (`float`, defaults to 1.0): the ascent's step size.
        iterations (`int`, defaults to 1): ascent steps per evaluation.
    """

    def __init__(
        self, classifier: nn.Module | str, task: Task | None = None, *, mu: float = 1.0, iterations: int = 1
    ) -> None:
        super().__init__(classifier, task, rho=0.0, mu=mu, iterations=iterations, x0_update="keep_noise")


class UGD(TFG):
    """Bansal et al., 2024, "Universal Guidance for Diffusion Models" (ICLR), Algorithm 1.

    The forward term, eps' = eps - s rho sigma d/dx_t log p(y | x0_hat(x_t)); the backward term, `iterations` ascent
    steps on x0_hat with x_t kept (eps re-derived, "keep_sample"); and each step repeated `recurrence` times. TFG's
    `ugd.py` uses one strength for both terms and m = iterations; set `mu` = `rho` for the same.

    Args:
        classifier (`nn.Module | str`): the off-the-shelf guide.
        task (`Task | None`, *optional*): how a target is scored (`ClassifierGuidance`).
        rho (`float`, defaults to 1.0): the forward term's strength.
        mu (`float`, defaults to 1.0): the backward term's step size.
        iterations (`int`, defaults to 1): backward steps per evaluation (0: off).
        recurrence (`int`, defaults to 2): how often each step runs.
    """

    def __init__(
        self,
        classifier: nn.Module | str,
        task: Task | None = None,
        *,
        rho: float = 1.0,
        mu: float = 1.0,
        iterations: int = 1,
        recurrence: int = 2,
    ) -> None:
        super().__init__(
            classifier, task, rho=rho, mu=mu, iterations=iterations, recurrence=recurrence, x0_update="keep_sample"
        )
