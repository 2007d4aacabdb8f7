"""The scores of one evaluation of guided samples: generation metrics, and map scores for samples guided to maps."""

from __future__ import annotations

import torch
from torch import nn

from plugguide.metrics.dense import DenseMapMetrics, MapKind
from plugguide.metrics.generation import GenerationMetrics


class GuidedSampleScores(nn.Module):
    """`GenerationMetrics` of guided samples and, for samples guided toward target maps, their `DenseMapMetrics`.

    The one scorer of `lightning test` (`ExpertDistillation`) and `lightning predict` (`GuidedSampling`): each batch
    of samples is recorded with its target classes and global indices (each sample counted once under DDP), and with
    the target maps it was guided toward, if any; `compute` returns both sets of scores in one dict.

    Args:
        generation (`GenerationMetrics`): the evaluator and feature spaces that score every sample.
        map_kind (`str`, *optional*, defaults to `None`): "segmentation" or "depth", how target maps are scored; None
            picks it at the first batch with maps, from their dtype (label maps: segmentation, real-valued: depth).
    """

    def __init__(self, generation: GenerationMetrics, map_kind: MapKind | None = None) -> None:
        super().__init__()
        self.generation = generation
        self.maps = DenseMapMetrics(map_kind, generation.evaluator) if map_kind is not None else None

    @classmethod
    def from_paths(
        cls, evaluator_path: str, autoencoder_path: str | None = None, map_kind: MapKind | None = None
    ) -> GuidedSampleScores:
        """A saved evaluator and an optional `AutoencoderKL` feature space (`GenerationMetrics.from_paths`)."""
        return cls(GenerationMetrics.from_paths(evaluator_path, autoencoder_path), map_kind)

    @property
    def evaluator(self) -> nn.Module:
        return self.generation.evaluator

    @property
    def num_classes(self) -> int:
        return self.generation.num_classes

    def update_real(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, indices: torch.Tensor | None = None
    ) -> None:
        """Records real reference images (FID, KID, precision/recall, diversity are measured against them)."""
        self.generation.update_real(images, labels, indices)

    def update(
        self,
        images: torch.Tensor,
        targets: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
        target_maps: torch.Tensor | None = None,
    ) -> None:
        """Records generated images with their target classes, global indices and, if guided to maps, those maps."""
        self.generation.update_generated(images, targets, indices)
        if target_maps is None:
            return
        if self.maps is None:
            kind = "depth" if target_maps.is_floating_point() else "segmentation"
            self.maps = DenseMapMetrics(kind, self.generation.evaluator).to(images.device)
        self.maps.update(images, target_maps, indices)

    def compute(self) -> dict[str, float]:
        """Every generation score, and every map score once maps were recorded."""
        return self.generation.compute() | (self.maps.compute() if self.maps is not None else {})

    def reset(self) -> None:
        """Forgets the generated samples (and their map scores); the real reference set stays."""
        self.generation.reset()
        if self.maps is not None:
            self.maps.reset()
