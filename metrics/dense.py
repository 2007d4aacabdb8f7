"""Scores for samples guided toward target maps, read off their pixels and judged against the maps."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn
from torchmetrics.functional import pearson_corrcoef
from torchmetrics.functional.segmentation import mean_iou

from plugguide.metrics.generation import Records, unique_rows
from plugguide.metrics.pixel_maps import (
    BACKGROUND,
    NUM_SEGMENTATION_CLASSES,
    digit_segmentation,
    distance_to_stroke,
    stroke_mask,
)

MapKind = Literal["segmentation", "depth"]
SCORES = {"segmentation": ("miou", "stroke_iou"), "depth": ("depth_mae", "depth_rmse", "depth_correlation")}


def map_correlation(maps: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(B,) Pearson correlation of each map with its reference (torchmetrics, one column per sample); 0 where either
    is constant (a sample without strokes), which correlates with nothing."""
    return pearson_corrcoef(maps.flatten(1).T.double(), references.flatten(1).T.double()).nan_to_num(0.0).float()


class DenseMapMetrics(nn.Module):
    """How well each sample matches the target map it was guided toward, from the sample's pixels alone.

    The guide never scores: its gradients can be adversarial, so a sample's own map is computed
    from its pixels with the definitions that made the dense models' training labels (`metrics.pixel_maps`).
    - "segmentation": the sample's strokes (pixels above mid-grey), each labelled 1 + the evaluator's reading of the
      whole image; `miou` is the per-sample mean IoU over the classes in either map (background included; torchmetrics'
      `mean_iou`), `stroke_iou` the IoU of the sample's strokes with the target map's non-background pixels.
    - "depth": the sample's distance-to-stroke map; `depth_mae` and `depth_rmse` in pixels against the target map,
      `depth_correlation` the per-sample Pearson correlation (blind to the target model's scale and shift).
    Every score is a mean over samples, kept per sample (each counted once under DDP, `unique_rows`), with a 95%
    bootstrap interval.

    Args:
        kind (`str`): "segmentation" or "depth".
        evaluator (`nn.Module`, *optional*): the independent classifier that reads each sample's digit (segmentation
            only).
    """

    def __init__(self, kind: MapKind, evaluator: nn.Module | None = None) -> None:
        super().__init__()
        if kind not in SCORES:
            raise ValueError(f"Expected `kind` to be one of {tuple(SCORES)}, but got {kind!r}.")
        if kind == "segmentation" and evaluator is None:
            raise ValueError(
                "Segmentation scores label each sample's strokes with the evaluator's reading: give `evaluator`."
            )
        self.kind = kind
        self.evaluator = evaluator.eval().requires_grad_(False) if evaluator is not None else None
        self.records = Records(*SCORES[kind], "index")

    def train(self, mode: bool = True) -> "DenseMapMetrics":
        return super().train(False)

    def sample_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The maps of the samples themselves: labelled strokes, or distances to them."""
        if self.kind == "depth":
            return distance_to_stroke(images)
        return digit_segmentation(images, self.evaluator(images).argmax(-1))

    @torch.no_grad()
    def scores(self, images: torch.Tensor, target_maps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every score of each sample against its target map, (B,) each; nothing recorded."""
        maps, targets = self.sample_maps(images), target_maps.to(images.device)
        if self.kind == "segmentation":
            strokes, target_strokes = stroke_mask(images).flatten(1), (targets != BACKGROUND).flatten(1)
            union, overlap = (strokes | target_strokes).sum(1), (strokes & target_strokes).sum(1)
            return {
                "miou": mean_iou(maps, targets.long(), num_classes=NUM_SEGMENTATION_CLASSES, input_format="index"),
                "stroke_iou": torch.where(union > 0, overlap / union.clamp_min(1), 1.0),  # two empty maps agree
            }
        error = (maps - targets).flatten(1)
        return {
            "depth_mae": error.abs().mean(1),
            "depth_rmse": error.square().mean(1).sqrt(),
            "depth_correlation": map_correlation(maps, targets),
        }

    def update(self, images: torch.Tensor, target_maps: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        index = (
            torch.full((len(images),), -1, device=images.device)
            if indices is None
            else torch.as_tensor(indices, device=images.device).long()
        )
        self.records.update(**self.scores(images, target_maps), index=index)

    def per_sample(self) -> dict[str, torch.Tensor]:
        return unique_rows(self.records.compute())

    def compute(self) -> dict[str, float]:
        return {name: float(values.float().mean()) for name, values in self.per_sample().items() if name != "index"}

    def compute_intervals(self, num_resamples: int = 200, seed: int = 0) -> dict[str, tuple[float, float]]:
        """95% bootstrap percentile intervals of each mean score, resampling the samples."""
        rows = self.per_sample()
        generator = torch.Generator().manual_seed(seed)
        count = len(rows["index"])
        draws = [torch.randint(0, count, (count,), generator=generator) for _ in range(num_resamples)]
        intervals = {}
        for name in SCORES[self.kind]:
            means = [float(rows[name][draw].float().mean()) for draw in draws]
            low, high = np.percentile(means, [2.5, 97.5])
            intervals[name] = (float(low), float(high))
        return intervals

    def reset(self) -> None:
        self.records.reset()
