"""The measurement protocol every results table follows, so rows of different tables mean the same thing.

- Reference set: the 359 held-out test digits of `DigitsDataModule`'s fixed split, upsampled to 16x16 exactly as
  every model's training data (`split_images("test")`; the thick-stroke base uses its own, same split). No shipped
  model trained on them or picked a checkpoint by them, so a model that copies its training digits gains nothing.
- Samples: `--samples-per-class` per class (default 50: 500 per row), sample i seeded with i, so every row of a
  table starts from the same noise.
- Scores (`plugguide.metrics.GenerationMetrics`): guided accuracy by the independent evaluator (Wilson 95%
  interval); FID and KID in three feature spaces (autoencoder latents, 8x8-pooled pixels, evaluator features)
  with bootstrap 95% intervals; precision/recall (autoencoder) and within-class diversity (pixels); the memorisation
  check `nearest_training_ratio` against the 1,258 training digits (median distance to the nearest training digit,
  samples over held-out digits: 1 = as far as new real digits, near 0 = copies).
- Best scale of a guided row: `plugguide.metrics.reporting.BEST_SCALE_RULE`.
- A grid of the first samples of each class is saved beside every row's numbers, to look at.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch
from torchvision.utils import save_image

from plugguide.datamodules import DigitsDataModule
from plugguide.metrics import GenerationMetrics
from plugguide.metrics.reporting import estimate
from plugguide.pipelines import sample_batch

EVALUATOR = "assets/digits/evaluator"
AUTOENCODER = "assets/digits/autoencoder"

QUALITY_HEADERS = [
    "guided accuracy",
    "FID autoencoder",
    "FID pixels",
    "FID evaluator",
    "KID autoencoder (x1e3)",
    "precision / recall (autoencoder)",
    "diversity (pixels)",
    "nearest-training distance (samples / held-out)",
]
# The digits no shipped model trained on (`train`) or picked its checkpoint by (`val`).
REFERENCE_SPLIT = "test"


def reference_metrics(datamodule: DigitsDataModule | None = None) -> GenerationMetrics:
    """`GenerationMetrics` with the evaluator, the autoencoder space, the reference set and the training digits loaded.

    Args:
        datamodule (`DigitsDataModule`, *optional*): whose `REFERENCE_SPLIT` is the reference set and whose `train`
            split the training digits of the memorisation check; defaults to `DigitsDataModule()`.
    """
    datamodule = datamodule or DigitsDataModule()
    metrics = GenerationMetrics.from_paths(EVALUATOR, AUTOENCODER, datamodule.split_images("train")[0])
    metrics.update_real(*datamodule.split_images(REFERENCE_SPLIT))
    return metrics


def targets(samples_per_class: int, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, seeds): `samples_per_class` of each class in order, sample i seeded with i."""
    labels = torch.arange(num_classes).repeat_interleave(samples_per_class)
    return labels, torch.arange(len(labels))


def pipeline_sampler(pipeline, **call_kwargs) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`sample(labels, seeds)` for `measure`: `sample_batch` of `pipeline` (a generator per sample, seeded with its
    seed) with `call_kwargs` (`num_inference_steps`, `classifier_scale`, `guidance_scale`, ...)."""
    return lambda labels, seeds: sample_batch(pipeline, {"label": labels, "seed": seeds}, **call_kwargs)


def measure(
    metrics: GenerationMetrics,
    sample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    seeds: torch.Tensor,
    batch_size: int = 250,
    grid_path: str | None = None,
    on_images: Callable[[torch.Tensor], dict] | None = None,
) -> dict:
    """Samples every (label, seed) with `sample(labels, seeds) -> images in [-1, 1]` and scores them.

    Returns the point estimates, their `intervals`, `seconds_per_image` (sampling only) and, with `grid_path`,
    writes a grid of the first 8 samples of each class there. `on_images`, given every image of the row in sample
    order, returns more results (with their own `intervals`), e.g. the dense tables' map scores.
    """
    metrics.reset()
    started, images = time.perf_counter(), []
    for start in range(0, len(labels), batch_size):
        images.append(sample(labels[start : start + batch_size], seeds[start : start + batch_size]).cpu())
    seconds = time.perf_counter() - started
    images = torch.cat(images)
    for start in range(0, len(images), 500):
        metrics.update_generated(images[start : start + 500], labels[start : start + 500])
    results = metrics.compute() | {
        "intervals": metrics.compute_intervals(),
        "seconds_per_image": seconds / len(labels),
    }
    if on_images is not None:
        extra = on_images(images)
        results |= {key: value for key, value in extra.items() if key != "intervals"}
        results["intervals"] |= extra.get("intervals", {})
    if grid_path:
        os.makedirs(os.path.dirname(os.path.abspath(grid_path)), exist_ok=True)
        first = torch.cat([torch.nonzero(labels == c).flatten()[:8] for c in labels.unique()])
        save_image(images[first] / 2 + 0.5, grid_path, nrow=8, padding=1, pad_value=1.0)
    return results


def slug(text: str) -> str:
    """`text` as a file name: every character other than letters, digits, '-' and '_' becomes '_'."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text).strip("_")


def quality_cells(results: dict) -> list[str]:
    """The cells under `QUALITY_HEADERS` for one measured row."""
    return [
        estimate(results, "guided_accuracy", 3),
        estimate(results, "fid_autoencoder"),
        estimate(results, "fid_pixels"),
        estimate(results, "fid_evaluator"),
        estimate(results, "kid_autoencoder", 1, scale=1e3),
        f"{results['precision_autoencoder']:.2f} / {results['recall_autoencoder']:.2f}",
        f"{results['diversity_pixels']:.2f}",
        estimate(results, "nearest_training_ratio"),
    ]


def describe(num_samples: int, sampler: str) -> str:
    return (
        f"{sampler}, {num_samples} samples per row ({num_samples // 10} per class, seeds 0..{num_samples - 1}, the same for every row); "
        "accuracy by the independent evaluator (assets/digits/evaluator) with a 95% Wilson interval; FID/KID against "
        "the 359 held-out test digits at 16x16 (no model trained on them or picked a checkpoint by them) with 95% "
        "bootstrap intervals, in the latents of assets/digits/autoencoder, in 8x8-pooled pixels and in the "
        "evaluator's features; precision/recall (k = 5) in the autoencoder space; diversity = within-class spread of "
        "the samples over that of real digits of the class, in pixels (1 = as varied as real digits); "
        "nearest-training distance = median L2 pixel distance from each sample to its nearest training digit (the "
        "1,258 of the train split) over the same median for the held-out digits, with a 95% bootstrap interval (1 = "
        "as far from the training digits as new real digits; near 0 = copies of them)."
    )
