"""The rows of the training-free page: each method, how it is built from a setting, what the search varies, its cost.

Shared by `scripts/search_training_free.py` (which searches each row's `axes`), `scripts/training_free_table.py`
(which samples each row at its searched setting) and `benchmarks/training_free.py` (which times them), so the three
build the very same guidance. A setting is `{name: value}`: `classifier_scale` goes to the pipeline's call, every
other name to the row's constructor (`Row.build`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from protocol import pipeline_sampler
from sampler_table import SAMPLERS

from plugguide.datamodules import EmbeddingTargetDataModule
from plugguide.metrics import DenseMapMetrics
from plugguide.models import load_scheduler
from plugguide.pipelines import GuidedDiffusionPipeline, sample_batch
from plugguide.pipelines.guidance import (
    DPS,
    LGD,
    MPGD,
    TFG,
    UGD,
    CalibratedGuidance,
    DistilledGuidance,
    ExpertGuidance,
    FreeDoM,
    Guidance,
)
from plugguide.pipelines.tasks import SegmentationTask
from plugguide.pipelines.training_free_cost import TrainingFreeCost, training_free_cost

ASSETS = "assets/digits"
RESNET = f"{ASSETS}/classifier-resnet"
EMBEDDER = f"{ASSETS}/embedder"
# The main job's experts and the 32-step guide distilled from them (docs/results/guidance_distillation.md).
EXPERTS = "runs/ppap/version_0/experts"
DISTILLED = "runs/guidance-distillation/version_0/guides/shift/steps-32"
SEARCHED_SAMPLERS = ("DDPM-50", "DDIM-25")


@dataclass(frozen=True)
class SearchAxis:
    """One searched parameter of a row: TFG's `init_x`, `factor_x`, `max_x`.

    Args:
        init (`float`): the smallest value, where the search starts.
        factor (`float`, defaults to 2.0): a child multiplies the value by it (TFG: 2 for rho, mu and strengths, 10
            for sigma).
        max (`float`, defaults to 8.0): values are capped here.
    """

    init: float
    factor: float = 2.0
    max: float = 8.0

    def __post_init__(self) -> None:
        if not 0 < self.init <= self.max or self.factor <= 1:
            raise ValueError(
                f"Expected 0 < `init` <= `max` and `factor` > 1, but got init={self.init}, factor={self.factor}, "
                f"max={self.max}."
            )

    def child(self, value: float) -> float:
        """`value` times the factor, capped; rounded to 12 digits, so 0.001 * 10 is the 0.01 a JSON file holds."""
        return float(f"{min(value * self.factor, self.max):.12g}")


@dataclass(frozen=True)
class Row:
    """One method of the page.

    Args:
        build (`Callable[..., Guidance | None]`): the constructor settings -> a fresh guidance (None: unguided).
        axes (`dict[str, SearchAxis]`): what the search varies (empty: nothing to search).
        fixed (`dict`): settings held fixed (e.g. `classifier_scale` 1 where the row's own strengths are searched).
        cost (`Callable[[Guidance | None, int], TrainingFreeCost]`): calls per sample of a run of N steps.
        available (`Callable[[], str | None]`): None where the row can run, else why not (a missing run folder).
        embeddings (`Callable[[], torch.Tensor] | None`): for an embedding guide, the (classes, D) target embedding of
            each class; sample i is guided toward the row of its label.
    """

    build: Callable[..., Guidance | None]
    axes: dict[str, SearchAxis] = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    cost: Callable[[Guidance | None, int], TrainingFreeCost] = training_free_cost
    available: Callable[[], str | None] = lambda: None
    embeddings: Callable[[], torch.Tensor] | None = None


def gradient_cost(guidance: Guidance | None, steps: int) -> TrainingFreeCost:
    """One denoiser pass per step; a gradient guide one forward and one backward through its model (none unguided)."""
    calls = 0 if guidance is None else steps
    return TrainingFreeCost(denoiser_forwards=steps, denoiser_backwards=0, guide_forwards=calls, guide_backwards=calls)


def distilled_cost(guidance: Guidance | None, steps: int) -> TrainingFreeCost:
    """One denoiser pass and one pass of the distilled guide per step, no backward pass."""
    return TrainingFreeCost(denoiser_forwards=steps, denoiser_backwards=0, guide_forwards=steps, guide_backwards=0)


def missing(path: str, how: str) -> Callable[[], str | None]:
    return lambda: None if os.path.isdir(path) else f"{path} is missing ({how})"


# The pipeline's strength s of a preset: TFG's searching.py sweeps one `guidance_strength` for every method but TFG.
STRENGTH = {"classifier_scale": SearchAxis(0.5, 2.0, 16.0)}
# TFG's own three, with the pipeline's s = 1: rho and mu in the project's units (a multiple of the log-likelihood's
# gradient in the score, and of it in the x0_hat step), sigma in pixels; factors and the sigma range as TFG's scripts.
# mu starts 4x below TFG's 0.25: with 4 ascent steps, mu = 0.25 already takes the validation FID past the unguided
# interval on DDIM-25, and the search only moves up.
TFG_AXES = {
    "rho": SearchAxis(0.25, 2.0, 16.0),
    "mu": SearchAxis(0.0625, 2.0, 16.0),
    "sigma": SearchAxis(0.001, 10.0, 1.0),
}
# TFG's label-guidance script: 4 ascent steps on x0_hat, strengths increasing and smoothing decreasing over the run.
TFG_FIXED = dict(iterations=4, rho_schedule="increase", mu_schedule="increase", sigma_schedule="decrease")


# A map's log-likelihood sums over its pixels (256 on the digits), so its gradient is about that many times a
# classifier's and the useful strengths are far lower (docs/results/dense.md sweeps 0.01-3): a dense search starts
# 200 times lower. DPS divides by the loss, which takes the sum out, and keeps the classifier's range.
DENSE_STRENGTH = {"classifier_scale": SearchAxis(0.0025, 2.0, 16.0)}
DENSE_TFG_AXES = {
    "rho": SearchAxis(0.0025, 2.0, 16.0),
    "mu": SearchAxis(0.0005, 2.0, 16.0),
    "sigma": SearchAxis(0.001, 10.0, 1.0),
}


def preset_rows(classifier: str, task=None, dense: bool = False) -> dict[str, Row]:
    """The six presets of TFG's design space, each at its paper's pieces; every one but TFG searched by its strength."""
    strength = DENSE_STRENGTH if dense else STRENGTH
    return {
        "DPS": Row(lambda **kw: DPS(classifier, task=task, **kw), STRENGTH),
        "LGD": Row(lambda **kw: LGD(classifier, task=task, **kw), strength),
        "FreeDoM": Row(lambda **kw: FreeDoM(classifier, task=task, **kw), strength),
        "MPGD": Row(lambda **kw: MPGD(classifier, task=task, **kw), strength),
        "UGD": Row(lambda **kw: UGD(classifier, task=task, **kw), strength),
        "TFG": Row(
            lambda **kw: TFG(classifier, task=task, **TFG_FIXED, **kw),
            DENSE_TFG_AXES if dense else TFG_AXES,
            fixed={"classifier_scale": 1.0},
        ),
    }


def reference_embeddings() -> torch.Tensor:
    """(10, D): the digits embedder's embedding of the first validation digit of each class, in class order
    (`EmbeddingTargetDataModule`'s references)."""
    references = EmbeddingTargetDataModule(model_path=EMBEDDER, num_per_target=1)
    references.setup("predict")
    rows = references.dataset.rows
    return rows["target_embedding"][rows["target_class"].argsort()]


def embedding_guide_row() -> Row:
    """The digits image embedder (CLIP's part) guiding FreeDoM, the best label preset, toward a reference digit of
    the target class; the evaluator scores the class, as for every label row."""
    return Row(
        lambda **kw: FreeDoM(EMBEDDER, **kw),
        STRENGTH,
        available=missing(EMBEDDER, "lightning fit -c configs/pretrain/embedder.yaml"),
        embeddings=reference_embeddings,
    )


SCALE = {"classifier_scale": SearchAxis(1.0, 2.0, 16.0)}
ROWS: dict[str, dict[str, Row]] = {
    "label": {
        "unguided": Row(lambda: None, cost=gradient_cost),
        "calibrated (EluCD's defaults)": Row(lambda **kw: CalibratedGuidance(RESNET, **kw), SCALE, cost=gradient_cost),
        "x0_hat, Softplus beta 5 (calibration.md's best)": Row(
            lambda **kw: CalibratedGuidance(RESNET, softplus_beta=5.0, marginal_discount=1.0, sine_gamma=0.0, **kw),
            SCALE,
            cost=gradient_cost,
        ),
        "PPAP-5": Row(
            lambda **kw: ExpertGuidance(EXPERTS, **kw),
            SCALE,
            cost=gradient_cost,
            available=missing(EXPERTS, "lightning fit -c configs/ppap.yaml"),
        ),
        # The guide was trained on s in [1, 10]: the search stays inside.
        "distilled guide (PPAP-5, 32 steps)": Row(
            lambda **kw: DistilledGuidance(DISTILLED, **kw),
            {"classifier_scale": SearchAxis(1.0, 2.0, 10.0)},
            cost=distilled_cost,
            available=missing(DISTILLED, "lightning fit -c configs/guidance_distillation.yaml"),
        ),
        **preset_rows(RESNET),
        "FreeDoM, image embedder toward a reference digit": embedding_guide_row(),
    },
    "segmentation": {
        "unguided": Row(lambda: None, cost=gradient_cost),
        **preset_rows(f"{ASSETS}/segmenter", SegmentationTask(0.25), dense=True),
    },
}
# What each task guides toward and reads off its samples.
TASKS = {
    "label": dict(score="guided_accuracy", samplers=SEARCHED_SAMPLERS),
    "segmentation": dict(model=f"{ASSETS}/segmenter", score="miou", samplers=("DDPM-50",)),
}


def split_settings(row: Row, settings: dict) -> tuple[dict, float]:
    """(constructor settings, classifier_scale) of a row's setting, its fixed settings included."""
    every = {**row.fixed, **settings}
    return {k: v for k, v in every.items() if k != "classifier_scale"}, float(every.get("classifier_scale", 1.0))


def build_pipeline(row: Row, settings: dict, unet, sampler: str) -> tuple[GuidedDiffusionPipeline, dict]:
    """The row's pipeline on `sampler` and its call arguments (`num_inference_steps`, `classifier_scale`)."""
    model, scheduler, overrides, steps = SAMPLERS[sampler]
    constructor, scale = split_settings(row, settings)
    guidance = row.build(**constructor)
    pipeline = GuidedDiffusionPipeline(
        unet, load_scheduler(f"{ASSETS}/{model}", scheduler, overrides=overrides), guidance
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, dict(num_inference_steps=steps, classifier_scale=0.0 if guidance is None else scale)


def guided_sampler(
    row: Row, settings: dict, unet, sampler: str, maps: torch.Tensor | None = None, first_seed: int = 0
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`sample(labels, seeds)` of the row at `settings` for `protocol.measure`; toward `maps[seed - first_seed]` for a
    dense task."""
    pipeline, call = build_pipeline(row, settings, unet, sampler)
    if row.embeddings is not None:
        embeddings = row.embeddings()

        def toward_embeddings(labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
            batch = {"label": torch.full_like(labels, -1), "seed": seeds, "target_embedding": embeddings[labels]}
            return sample_batch(pipeline, batch, **call)

        return toward_embeddings
    if maps is None:
        return pipeline_sampler(pipeline, **call)

    def sample(labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        batch = {"label": torch.full_like(labels, -1), "seed": seeds, "target_map": maps[seeds - first_seed]}
        return sample_batch(pipeline, batch, **call)

    return sample


def map_scores(kind: str, reader: torch.nn.Module, maps: torch.Tensor) -> Callable[[torch.Tensor], dict]:
    """`on_images` of `protocol.measure` for a dense task: the maps read off the samples (strokes labelled by `reader`)
    against their targets `maps` (sample i toward map i), with intervals (`DenseMapMetrics`)."""
    scores = DenseMapMetrics(kind, reader)

    def on_images(images: torch.Tensor) -> dict:
        scores.reset()
        scores.update(images, maps[: len(images)], torch.arange(len(images)))
        return scores.compute() | {"intervals": scores.compute_intervals()}

    return on_images


def row_cost(row: Row, settings: dict, sampler: str) -> TrainingFreeCost:
    """Calls per sample of the row at `settings` on `sampler`."""
    constructor, _ = split_settings(row, settings)
    return row.cost(row.build(**constructor), SAMPLERS[sampler][3])
