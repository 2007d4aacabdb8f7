"""ECE of a guide along the diffusion timesteps (Ma et al., 2023), as a TensorBoard figure and scalars."""

from __future__ import annotations

import csv
import os

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from plugguide.pipelines.guidance.classifier import ClassifierGuidance


def calibration_timesteps(num_timesteps: int, num_train_timesteps: int) -> list[int]:
    """`num_timesteps` evenly spaced timesteps spanning 0 .. T - 1."""
    if num_timesteps < 2:
        raise ValueError(f"Expected `num_timesteps` to be >= 2, but got {num_timesteps}.")
    return torch.linspace(0, num_train_timesteps - 1, num_timesteps).round().long().tolist()


@torch.no_grad()
def calibration_curve(
    guidance: ClassifierGuidance,
    batches,
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
        guidance: any `ClassifierGuidance` (naive, PPAP experts, calibrated).
        batches: an iterable of dicts with `image` (B, C, H, W) in [-1, 1] and `label` (B,).
        timesteps: train timesteps to measure at.
        alphas_cumprod: the diffusion model's abar (T,).
        unet: the frozen diffusion model, needed for x0_hat guides.
        n_bins: confidence bins of the ECE.
        seed: seed of the forward noise.

    Returns:
        {"timestep": [...], "ece": [...], "accuracy": [...]} and "integral_ece" (mean ECE_t over t) as a one-item list.
    """
    if guidance.input == "x0_hat" and unet is None:
        raise ValueError(f"{type(guidance).__name__} guides on x0_hat: the calibration curve needs the diffusion `unet` to form it.")
    num_classes = guidance.num_classes or 10
    # Computed on one process (callbacks draw on rank 0): never wait for the other ranks to sync.
    eces = {t: MulticlassCalibrationError(num_classes, n_bins=n_bins, norm="l1", sync_on_compute=False) for t in timesteps}
    accuracies = {t: MulticlassAccuracy(num_classes, average="micro", sync_on_compute=False) for t in timesteps}
    device = next(iter(p for p in guidance.parameters()), torch.zeros(())).device
    generator = torch.Generator(device).manual_seed(seed)
    for batch in batches:
        images, labels = batch["image"].to(device), batch["label"].to(device)
        for t in timesteps:
            abar = alphas_cumprod[t].to(device)
            noise = torch.randn(images.shape, generator=generator, device=device)
            x_t = abar.sqrt() * images + (1 - abar).sqrt() * noise
            timestep = torch.full((len(images),), t, device=device, dtype=torch.long)
            inputs = x_t
            if guidance.input == "x0_hat":
                eps = unet(x_t, timestep).sample[:, : images.shape[1]]
                inputs = ((x_t - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
            logits = guidance.logits(inputs, timestep).float().cpu()
            eces[t].update(logits.softmax(-1), labels.cpu())
            accuracies[t].update(logits, labels.cpu())
    ece = [float(eces[t].compute()) for t in timesteps]
    return {
        "timestep": list(timesteps),
        "ece": ece,
        "accuracy": [float(accuracies[t].compute()) for t in timesteps],
        "integral_ece": [sum(ece) / len(ece)],
    }


def calibration_figure(curves: dict[str, dict[str, list[float]]]):
    """A matplotlib figure of ECE_t (solid) and accuracy_t (dashed) against t, one colour per guide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ece_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for name, curve in curves.items():
        label = f"{name} (integral ECE {curve['integral_ece'][0]:.3f})"
        ece_axis.plot(curve["timestep"], curve["ece"], label=label)
        accuracy_axis.plot(curve["timestep"], curve["accuracy"], "--", label=name)
    ece_axis.set(xlabel="timestep t", ylabel="ECE_t", title="Calibration error along the diffusion")
    accuracy_axis.set(xlabel="timestep t", ylabel="accuracy_t", title="Accuracy on the guide's input", ylim=(0, 1))
    ece_axis.legend(fontsize=7)
    accuracy_axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def write_curves_csv(curves: dict[str, dict[str, list[float]]], path: str) -> None:
    """One row per (guide, timestep): guide,timestep,ece,accuracy,integral_ece."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)  # quotes guide names that hold commas
        writer.writerow(["guide", "timestep", "ece", "accuracy", "integral_ece"])
        for name, curve in curves.items():
            for t, ece, accuracy in zip(curve["timestep"], curve["ece"], curve["accuracy"]):
                writer.writerow([name, t, f"{ece:.6f}", f"{accuracy:.6f}", f"{curve['integral_ece'][0]:.6f}"])


def log_curves(logger, curves: dict[str, dict[str, list[float]]], step: int, tag: str) -> None:
    """Logs the overlaid figure and `<tag>/<guide>/integral_ece` scalars to a TensorBoard logger (if any)."""
    experiment = getattr(logger, "experiment", None)
    if experiment is None or not hasattr(experiment, "add_figure"):
        return
    experiment.add_figure(f"{tag}/ece_vs_t", calibration_figure(curves), global_step=step)
    for name, curve in curves.items():
        experiment.add_scalar(f"{tag}/{name}/integral_ece", curve["integral_ece"][0], global_step=step)


class CalibrationCurve(L.Callback):
    """ECE_t of the module's guide along t on held-out labelled images, logged at each validation epoch end.

    Ma et al. (2023), section 4.1: `ECE_t = sum_b |B_b| / n * |acc(B_b) - conf(B_b)|` of the guide on exactly
    its own input at t (x_t for the naive classifier and PPAP experts, x0_hat for the calibrated guide);
    the integral calibration error is the mean of ECE_t over the timesteps. Logs a figure of ECE_t and
    accuracy_t against t and the integral ECE as a scalar, on global rank 0, in eval mode under no_grad,
    with forward noise from a generator seeded with `seed` (the same noise every epoch).

    The guide is `pl_module.guidance()` (e.g. `ExpertDistillation`'s current experts), or
    `pl_module.guidance` when it is a module. Held-out images: the datamodule's `labelled_data` val split
    if it has one, else its own val split. x0_hat guides need `pl_module.unet`.

    Args:
        num_timesteps: timesteps measured, evenly spanning 0 .. T - 1 (default 20).
        n_bins: ECE confidence bins.
        max_images: held-out images used (the first ones of the val split).
        every_n_epochs: measure after every n-th validation epoch.
        seed: seed of the forward noise.
        tag: TensorBoard tag.
    """

    def __init__(self, num_timesteps: int = 20, n_bins: int = 15, max_images: int = 180, every_n_epochs: int = 1, seed: int = 0, tag: str = "calibration") -> None:
        if num_timesteps < 2:
            raise ValueError(f"Expected `num_timesteps` to be >= 2, but got {num_timesteps}.")
        if every_n_epochs < 1:
            raise ValueError(f"Expected `every_n_epochs` to be >= 1, but got {every_n_epochs}.")
        if max_images < 1:
            raise ValueError(f"Expected `max_images` to be >= 1, but got {max_images}.")
        self.num_timesteps = num_timesteps
        self.n_bins = n_bins
        self.max_images = max_images
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self.tag = tag
        self.last_curves: dict | None = None

    @staticmethod
    def guide_of(pl_module: L.LightningModule) -> ClassifierGuidance:
        guidance = getattr(pl_module, "guidance", None)
        if callable(guidance) and not isinstance(guidance, nn.Module):
            guidance = guidance()
        if not isinstance(guidance, ClassifierGuidance):
            raise ValueError(f"CalibrationCurve needs a ClassifierGuidance from `pl_module.guidance`, but {type(pl_module).__name__} gives {type(guidance).__name__}.")
        return guidance

    def held_out(self, trainer: L.Trainer) -> list[dict]:
        datamodule = trainer.datamodule
        source = getattr(datamodule, "labelled_data", None) or datamodule
        if hasattr(source, "setup") and source is not datamodule:
            source.setup("validate")
        batches, count = [], 0
        for batch in source.val_dataloader():
            batches.append({"image": batch["image"][: self.max_images - count], "label": batch["label"][: self.max_images - count]})
            count += len(batches[-1]["label"])
            if count >= self.max_images:
                break
        return batches

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        guidance = self.guide_of(pl_module)
        scheduler = getattr(pl_module, "sampler", None) or getattr(pl_module, "scheduler", None)
        alphas_cumprod = scheduler.alphas_cumprod
        timesteps = calibration_timesteps(self.num_timesteps, len(alphas_cumprod))
        unet = getattr(pl_module, "unet", None)
        was_training = pl_module.training
        pl_module.eval()
        try:
            curve = calibration_curve(guidance, self.held_out(trainer), timesteps, alphas_cumprod, unet, self.n_bins, self.seed)
        finally:
            pl_module.train(was_training)
        self.last_curves = {type(guidance).__name__: curve}
        log_curves(trainer.logger, self.last_curves, trainer.global_step, self.tag)
