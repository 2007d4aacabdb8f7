"""Calibration of a guide along the diffusion timesteps (Ma et al., 2023, section 4.1): ECE_t curves and their CSV."""

from __future__ import annotations

import csv
import os
from typing import Iterable, Protocol

import torch
from torch import nn
from torchmetrics.functional.classification import multiclass_calibration_error


class CalibratedInput(Protocol):
    """What a calibration curve needs of a guide: the tensor it reads (`input`) and its class logits there."""

    input: str  # "x_t" or "x0_hat"
    num_classes: int | None

    def logits(self, inputs: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)| over `n_bins` equal-width confidence bins."""
    return float(
        multiclass_calibration_error(
            logits.softmax(-1), labels, num_classes=logits.shape[-1], n_bins=n_bins, norm="l1"
        )
    )


def calibration_timesteps(num_timesteps: int, num_train_timesteps: int) -> list[int]:
    """`num_timesteps` evenly spaced timesteps spanning 0 .. T - 1."""
    if num_timesteps < 2:
        raise ValueError(f"Expected `num_timesteps` to be >= 2, but got {num_timesteps}.")
    return torch.linspace(0, num_train_timesteps - 1, num_timesteps).round().long().tolist()


def guide_input(
    guidance: CalibratedInput, x_t: torch.Tensor, t: int, abar: torch.Tensor, unet: nn.Module | None
) -> torch.Tensor:
    """What the guide reads at x_t: x_t itself, or `(x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)` clipped to [-1, 1]."""
    if guidance.input != "x0_hat":
        return x_t
    if unet is None:
        raise ValueError(
            f"{type(guidance).__name__} guides on x0_hat: the calibration curve needs the diffusion `unet` to form it."
        )
    timestep = torch.full((len(x_t),), t, device=x_t.device, dtype=torch.long)
    eps = unet(x_t, timestep).sample[:, : x_t.shape[1]]
    return ((x_t - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)


def curve_from_logits(logits: dict[int, torch.Tensor], labels: torch.Tensor, n_bins: int) -> dict[str, list[float]]:
    """{"timestep", "ece", "accuracy", "integral_ece"} from the guide's logits at each timestep and the true labels."""
    timesteps = sorted(logits)
    ece = [expected_calibration_error(logits[t], labels, n_bins) for t in timesteps]
    return {
        "timestep": timesteps,
        "ece": ece,
        "accuracy": [float((logits[t].argmax(-1) == labels).float().mean()) for t in timesteps],
        "integral_ece": [sum(ece) / len(ece)],
    }


@torch.no_grad()
def calibration_curve(
    guidance: CalibratedInput,
    batches: Iterable[dict],
    timesteps: list[int],
    alphas_cumprod: torch.Tensor,
    unet: nn.Module | None = None,
    n_bins: int = 15,
    seed: int = 0,
) -> dict[str, list[float]]:
    """ECE_t and accuracy_t of `guidance.logits` on forward-noised labelled images, on the guide's own input.

    `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps` with noise from a generator seeded with `seed` (the same
    noise for every guide). Guides with `input == "x0_hat"` see `(x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)`,
    clipped to [-1, 1], from the frozen `unet`; guides on `"x_t"` see x_t.

    Args:
        guidance (`CalibratedInput`): any guide with `input`, `num_classes` and `logits(inputs, timesteps)` (the
            `ClassifierGuidance`s).
        batches (`Iterable[dict]`): an iterable of dicts with `image` (B, C, H, W) in [-1, 1] and `label` (B,).
        timesteps (`list[int]`): train timesteps to measure at.
        alphas_cumprod (`torch.Tensor`): the diffusion model's abar (T,).
        unet (`nn.Module`, *optional*): the frozen diffusion model, needed for x0_hat guides.
        n_bins (`int`, defaults to 15): confidence bins of the ECE.
        seed (`int`, defaults to 0): seed of the forward noise.

    Returns:
        {"timestep": [...], "ece": [...], "accuracy": [...]} and "integral_ece" (mean ECE_t over t) as a one-item list.
    """
    device = next(iter(p for p in guidance.parameters()), torch.zeros(())).device
    generator = torch.Generator(device).manual_seed(seed)
    logits = {t: [] for t in timesteps}
    labels = []
    for batch in batches:
        images = batch["image"].to(device)
        labels.append(batch["label"].cpu())
        for t in timesteps:
            abar = alphas_cumprod[t].to(device)
            noise = torch.randn(images.shape, generator=generator, device=device)
            x_t = abar.sqrt() * images + (1 - abar).sqrt() * noise
            inputs = guide_input(guidance, x_t, t, abar, unet)
            logits[t].append(
                guidance.logits(inputs, torch.full((len(images),), t, device=device, dtype=torch.long)).float().cpu()
            )
    return curve_from_logits({t: torch.cat(values) for t, values in logits.items()}, torch.cat(labels), n_bins)


@torch.no_grad()
def reverse_process_calibration_curve(
    guidance: CalibratedInput,
    trajectory: dict[int, torch.Tensor],
    labels: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    unet: nn.Module | None = None,
    n_bins: int = 15,
) -> dict[str, list[float]]:
    """ECE_t as EluCD defines it (Ma et al., 2023, section 4.1): on reverse-process samples x_t, labelled by their condition.

    `trajectory[t]` holds the samples x_t of a class-conditional model's sampler at train timestep t, started from
    noise with condition `labels`; the guide is scored on what it would read there (x_t, or x0_hat formed by `unet`,
    the model it guides). Unlike forward-noised real images, these x_t are what guidance meets while sampling, off
    the data manifold included.
    """
    device = next(iter(p for p in guidance.parameters()), torch.zeros(())).device
    logits = {}
    for t, x_t in trajectory.items():
        x_t = x_t.to(device)
        inputs = guide_input(guidance, x_t, t, alphas_cumprod[t].to(device), unet)
        logits[t] = guidance.logits(inputs, torch.full((len(x_t),), t, device=device, dtype=torch.long)).float().cpu()
    return curve_from_logits(logits, labels.cpu(), n_bins)


CSV_COLUMNS = ["guide", "timestep", "ece", "accuracy", "integral_ece"]


def write_curves_csv(curves: dict[str, dict[str, list[float]]], path: str) -> None:
    """One row per (guide, timestep): guide,timestep,ece,accuracy,integral_ece; written whole or not at all."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as file:
        writer = csv.writer(file)  # quotes guide names that hold commas
        writer.writerow(CSV_COLUMNS)
        for name, curve in curves.items():
            for t, ece, accuracy in zip(curve["timestep"], curve["ece"], curve["accuracy"]):
                writer.writerow([name, t, f"{ece:.6f}", f"{accuracy:.6f}", f"{curve['integral_ece'][0]:.6f}"])
    os.replace(tmp, path)


def read_curves_csv(path: str) -> dict[str, dict[str, list[float]]]:
    """The curves `write_curves_csv` wrote, keyed by guide name."""
    curves: dict[str, dict[str, list]] = {}
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            curve = curves.setdefault(
                row["guide"], {"timestep": [], "ece": [], "accuracy": [], "integral_ece": [float(row["integral_ece"])]}
            )
            curve["timestep"].append(int(row["timestep"]))
            curve["ece"].append(float(row["ece"]))
            curve["accuracy"].append(float(row["accuracy"]))
    return curves
