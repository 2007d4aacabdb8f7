"""Measures the shipped digits models and prints the asset tables of docs/results/assets.md (markdown).

    python scripts/measure_assets.py [--samples-per-class 50] [--steps 50] [--output-dir runs/assets] [--no-sampling]

Classifiers: accuracy on the fixed test split of `DigitsDataModule` (359 images). Dense models, on the same split
against the maps derived from each digit (`DigitMapsDataModule`): the segmenter's pixel accuracy, mean IoU and the
accuracy of its majority stroke class as the digit; the depth stand-in's error in pixels and correlation.
Autoencoder: reconstruction error on that split. Diffusion models: unguided (or class-conditional, or CFG) samples under the table protocol
of `scripts/protocol.py`, with DDIM and DDPM samplers. Two floor rows score real digits outside the reference set the
same way (`floor_sets`): the held-out val digits, what a generator of new digits would score, and training digits, what
copying the training set scores. The flow-matching model samples with its Euler sampler. Grids of every row go to
`--output-dir`.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from protocol import (
    AUTOENCODER,
    QUALITY_HEADERS,
    describe,
    measure,
    pipeline_sampler,
    quality_cells,
    reference_metrics,
    targets,
)
from results_page import add_page_arguments, write_between_markers
from torchmetrics.functional.segmentation import mean_iou

from plugguide.datamodules import DigitsDataModule
from plugguide.metrics import digit_segmentation, distance_to_stroke, majority_digit
from plugguide.metrics.dense import map_correlation
from plugguide.metrics.pixel_maps import NUM_SEGMENTATION_CLASSES
from plugguide.metrics.reporting import markdown_table
from plugguide.models import load_classifier, load_dense_model, load_scheduler, load_unet, load_vae
from plugguide.pipelines import GuidedDiffusionPipeline

ASSETS = "assets/digits"
CLASSIFIERS = ("classifier-resnet", "classifier-deit", "evaluator")
# (model, sampler, classifier-free guidance scale g as diffusers' guidance_scale; 1 = off)
DIFFUSION_ROWS = (
    ("ddpm-uncond", "DDIMScheduler", 1.0),
    ("ddpm-uncond", "DDPMScheduler", 1.0),
    ("flow-uncond", "FlowMatchEulerDiscreteScheduler", 1.0),
    ("ddpm-cond", "DDIMScheduler", 1.0),
    ("ddpm-cond", "DDIMScheduler", 4.0),
)


def floor_sets(data: DigitsDataModule, count: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Real digits outside the reference set (the test split), each set grouped by class, by the name of its row.

    The val digits, which no model trained on: what a generator of genuinely new digits scores. `count` of the train
    digits (drawn with seed 0): what a model that copies its training digits scores.
    """
    val_images, val_labels = data.split_images("val")
    train_images, train_labels = data.split_images("train")
    val_order = val_labels.argsort(stable=True)
    drawn = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(0))[:count]
    drawn = drawn[train_labels[drawn].argsort(stable=True)]
    return {
        f"held-out real digits (the {len(val_labels)} val digits)": (val_images[val_order], val_labels[val_order]),
        f"training digits ({count} of the {len(train_labels):,} that trained the models)": (
            train_images[drawn],
            train_labels[drawn],
        ),
    }


def size_mib(path: str) -> float:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files) / 2**20


@torch.no_grad()
def classifier_rows(images: torch.Tensor, labels: torch.Tensor) -> list[list[str]]:
    rows = []
    for name in CLASSIFIERS:
        classifier = load_classifier(os.path.join(ASSETS, name)).eval()
        accuracy = (classifier(images).argmax(-1) == labels).float().mean().item()
        params = sum(p.numel() for p in classifier.parameters())
        rows.append(
            [
                f"{name} ({type(classifier.model).__name__})",
                f"{params:,}",
                f"{size_mib(os.path.join(ASSETS, name)):.1f}",
                f"{accuracy:.4f}",
            ]
        )
    return rows


