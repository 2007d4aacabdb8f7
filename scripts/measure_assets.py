"""Measures the shipped digits models and prints the README's quality table (markdown).

    python scripts/measure_assets.py [--samples-per-class 50] [--steps 50]

Classifiers: accuracy on the fixed test split of `DigitsDataModule` (359 images).
Diffusion models: samples from fixed seeds, scored by the independent evaluator
(confidence, FID on evaluator features against the 359 real test digits, IS-style score;
for the class-conditional model, evaluator accuracy on the target classes under CFG).
DDPM-trained models sample with DDIM, the flow-matching one with its Euler sampler, both `--steps` steps.
"""

from __future__ import annotations

import argparse
import os

import torch

from plugguide.datamodules import DigitsDataModule
from plugguide.metrics import GenerationMetrics
from plugguide.models.classifier import load_classifier
from plugguide.models.diffusion_model import load_scheduler, load_unet
from plugguide.pipelines import sample_batch
from plugguide.pipelines import GuidedDiffusionPipeline

ASSETS = "assets/digits"
SAMPLERS = {"flow-uncond": ("FlowMatchEulerDiscreteScheduler", "flow-Euler")}  # every other model: DDIMScheduler


def test_images() -> tuple[torch.Tensor, torch.Tensor]:
    data = DigitsDataModule(batch_size=1000)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    return batch["image"], batch["label"]


@torch.no_grad()
def classifier_accuracy(path: str, images: torch.Tensor, labels: torch.Tensor) -> float:
    classifier = load_classifier(path).eval()
    return (classifier(images).argmax(-1) == labels).float().mean().item()


def diffusion_scores(path: str, real: torch.Tensor, per_class: int, steps: int, cfg_scale: float) -> dict[str, float]:
    sampler = SAMPLERS.get(os.path.basename(path), ("DDIMScheduler",))[0]
    pipeline = GuidedDiffusionPipeline(load_unet(path), load_scheduler(path, sampler))
    pipeline.set_progress_bar_config(disable=True)
    evaluator = load_classifier(os.path.join(ASSETS, "evaluator"))
    metrics = GenerationMetrics(evaluator, evaluator.num_classes)
    metrics.update_real(real)
    conditional = pipeline.is_class_conditional
    labels = torch.arange(10).repeat_interleave(per_class) if conditional else torch.full((10 * per_class,), -1)
    for start in range(0, len(labels), 250):
        chunk = labels[start : start + 250]
        batch = {"label": chunk, "seed": torch.arange(start, start + len(chunk))}
        metrics.update_generated(sample_batch(pipeline, batch, num_inference_steps=steps, cfg_scale=cfg_scale), chunk)
    return metrics.compute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--steps", type=int, default=50, help="sampler steps")
    args = parser.parse_args()
    images, labels = test_images()
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(ASSETS) for f in files)
    print(f"Assets: {size / 2**20:.1f} MiB in {ASSETS}/\n")
    print("| model | params | test accuracy |\n|---|---|---|")
    for name in ("classifier-resnet", "classifier-deit", "evaluator"):
        path = os.path.join(ASSETS, name)
        params = sum(p.numel() for p in load_classifier(path).parameters())
        print(f"| {name} ({load_classifier(path).model.__class__.__name__}) | {params:,} | {classifier_accuracy(path, images, labels):.4f} |")
    n = 10 * args.samples_per_class
    print(f"\n| diffusion model | params | sampler | samples | evaluator accuracy on target | evaluator confidence | FID (evaluator features, vs {len(images)} test digits) | IS (evaluator) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cfg in (("ddpm-uncond", 0.0), ("flow-uncond", 0.0), ("ddpm-cond", 0.0), ("ddpm-cond", 3.0)):
        path = os.path.join(ASSETS, name)
        scores = diffusion_scores(path, images, args.samples_per_class, args.steps, cfg)
        params = sum(p.numel() for p in load_unet(path).parameters())
        label = f"{name}" + (f", CFG w={cfg:g}" if cfg else "")
        accuracy = f"{scores['guided_accuracy']:.4f}" if "guided_accuracy" in scores else "n/a (unconditional)"
        sampler = SAMPLERS.get(name, (None, "DDIM"))[1]
        print(f"| {label} | {params:,} | {sampler}-{args.steps} | {n} | {accuracy} | {scores['evaluator_confidence']:.4f} | {scores['fid']:.2f} | {scores['inception_score']:.2f} |")


if __name__ == "__main__":
    main()
