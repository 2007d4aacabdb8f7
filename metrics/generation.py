"""Scores for generated images: an independent evaluator for the class, several feature spaces for the quality."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import prdc
import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.image.kid import poly_kernel
from torchmetrics.utilities import dim_zero_cat

from plugguide.metrics.feature_spaces import AutoencoderLatents, PooledPixels
from plugguide.models import load_classifier, load_vae


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
        return {name: dim_zero_cat(getattr(self, name)).cpu() for name in self.names if len(getattr(self, name))}


class ReferenceStatistics:
    """What every comparison with one real feature set reuses: its mean, covariance and mean kernel value.

    Computed once, so the bootstrap's resamples cost only the generated side.
    """

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features.double()
        self.mean = self.features.mean(0)
        self.cov = torch.cov(self.features.T)
        self.kernel_mean = off_diagonal_mean(poly_kernel(self.features, self.features))

    def frechet_distance(self, generated: torch.Tensor) -> float:
        """||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2)), in float64.

        The trace of the matrix square root is the sum of the square roots of the eigenvalues of S_r S_g, as
        torchmetrics' FID computes it; here on features already extracted, so one pass of each network serves
        every metric and the bootstrap resamples features, not images.
        """
        generated = generated.double()
        cov = torch.cov(generated.T)
        root_trace = torch.linalg.eigvals(self.cov @ cov).sqrt().real.sum()
        return float((self.mean - generated.mean(0)).square().sum() + self.cov.trace() + cov.trace() - 2 * root_trace)

    def kernel_distance(self, generated: torch.Tensor) -> float:
        """KID (Binkowski et al., 2018): the unbiased MMD^2 with torchmetrics' cubic polynomial kernel.

        Written out for sets of different sizes (torchmetrics' `maximum_mean_discrepancy` assumes equal ones);
        unbiased, so unlike FID its expectation does not depend on the number of samples.
        """
        generated = generated.double()
        cross = poly_kernel(self.features, generated).mean()
        return float(self.kernel_mean + off_diagonal_mean(poly_kernel(generated, generated)) - 2 * cross)


def off_diagonal_mean(kernel: torch.Tensor) -> torch.Tensor:
    n = kernel.shape[0]
    return (kernel.sum() - kernel.diagonal().sum()) / (n * (n - 1))


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
    """FID between two feature sets (N, D); see `ReferenceStatistics.frechet_distance`."""
    return ReferenceStatistics(real).frechet_distance(generated)


def kernel_distance(real: torch.Tensor, generated: torch.Tensor) -> float:
    """KID between two feature sets (N, D); see `ReferenceStatistics.kernel_distance`."""
    return ReferenceStatistics(real).kernel_distance(generated)


def inception_score(probabilities: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))), p(y) the mean prediction; with the evaluator's class probabilities (one split)."""
    probabilities = probabilities.double().clamp_min(1e-12)
    marginal = probabilities.mean(0, keepdim=True)
    return float((probabilities * (probabilities.log() - marginal.log())).sum(1).mean().exp())


def precision_recall_density_coverage(
    real: torch.Tensor, generated: torch.Tensor, nearest_k: int = 5
) -> dict[str, float]:
    """Fidelity (precision, density) and diversity (recall, coverage) of Kynkaanniemi et al. (2019) and Naeem et al. (2020).

    The authors' package `prdc` (k-nearest-neighbour balls around real and generated features).
    """
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes on every call
        scores = prdc.compute_prdc(real.float().numpy(), generated.float().numpy(), nearest_k)
    return {name: float(value) for name, value in scores.items()}


def within_class_spread(features: torch.Tensor, classes: torch.Tensor) -> dict[int, float]:
    """Mean pairwise L2 distance between features of the same class, per class with at least two members."""
    spread = {}
    for c in classes.unique().tolist():
        members = features[classes == c].double()
        if len(members) > 1:
            distances = torch.cdist(members, members)
            spread[c] = float(distances.sum() / (len(members) * (len(members) - 1)))
    return spread


def diversity_ratio(
    real: torch.Tensor, real_classes: torch.Tensor, generated: torch.Tensor, generated_classes: torch.Tensor
) -> float:
    """Within-class spread of the samples over that of real images of the same class, averaged over classes.

    1 means the samples of a class vary as much as real digits of that class; a collapse toward one
    prototype per class drives it toward 0, which FID on class features can miss.
    """
    real_spread = within_class_spread(real, real_classes)
    generated_spread = within_class_spread(generated, generated_classes)
    ratios = [generated_spread[c] / real_spread[c] for c in generated_spread if real_spread.get(c, 0) > 0]
    return float(np.mean(ratios)) if ratios else float("nan")


def nearest_distances(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """For each image, the L2 distance in pixels to its nearest reference image (both (N, C, H, W)).

    Computed pairwise rather than through the matrix-product expansion, whose rounding leaves a copy about 1e-3 away.
    """
    distances = torch.cdist(
        images.flatten(1).float(), references.flatten(1).float(), compute_mode="donot_use_mm_for_euclid_dist"
    )
    return distances.min(1).values


def median(values: torch.Tensor) -> torch.Tensor:
    """The median of the last dimension, halfway between the middle two values of an even count."""
    return torch.quantile(values.double(), 0.5, dim=-1)


def interval_around(
    estimate: float, resampled: list[float] | np.ndarray, floor: float = -math.inf
) -> tuple[float, float]:
    """A 95% interval: the bootstrap's spread placed around the estimate (see `GenerationMetrics.compute_intervals`).

    The estimate minus and plus the distances from the resamples' median to their 2.5% and 97.5% points, no lower
    than `floor`.
    """
    low, middle, high = np.percentile(resampled, [2.5, 50, 97.5])
    return max(floor, float(estimate - (middle - low))), float(estimate + (high - middle))


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (stays informative at 0 and 1, where a bootstrap collapses to a point)."""
    if total == 0:
        return float("nan"), float("nan")
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


DISTANCES = {"fid": ReferenceStatistics.frechet_distance, "kid": ReferenceStatistics.kernel_distance}


def resampling_draws(count: int, num_resamples: int, seed: int = 0) -> list[torch.Tensor]:
    """`num_resamples` bootstrap draws of `count` indices in [0, count), with replacement, from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, count, (count,), generator=generator) for _ in range(num_resamples)]