@torch.no_grad()
def dense_rows(images: torch.Tensor, labels: torch.Tensor) -> list[list[str]]:
    rows = []
    for name in ("segmenter", "depth"):
        model = load_dense_model(os.path.join(ASSETS, name)).eval()
        outputs = model(images)
        if name == "segmenter":
            truth, predicted = digit_segmentation(images, labels), outputs.argmax(1)
            miou = mean_iou(predicted, truth, num_classes=NUM_SEGMENTATION_CLASSES, input_format="index").mean()
            quality = (
                f"pixel accuracy {(predicted == truth).float().mean():.4f}, mIoU {miou:.4f}, "
                f"majority digit {(majority_digit(predicted) == labels).float().mean():.4f}"
            )
        else:
            truth = distance_to_stroke(images)
            quality = f"MAE {(outputs - truth).abs().mean():.3f} px, correlation {map_correlation(outputs, truth).mean():.4f}"
        params = sum(p.numel() for p in model.parameters())
        rows.append(
            [
                f"{name} ({type(model.model).__name__})",
                f"{params:,}",
                f"{size_mib(os.path.join(ASSETS, name)):.1f}",
                quality,
            ]
        )
    return rows


@torch.no_grad()
def autoencoder_row(images: torch.Tensor) -> list[str]:
    vae = load_vae(AUTOENCODER, "autoencoder").eval()
    reconstruction = vae.decode(vae.encode(images).latent_dist.mean).sample
    params = sum(p.numel() for p in vae.parameters())
    return [
        f"autoencoder ({type(vae).__name__})",
        f"{params:,}",
        f"{size_mib(AUTOENCODER):.1f}",
        f"reconstruction MSE {torch.mean((reconstruction - images) ** 2):.4f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--steps", type=int, default=50, help="sampler steps")
    parser.add_argument("--output-dir", default="runs/assets", help="run folder: results.json and a grid per row")
    parser.add_argument(
        "--no-sampling", action="store_true", help="no diffusion-model samples: the first table and the floor rows"
    )
    add_page_arguments(parser, "assets-table")
    args = parser.parse_args()
    if args.page and args.no_sampling:
        parser.error("`--page` rewrites both asset tables; drop `--no-sampling`.")
    data = DigitsDataModule()
    images, labels = data.split_images("test")
    rows = [*classifier_rows(images, labels), *dense_rows(images, labels), autoencoder_row(images)]
    text = f"Assets: {size_mib(ASSETS):.1f} MiB in {ASSETS}/\n\n" + markdown_table(
        ["model", "params", "MiB", "test split (359 digits)"], rows
    )
    print(text)

    metrics = reference_metrics(data)
    sample_labels, seeds = targets(args.samples_per_class)
    rows, results = [], {}
    for name, (real_images, real_labels) in floor_sets(data, len(sample_labels)).items():
        results[name] = measure(
            metrics,
            lambda batch_labels, batch_seeds: real_images[batch_seeds],
            real_labels,
            torch.arange(len(real_labels)),
            grid_path=f"{args.output_dir}/{name.split()[0]}.png",
        )
        rows.append([name, "-", "-", "-", *quality_cells(results[name])])
    for name, sampler, guidance_scale in () if args.no_sampling else DIFFUSION_ROWS:
        path = os.path.join(ASSETS, name)
        pipeline = GuidedDiffusionPipeline(load_unet(path), load_scheduler(path, sampler))
        pipeline.set_progress_bar_config(disable=True)
        conditional = pipeline.is_class_conditional
        row_labels = sample_labels if conditional else torch.full_like(sample_labels, -1)
        steps = f"{sampler.removesuffix('Scheduler')}-{args.steps}"
        label = f"{name}" + (f", CFG g={guidance_scale:g}" if guidance_scale != 1 else "")
        row = measure(
            metrics,
            pipeline_sampler(pipeline, num_inference_steps=args.steps, guidance_scale=guidance_scale),
            row_labels,
            seeds,
            grid_path=f"{args.output_dir}/{label.replace(' ', '_').replace(',', '')}-{steps}.png",
        )
        results[f"{label} {steps}"] = row
        params = sum(p.numel() for p in pipeline.unet.parameters())
        rows.append([label, f"{params:,}", f"{size_mib(path):.1f}", steps, *quality_cells(row)])
    sampling = (
        f"{describe(len(sample_labels), 'Unguided sampling')} Unconditional rows have no target class (accuracy n/a). "
        "The first two rows are floors, real digits outside the reference scored as samples: the val digits, what a "
        "generator of new digits would score (FID is biased upward at their count against the 500-sample rows; KID "
        "is not), and training digits, what copying the training set scores.\n\n"
        + markdown_table(["diffusion model", "params", "MiB", "sampler", *QUALITY_HEADERS], rows)
    )
    print(f"\n{sampling}")
    if args.page:
        write_between_markers(args.page, args.marker, f"{text}\n\n{sampling}")
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as file:
        json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
