"""Dense regression, such as monocular depth (PPAP guiding GLIDE with MiDaS, Sec. 5.2)."""

from __future__ import annotations

from typing import Literal

import torch
from torchmetrics.functional import pearson_corrcoef

from plugguide.pipelines.tasks.base import Task

RegressionLoss = Literal["mse", "ssi"]


def align_scale_and_shift(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`s * prediction + b` with the per-sample s, b of least squares against `target` (Ranftl et al., 2020, Eq. 4).

    A relative-depth model such as MiDaS is right up to an unknown scale and shift; this aligns it before any
    per-pixel comparison, in closed form, so that gradients flow through s and b.
    """
    p, t = prediction.flatten(1), target.flatten(1)
    p_mean, t_mean = p.mean(1, keepdim=True), t.mean(1, keepdim=True)
    scale = ((p - p_mean) * (t - t_mean)).sum(1, keepdim=True) / (p - p_mean).square().sum(1, keepdim=True).clamp_min(
        1e-12
    )
    return (scale * (p - p_mean) + t_mean).view_as(prediction)


class DenseRegressionTask(Task):
    """A real value per pixel: outputs and targets (B, H, W) maps.

    The loss between two maps, averaged over pixels:
    - "mse": the squared error, what the authors distil MiDaS with (riiid/PPAP `deepfloyd_train_guidance_ppap.py`:
      `MSELoss(reduction="none")(expert(x_t), midas(x0)).mean(-1).mean(-1)`);
    - "ssi": the squared error after aligning the prediction's scale and shift to the other map per sample
      (`align_scale_and_shift`), the scale-and-shift-invariant loss MiDaS itself is trained with, for models whose
      maps are relative.
    Distillation averages it over pixels and the batch; guidance follows minus the gradient of its sum over pixels
    toward a target map (log-likelihood of a Gaussian of fixed variance at every pixel, up to scale and constant;
    summed, like a segmenter's, so that each pixel's pull does not weaken with the resolution).

    Args:
        loss (`RegressionLoss`, defaults to 'mse'): "mse" or "ssi".
    """

    label_key = "depth"

    def __init__(self, loss: RegressionLoss = "mse") -> None:
        if loss not in ("mse", "ssi"):
            raise ValueError(f"Expected `loss` to be 'mse' or 'ssi', but got {loss!r}.")
        self.loss = loss

    def squared_errors(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, H W): each pixel's squared error, after the scale-and-shift alignment for "ssi"."""
        if self.loss == "ssi":
            outputs = align_scale_and_shift(outputs, targets)
        return (outputs - targets).square().flatten(1)

    def distillation_loss(self, teacher_outputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        return self.squared_errors(outputs, teacher_outputs).mean()

    def supervised_loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.squared_errors(outputs, labels).mean()

    def log_likelihood(
        self, outputs: torch.Tensor, targets: torch.Tensor, marginal_ratio: float = 1.0
    ) -> torch.Tensor:
        self.check_target_shape(outputs, targets)
        if marginal_ratio != 1.0:
            raise ValueError(
                f"A marginal temperature acts on class scores; a dense regression has none (`marginal_ratio`={marginal_ratio}, expected 1)."
            )
        return -self.squared_errors(outputs, targets).sum(1)

    def prediction(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs

    def agreement(self, outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """The mean per-sample Pearson correlation of the maps with the reference maps (blind to scale and shift)."""
        return pearson_corrcoef(outputs.flatten(1).T, reference.flatten(1).T).nanmean()

    def check_targets(self, targets: torch.Tensor, num_classes: int | None) -> None:
        if targets.dim() != 3 or not targets.is_floating_point():
            raise ValueError(
                f"Expected `targets` of dense regression guidance to be one real-valued map per sample, (B, H, W) (TargetMapDataModule "
                f"gives them to the sampling job), but got {targets.dtype} targets of shape {tuple(targets.shape)}."
            )
        if not bool(torch.isfinite(targets).all()):
            raise ValueError("`targets` of dense regression guidance hold NaN or inf values.")
