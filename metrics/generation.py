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
        return {name: dim_zero_cat(getattr(self, name)) for name in self.names if getattr(self, name)}

    @property
    def count(self) -> int:
        first = getattr(self, self.names[0])
        return sum(len(values) for values in first) if isinstance(first, list) else len(first)


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
    under DDP, from all processes' samples together. Images are (B, C, H, W) in [-1, 1]. FID depends on the
    number of samples: compare rows of equal size.

    Args:
        evaluator: a classifier with `features_and_logits()` (a `TimmClassifier`); frozen here.
        num_classes: number of classes.
    """

    def __init__(self, evaluator: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.evaluator = evaluator.eval().requires_grad_(False)
        self.num_classes = num_classes
        self.real = Records("features")
        self.generated = Records("features", "logits", "targets")

    def train(self, mode: bool = True) -> "GenerationMetrics":
        return super().train(False)  # the evaluator always runs in eval mode

    @torch.no_grad()
    def update_real(self, images: torch.Tensor) -> None:
        self.real.update(features=self.evaluator.features_and_logits(images)[0])

    @torch.no_grad()
    def update_generated(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        features, logits = self.evaluator.features_and_logits(images)
        targets = torch.full((len(images),), -1, device=images.device) if targets is None else targets
        self.generated.update(features=features, logits=logits, targets=targets.to(images.device).long())

    def compute(self) -> dict[str, float]:
        generated = self.generated.compute()
        probabilities = generated["logits"].softmax(-1)
        results = {"evaluator_confidence": float(probabilities.max(-1).values.mean()), "inception_score": inception_score(probabilities)}
        real = self.real.compute()
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