def distance_intervals(
    reference: ReferenceStatistics, generated: torch.Tensor, draws: list[torch.Tensor]
) -> dict[str, tuple[float, float]]:
    """{"fid": ..., "kid": ...}: each distance's `interval_around` its estimate, the generated features resampled by
    `draws` and the reference held fixed."""
    intervals = {}
    for name, distance in DISTANCES.items():
        resampled = [distance(reference, generated[draw]) for draw in draws]
        floor = 0.0 if name == "fid" else -math.inf  # FID is a squared distance; KID's unbiased estimate can be < 0
        intervals[name] = interval_around(distance(reference, generated), resampled, floor)
    return intervals


def median_interval(values: torch.Tensor, draws: list[torch.Tensor]) -> tuple[float, float]:
    """The median's `interval_around` its estimate, `values` resampled by `draws`."""
    resampled = median(torch.stack([values[draw] for draw in draws])).numpy()
    return interval_around(float(median(values)), resampled, 0.0)


class GenerationMetrics(nn.Module):
    """Everything the project reports about a set of generated images, judged by models that never guided them.

    Class (by the independent evaluator): `guided_accuracy` (agreement with the target class), with a 95%
    Wilson interval; `evaluator_confidence`; `inception_score` (exp E KL(p(y|x) || p(y))).
    Quality, in each feature space (`evaluator`: the evaluator's penultimate features; `pixels`: the image
    average-pooled to 8x8; plus any given, e.g. `autoencoder`), against the real reference images:
    - `fid_<space>` and `kid_<space>`, with 95% bootstrap intervals over the generated samples (`compute_intervals`);
    - `precision_<space>`, `recall_<space>`, `density_<space>`, `coverage_<space>` (fidelity and diversity apart);
    - `diversity_<space>`: within-class spread of the samples over that of real images of the same class
      (a sample's class is its target, or the evaluator's reading when it has none).
    Memorisation, given the images the scored models trained on (`training_images`; the real reference images must
    then be held out from them): `nearest_training_ratio`, the median over samples of the L2 distance in pixels to
    the nearest training image, over the same median for the real reference images, with a bootstrap interval, and
    `nearest_training_distance`, the samples' median itself. The data-copying comparison of Meehan et al. (2020),
    as a ratio of medians: 1 means the samples sit as far from the training images as new real images do; well
    below 1, they copy training images, which a distance to a reference set of real images can reward instead of
    catch.
    The evaluator's features miss artifacts that keep the class (it is trained to ignore them); the pixel and
    autoencoder spaces do not, which is why every table reports them beside it.

    Outputs are kept per sample (a few hundred floats each), so every number comes from one pass of each
    network and, under DDP, from all processes' samples together. Given each sample's global `indices` (its
    position in the test set or sampling targets), a sample counted by two processes counts once and the numbers
    do not depend on the number of processes (`unique_rows`). Images are (B, C, H, W) in [-1, 1].
    FID is biased by the sample count: compare rows of equal size (KID is not).

    Args:
        evaluator (`nn.Module`): a classifier with `features_and_logits()` (a `TimmClassifier`); frozen here.
        num_classes (`int`): number of classes.
        feature_spaces (`dict[str, nn.Module]`, *optional*): extra named feature extractors (images -> (B, D)), e.g.
            {"autoencoder": AutoencoderLatents(vae)}; `evaluator` and `pixels` are always measured.
        nearest_k (`int`, defaults to 5): k of precision/recall/density/coverage.
        training_images (`torch.Tensor`, *optional*): (N, C, H, W) images the scored models trained on, in [-1, 1]
            at the size of the scored images; given, every recorded image gets its distance to the nearest of them.
    """

    def __init__(
        self,
        evaluator: nn.Module,
        num_classes: int,
        feature_spaces: dict[str, nn.Module] | None = None,
        nearest_k: int = 5,
        training_images: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.evaluator = evaluator.eval().requires_grad_(False)
        self.num_classes = num_classes
        self.nearest_k = nearest_k
        self.spaces = nn.ModuleDict({"pixels": PooledPixels(8), **(feature_spaces or {})})
        names = ["evaluator", *self.spaces]
        self.space_names = names
        self.real = Records(*names, "labels", "index", "nearest_training")
        self.generated = Records(*names, "logits", "targets", "index", "nearest_training")
        # A buffer, so that it follows the module to its device; not saved with a checkpoint of a module holding this.
        self.register_buffer("training_images", training_images, persistent=False)

    @classmethod
    def from_paths(
        cls, evaluator_path: str, autoencoder_path: str | None = None, training_images: torch.Tensor | None = None
    ) -> "GenerationMetrics":
        """The evaluator (a saved `TimmClassifier`) and, if given, an `AutoencoderKL` as the `autoencoder` space.

        `training_images`: see the class's Args.
        """
        evaluator = load_classifier(evaluator_path, "evaluator_path")
        spaces = (
            {"autoencoder": AutoencoderLatents(load_vae(autoencoder_path, "autoencoder_path"))}
            if autoencoder_path
            else {}
        )
        return cls(evaluator, evaluator.num_classes, spaces, training_images=training_images)

    def train(self, mode: bool = True) -> "GenerationMetrics":
        return super().train(False)  # the networks always run in eval mode

    def features(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(features in every space, plus the distance to the nearest training image when those were given; logits)."""
        if self.training_images is not None and images.shape[1:] != self.training_images.shape[1:]:
            raise ValueError(
                f"Expected images of the shape of `training_images` {tuple(self.training_images.shape[1:])}, "
                f"but got {tuple(images.shape[1:])}."
            )
        evaluator_features, logits = self.evaluator.features_and_logits(images)
        features = {"evaluator": evaluator_features, **{name: space(images) for name, space in self.spaces.items()}}
        if self.training_images is not None:
            features["nearest_training"] = nearest_distances(images, self.training_images)
        return features, logits

    @staticmethod
    def _indices(images: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        return (
            torch.full((len(images),), -1, device=images.device)
            if indices is None
            else torch.as_tensor(indices, device=images.device).long()
        )

    @torch.no_grad()
    def update_real(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, indices: torch.Tensor | None = None
    ) -> None:
        features, logits = self.features(images)
        labels = logits.argmax(-1) if labels is None else labels.to(images.device).long()
        self.real.update(**features, labels=labels, index=self._indices(images, indices))

    @torch.no_grad()
    def update_generated(
        self, images: torch.Tensor, targets: torch.Tensor | None = None, indices: torch.Tensor | None = None
    ) -> None:
        features, logits = self.features(images)
        targets = (
            torch.full((len(images),), -1, device=images.device)
            if targets is None
            else targets.to(images.device).long()
        )
        self.generated.update(**features, logits=logits, targets=targets, index=self._indices(images, indices))

    def records(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(real, generated) per-sample records, each sample once (see `unique_rows`)."""
        real, generated = self.real.compute(), self.generated.compute()
        return (unique_rows(real) if real else {}), unique_rows(generated)

    def compute(self) -> dict[str, float]:
        """Point estimates of every metric (see the class docstring)."""
        real, generated = self.records()
        probabilities = generated["logits"].softmax(-1)
        targets = generated["targets"]
        results = {
            "num_samples": float(len(targets)),
            "evaluator_confidence": float(probabilities.max(-1).values.mean()),
            "inception_score": inception_score(probabilities),
        }
        if bool((targets >= 0).all()):
            results["guided_accuracy"] = float((probabilities.argmax(-1) == targets).float().mean())
        if len(real.get("labels", ())) < 2 or len(targets) < 2:
            return results
        classes = torch.where(targets >= 0, targets, probabilities.argmax(-1))
        for space in self.space_names:
            reference = ReferenceStatistics(real[space])
            for name, distance in DISTANCES.items():
                results[f"{name}_{space}"] = distance(reference, generated[space])
            if min(len(real[space]), len(generated[space])) > self.nearest_k:  # k-NN balls need more than k points
                results |= {
                    f"{k}_{space}": v
                    for k, v in precision_recall_density_coverage(
                        real[space], generated[space], self.nearest_k
                    ).items()
                }
            results[f"diversity_{space}"] = diversity_ratio(real[space], real["labels"], generated[space], classes)
        if "nearest_training" in real:
            samples = median(generated["nearest_training"])
            results["nearest_training_distance"] = float(samples)
            results["nearest_training_ratio"] = float(samples / median(real["nearest_training"]))
        return results

    def compute_intervals(self, num_resamples: int = 200, seed: int = 0) -> dict[str, tuple[float, float]]:
        """95% intervals: Wilson for `guided_accuracy`; for FID and KID, the bootstrap's spread placed around the estimate.

        The real reference set stays fixed (it is the population compared against); the generated samples are
        the random draw, resampled with replacement `num_resamples` times. A resample repeats samples, which
        raises FID by about as much as its own finite-sample bias, so the raw percentile interval sits above the
        estimate (on held-out real digits it can even exclude it). The interval kept is the estimate minus and plus
        the distances from the bootstrap median to its 2.5% and 97.5% points: how far the number moves with
        other seeds at the same sample count, the noise that matters when rows of equal size are compared; the
        reference's own sampling variation, shared by every row, is not in it (docs/metrics.md gives its measured
        coverage, `scripts/interval_coverage.py`).
        """
        real, generated = self.records()
        targets = generated["targets"]
        intervals = {}
        if bool((targets >= 0).all()):
            correct = int((generated["logits"].argmax(-1) == targets).sum())
            intervals["guided_accuracy"] = wilson_interval(correct, len(targets))
        if len(real.get("labels", ())) < 2 or len(targets) < 2:
            return intervals
        draws = resampling_draws(len(targets), num_resamples, seed)
        for space in self.space_names:
            for name, interval in distance_intervals(
                ReferenceStatistics(real[space]), generated[space], draws
            ).items():
                intervals[f"{name}_{space}"] = interval
        if "nearest_training" in real:
            held_out = float(median(real["nearest_training"]))
            low, high = median_interval(generated["nearest_training"], draws)
            intervals["nearest_training_distance"] = (low, high)
            intervals["nearest_training_ratio"] = (low / held_out, high / held_out)
        return intervals

    def reset(self) -> None:
        """Forgets the generated samples; the real reference set stays."""
        self.generated.reset()
