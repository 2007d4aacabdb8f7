"""ECE of a guide along the diffusion timesteps (Ma et al., 2023), as a TensorBoard figure and scalars."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from plugguide.metrics import calibration_curve, calibration_figure, calibration_timesteps
from plugguide.pipelines.guidance import ClassifierGuidance


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

    The guide is `pl_module.guidance` (e.g. `ExpertDistillation`'s current experts), or
    `pl_module.guidance` when it is a module. Held-out images: the datamodule's `labelled_data` val split
    if it has one, else its own val split. x0_hat guides need `pl_module.unet`.

    Args:
        num_timesteps (`int`, defaults to 20): timesteps measured, evenly spanning 0 .. T - 1.
        n_bins (`int`, defaults to 15): ECE confidence bins.
        max_images (`int`, defaults to 180): held-out images used (the first ones of the val split).
        every_n_epochs (`int`, defaults to 1): measure after every n-th validation epoch.
        seed (`int`, defaults to 0): seed of the forward noise.
        tag (`str`, defaults to `"calibration"`): TensorBoard tag.
    """

    def __init__(
        self,
        num_timesteps: int = 20,
        n_bins: int = 15,
        max_images: int = 180,
        every_n_epochs: int = 1,
        seed: int = 0,
        tag: str = "calibration",
    ) -> None:
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
        if not isinstance(guidance, ClassifierGuidance):
            raise ValueError(
                f"CalibrationCurve needs a ClassifierGuidance from `pl_module.guidance`, but {type(pl_module).__name__} gives {type(guidance).__name__}."
            )
        return guidance

    def held_out(self, trainer: L.Trainer) -> list[dict]:
        datamodule = trainer.datamodule
        source = getattr(datamodule, "labelled_data", None) or datamodule
        if hasattr(source, "setup") and source is not datamodule:
            source.setup("validate")
        batches, count = [], 0
        for batch in source.val_dataloader():
            batches.append(
                {
                    "image": batch["image"][: self.max_images - count],
                    "label": batch["label"][: self.max_images - count],
                }
            )
            count += len(batches[-1]["label"])
            if count >= self.max_images:
                break
        return batches

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        guidance = self.guide_of(pl_module)
        scheduler = pl_module.scheduler
        alphas_cumprod = scheduler.alphas_cumprod
        timesteps = calibration_timesteps(self.num_timesteps, len(alphas_cumprod))
        unet = getattr(pl_module, "unet", None)
        was_training = pl_module.training
        pl_module.eval()
        try:
            curve = calibration_curve(
                guidance, self.held_out(trainer), timesteps, alphas_cumprod, unet, self.n_bins, self.seed
            )
        finally:
            pl_module.train(was_training)
        self.last_curves = {type(guidance).__name__: curve}
        log_curves(trainer.logger, self.last_curves, trainer.global_step, self.tag)
