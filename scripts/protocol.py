"""The measurement protocol every results table follows, so rows of different tables mean the same thing.

docs/metrics.md states it once ("Table protocol"): the 359 held-out test digits as the reference, sample i of a row
seeded with i, the scores of `plugguide.metrics.GenerationMetrics` with their intervals, and the best-scale rule
(`plugguide.metrics.reporting.BEST_SCALE_RULE`). Each table's caption (`describe`) links there and names only what the
table sets itself.
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


# The protocol's section in docs/metrics.md, linked from docs/results/ where every table is written.
PROTOCOL_LINK = "[table protocol](../metrics.md#table-protocol)"


def describe(num_samples: int, sampler: str) -> str:
    """A table's one-line caption: a link to the protocol, stated once in docs/metrics.md, and what this table sets
    itself: its sampler (with its steps) and its samples per row.

    Args:
        num_samples (int): samples per row (`samples_per_class` times the number of classes).
        sampler (str): the sampler and its steps as the table names them, e.g. "DDPM-50 (ancestral, mean shift)".
    """
    return f"{PROTOCOL_LINK}: {sampler}, {num_samples} samples per row."
