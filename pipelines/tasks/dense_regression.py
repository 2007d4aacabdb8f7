"""Dense regression, such as monocular depth (PPAP guiding GLIDE with MiDaS, Sec. 5.2)."""

from __future__ import annotations

import math
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

    Targets are refused outside `target_range`, the values the regressor predicts: a map it cannot produce asks for
    no image, and its gradient, 2 (prediction - target) per pixel, grows with the distance. Whatever the range, a
    target whose squared error over the map would overflow float32 is refused (`overflow_bound`): the gradient would
    be inf, and the error would blame the guidance scale.

    Args:
        loss (`RegressionLoss`, defaults to 'mse'): "mse" or "ssi".
        target_range (`tuple[float, float]`, *optional*): the lowest and highest value a target map may hold, the range
            of the regressor's maps: for the digits' depth stand-in, distances in pixels from 0 to the image's diagonal
            (`metrics.pixel_maps.distance_to_stroke`), less the regressor's error; for MiDaS's relative inverse depth,
            0 up (its head ends in a ReLU). None: any value below `overflow_bound` (a regressor's range is a fact
            about the regressor, which neither the task nor its saved config states).
    """

    label_key = "depth"

    def __init__(self, loss: RegressionLoss = "mse", target_range: tuple[float, float] | None = None) -> None:
        if loss not in ("mse", "ssi"):
            raise ValueError(f"Expected `loss` to be 'mse' or 'ssi', but got {loss!r}.")
        if target_range is not None and not (len(target_range) == 2 and target_range[0] < target_range[1]):
            raise ValueError(f"Expected `target_range` to be (low, high) with low < high, but got {target_range}.")
        self.loss = loss
        self.target_range = None if target_range is None else (float(target_range[0]), float(target_range[1]))

    @staticmethod
    def overflow_bound(map_shape: tuple[int, ...]) -> float:
        """The largest |target| whose squared error, summed over a map of `map_shape`, float32 holds with room to spare
        (a tenth of its largest value): sqrt(max / (10 H W))."""
        return math.sqrt(torch.finfo(torch.float32).max / (10 * math.prod(map_shape)))

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
        if not targets.numel():
            return
        bound = self.overflow_bound(tuple(targets.shape[1:]))
        range_low, range_high = self.target_range or (-math.inf, math.inf)
        low, high = max(range_low, -bound), min(range_high, bound)
        found_low, found_high = float(targets.min()), float(targets.max())
        if found_low < low or found_high > high:
            by_range = (found_low < low and range_low >= -bound) or (found_high > high and range_high <= bound)
            why = (
                f"`target_range`={list(self.target_range)}: the values the regressor predicts"
                if by_range
                else f"beyond +-{bound:.3g} the squared error over a {'x'.join(map(str, targets.shape[1:]))} map "
                "overflows float32"
            )
            raise ValueError(
                f"Expected `targets` of dense regression guidance to lie in [{low:.4g}, {high:.4g}] ({why}), but got "
                f"values from {found_low:.4g} to {found_high:.4g}."
            )
