"""TFG's schedules of a guidance strength over a sampling run, normalised to keep the run's mean strength."""

from __future__ import annotations

from typing import Literal, Sequence

StrengthSchedule = Literal["constant", "increase", "decrease"]
SmoothingSchedule = Literal["constant", "decrease"]
STRENGTH_SCHEDULES = ("constant", "increase", "decrease")
SMOOTHING_SCHEDULES = ("constant", "decrease")


def check_schedule(setting: str, value: str, allowed: Sequence[str]) -> None:
    """Fails, naming `setting`, on a schedule that is not one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"Expected `{setting}` to be one of {', '.join(map(repr, allowed))}, but got {value!r}.")


def strength_weight(schedule: StrengthSchedule, signal_ratios: Sequence[float], index: int) -> float:
    """w_i N / sum_j w_j of step `index` (Ye et al., 2024, TFG's `get_rho` / `get_mu`).

    `signal_ratios` holds alpha_j = abar_j / abar_{j+1} of every step j of the run (its DDIM "alpha_t"); "increase"
    weighs step j by alpha_j, which grows as the run nears the clean image, "decrease" by beta_j = 1 - alpha_j, and
    "constant" by 1. Dividing by the mean keeps the run's average strength at the value set, so a schedule moves the
    strength between steps without changing its total.
    """
    if schedule == "constant" or not signal_ratios:
        return 1.0
    weights = [ratio if schedule == "increase" else 1 - ratio for ratio in signal_ratios]
    total = sum(weights)
    return weights[index] * len(weights) / total if total > 0 else 1.0


def smoothing_weight(schedule: SmoothingSchedule, sigma: float) -> float:
    """The factor of the Monte-Carlo smoothing's standard deviation at noise level sigma_t = sqrt(1 - abar_t): sigma_t
    for "decrease" (LGD's choice, the spread of x0 given x_t shrinks with the noise), 1 for "constant" (TFG's
    `get_std`)."""
    return sigma if schedule == "decrease" else 1.0
