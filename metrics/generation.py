"""Scores for generated images, all from an independent evaluator classifier (never the guiding model)."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class Records(Metric):
    """Per-sample rows (any named tensors), concatenated over batches and, under DDP, over processes."""

    full_state_update = False

    def __init__(self, *names: str) -> None:
        super().__init__(sync_on_compute=True)
        self.names = names
        for name in names:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, **rows: torch.Tensor) -> None:
        for name, values in rows.items():
            getattr(self, name).append(values.detach().float() if values.is_floating_point() else values.detach())

    def compute(self) -> dict[str, torch.Tensor]:
        # A list of batches here, one tensor after a DDP sync: either way empty when nothing was recorded.
        return {name: dim_zero_cat(getattr(self, name)) for name in self.names if len(getattr(self, name))}

    @property
    def count(self) -> int:
        first = getattr(self, self.names[0])
        return sum(len(values) for values in first) if isinstance(first, list) else len(first)


def unique_rows(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Records in the order of their `index`, each index once; rows without one (index -1) are all kept, first.

    Lightning's DistributedSampler pads the last batch of every process with repeated samples, and the processes'
    records arrive rank after rank: without this a test on 2 devices scores 360 images for 359, and its numbers
    depend on the device count through the order of floating-point sums.
    """
    index = rows["index"]
    order = torch.sort(index, stable=True).indices
    ordered = index[order]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    keep = order[first | (ordered < 0)]
    return {name: values[keep] for name, values in rows.items()}


def frechet_distance(real: torch.Tensor, generated: torch.Tensor) -> float:
    """||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2)) between two feature sets (N, D), in float64.

    The trace of the matrix square root is the sum of the square roots of the eigenvalues of S_r S_g, as
    torchmetrics' FID computes it; here on features already extracted, so one set of evaluator features
    serves FID, accuracy and the Inception-style score.
    """
    real, generated = real.double(), generated.double()
    mean_term = (real.mean(0) - generated.mean(0)).square().sum()
    cov_real, cov_generated = torch.cov(real.T), torch.cov(generated.T)
    root_trace = torch.linalg.eigvals(cov_real @ cov_generated).sqrt().real.sum()
    return float(mean_term + cov_real.trace() + cov_generated.trace() - 2 * root_trace)


def inception_score(probabilities: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))), p(y) the mean prediction; with the evaluator's class probabilities (one split)."""
    probabilities = probabilities.double().clamp_min(1e-12)
    marginal = probabilities.mean(0, keepdim=True)
    return float((probabilities * (probabilities.log() - marginal.log())).sum(1).mean().exp())


class GenerationMetrics(nn.Module):
    """Guided accuracy, FID, an Inception-Score-style score and the evaluator's confidence on generated images.

    - `guided_accuracy`: evaluator top-1 agreement with the target class.
    - `fid`: Frechet distance between evaluator features (penultimate layer) of generated and real images.
    - `inception_score`: exp(E KL(p(y|x) || p(y))) with the evaluator's class probabilities.
    - `evaluator_confidence`: mean max-probability of the evaluator on generated images.

    Evaluator outputs are kept per sample (a few floats each), so every number comes from the same pass and,
    under DDP, from all processes' samples together. Given each sample's global `indices` (its position in the
    test set or sampling targets), a sample counted by two processes counts once and the numbers do not depend
    on the number of processes (`unique_rows`). Images are (B, C, H, W) in [-1, 1]. FID depends on the number
    of samples: compare rows of equal size.

    Args:
        evaluator: a classifier with `features_and_logits()` (a `TimmClassifier`); frozen here.
        num_classes: number of classes.
    """

    def __init__(self, evaluator: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.evaluator = evaluator.eval().requires_grad_(False)
        self.num_classes = num_classes
        self.real = Records("features", "index")
        self.generated = Records("features", "logits", "targets", "index")

    def train(self, mode: bool = True) -> "GenerationMetrics":
        return super().train(False)  # the evaluator always runs in eval mode

    @staticmethod
    def _indices(images: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        return torch.full((len(images),), -1, device=images.device) if indices is None else torch.as_tensor(indices, device=images.device).long()

    @torch.no_grad()
    def update_real(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        self.real.update(features=self.evaluator.features_and_logits(images)[0], index=self._indices(images, indices))

    @torch.no_grad()
    def update_generated(self, images: torch.Tensor, targets: torch.Tensor | None = None, indices: torch.Tensor | None = None) -> None:
        features, logits = self.evaluator.features_and_logits(images)
        targets = torch.full((len(images),), -1, device=images.device) if targets is None else targets
        self.generated.update(features=features, logits=logits, targets=targets.to(images.device).long(), index=self._indices(images, indices))

    def compute(self) -> dict[str, float]:
        generated = unique_rows(self.generated.compute())
        probabilities = generated["logits"].softmax(-1)
        results = {"evaluator_confidence": float(probabilities.max(-1).values.mean()), "inception_score": inception_score(probabilities)}
        real = self.real.compute()
        real = unique_rows(real) if real else {}
        if len(real.get("features", ())) > 1 and len(generated["features"]) > 1:
            results["fid"] = frechet_distance(real["features"], generated["features"])
        targets = generated["targets"]
        if bool((targets >= 0).all()):
            results["guided_accuracy"] = float((probabilities.argmax(-1) == targets).float().mean())
        return results

    def reset(self) -> None:
        self.generated.reset()

    def reset_real(self) -> None:
        self.real.reset()
