"""The standalone calibration job: ECE_t curves of one or more guides, run by `lightning validate`."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from plugguide.callbacks.calibration_curve import log_curves
from plugguide.callbacks.run_folder import in_run_folder
from plugguide.metrics import calibration_curve, calibration_timesteps, write_curves_csv
from plugguide.models import load_scheduler, load_unet
from plugguide.pipelines.guidance import ClassifierGuidance


class CalibrationEvaluation(L.LightningModule):
    """ECE_t against t of each guide on forward-noised held-out labelled images (Ma et al., 2023, section 4.1).

    `ECE_t = sum_b |B_b| / n * |acc(B_b) - conf(B_b)|` of each guide on its own input at t (x_t, or x0_hat
    from the frozen diffusion model); integral calibration error = mean of ECE_t over the timesteps. At the
    end of `lightning validate` the curves are overlaid in one TensorBoard figure, each guide's integral
    ECE is logged as `calibration/<name>/integral_ece`, and all curves are written to
    `<run folder>/calibration_curves.csv`.

    Args:
        guides (`list[ClassifierGuidance]`): the guides to compare (`ClassifierGuidance`s: naive, predicted-x0, PPAP
            experts, calibrated).
        names (`list[str]`, *optional*): a name per guide for the figure and CSV; default: the class names (numbered if
            repeated).
        diffusion_model (`str`, defaults to `"assets/digits/ddpm-uncond"`): diffusers pipeline directory or hub id; its
            schedule noises the images and its UNet forms x0_hat for x0_hat guides.
        num_timesteps (`int`, defaults to 20): timesteps measured, evenly spanning 0 .. T - 1 (paper's figures: ~20).
        n_bins (`int`, defaults to 15): ECE confidence bins.
        seed (`int`, defaults to 0): seed of the forward noise (the same noise for every guide).
        csv_path (`str`, *optional*): where the CSV goes, relative to the run's folder or absolute; default `<run
            folder>/calibration_curves.csv`.
    """

    def __init__(
        self,
        guides: list[ClassifierGuidance],
        names: list[str] | None = None,
        diffusion_model: str = "assets/digits/ddpm-uncond",
        num_timesteps: int = 20,
        n_bins: int = 15,
        seed: int = 0,
        csv_path: str | None = None,
    ) -> None:
        super().__init__()
        if not guides:
            raise ValueError("Expected `guides` to hold at least one ClassifierGuidance, but got none.")
        for guide in guides:
            if not isinstance(guide, ClassifierGuidance):
                raise ValueError(
                    f"Expected every entry of `guides` to be a ClassifierGuidance, but got {type(guide).__name__}."
                )
        if names is not None and len(names) != len(guides):
            raise ValueError(f"Expected `names` to have one entry per guide ({len(guides)}), but got {len(names)}.")
        self.save_hyperparameters(ignore=["guides"])
        if names is None:
            names = [type(guide).__name__ for guide in guides]
            names = [f"{name}_{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]
        self.names = names
        self.guides = torch.nn.ModuleList(guides)
        self.unet = load_unet(diffusion_model, "model.diffusion_model").eval().requires_grad_(False)
        self.scheduler = load_scheduler(diffusion_model, path_setting="model.diffusion_model")
        self.timesteps = calibration_timesteps(num_timesteps, len(self.scheduler.alphas_cumprod))
        self.batches: list[dict] = []
        self.curves: dict[str, dict] = {}

    def on_validation_epoch_start(self) -> None:
        self.batches = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.batches.append({"image": batch["image"], "label": batch["label"]})

    def on_validation_epoch_end(self) -> None:
        alphas_cumprod = self.scheduler.alphas_cumprod
        self.curves = {
            name: calibration_curve(
                guide, self.batches, self.timesteps, alphas_cumprod, self.unet, self.hparams.n_bins, self.hparams.seed
            )
            for name, guide in zip(self.names, self.guides)
        }
        for name, curve in self.curves.items():
            self.log(f"calibration/{name}/integral_ece", curve["integral_ece"][0])
        self.write(in_run_folder(self.trainer, self.hparams.csv_path or "calibration_curves.csv"))  # on every process

    @rank_zero_only
    def write(self, path: str) -> None:
        log_curves(self.logger, self.curves, self.global_step, "calibration")
        write_curves_csv(self.curves, path)
        summary = ", ".join(f"{name}: {curve['integral_ece'][0]:.4f}" for name, curve in self.curves.items())
        rank_zero_info(f"Integral calibration error: {summary}. Curves: {path}")
