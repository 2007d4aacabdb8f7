"""Do the sampling job and a table script sample the same images, and does the tables' pixel FID read them right?

    python scripts/sample_path_check.py --steps 8 \
        --row "unguided=runs/sample-unguided/version_0/samples.npz" \
        --row "halved 8-step guide at s 4=runs/sample-halved/version_0/samples.npz=runs/guidance-halving/16to8/latest/guides/shift/steps-8=4"

Each `--row` is NAME=SAMPLES[=GUIDE=SCALE]: the `samples.npz` the sampling job (`lightning predict -c
configs/sample.yaml`, 50 per class, DDIM) wrote for that row, and the distilled guide and scale it used. The script
samples the same row with the distilled-guidance table's own sampler (`scripts/guidance_distillation_table.py`), prints
the largest difference between the two sets of images, the tables' FID in 8x8-pooled pixels (`GenerationMetrics`,
held-out reference) and an independent Frechet distance (numpy / scipy `sqrtm`) on the same pooled pixels against the
held-out digits, the training digits and both.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from guidance_distillation_table import BASE, sampler
from protocol import measure, reference_metrics, targets
from scipy import linalg

from plugguide.datamodules import DigitsDataModule
from plugguide.models import load_scheduler, load_unet
from plugguide.pipelines import GuidedDiffusionPipeline
from plugguide.pipelines.guidance import DistilledGuidance


def frechet_distance(real: torch.Tensor, generated: torch.Tensor) -> float:
    """||mu_r - mu_g||^2 + tr(S_r + S_g - 2 sqrtm(S_r S_g)) of 8x8 average-pooled pixels, written apart from
    `plugguide.metrics` (which takes the trace from eigenvalues) to check it."""
    features = [F.adaptive_avg_pool2d(x.float(), 8).flatten(1).double().numpy() for x in (real, generated)]
    means, covariances = [f.mean(0) for f in features], [np.cov(f, rowvar=False) for f in features]
    root = linalg.sqrtm(covariances[0] @ covariances[1]).real
    return float(((means[0] - means[1]) ** 2).sum() + np.trace(covariances[0] + covariances[1] - 2 * root))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", action="append", required=True, help="NAME=SAMPLES[=GUIDE=SCALE]")
    parser.add_argument("--steps", type=int, default=8, help="the DDIM steps both paths sampled with")
    parser.add_argument("--samples-per-class", type=int, default=50)
    args = parser.parse_args()
    digits = DigitsDataModule()
    held_out, train = digits.split_images("test")[0], digits.split_images("train")[0]
    references = {"held-out": held_out, "train": train, "both": torch.cat([train, held_out])}
    labels, seeds = targets(args.samples_per_class)
    metrics, unet = reference_metrics(), load_unet(BASE).eval()
    for row in args.row:
        name, samples, *guided = row.split("=")
        guidance, scale = (DistilledGuidance(guided[0]), float(guided[1])) if guided else (None, 0.0)
        pipeline = GuidedDiffusionPipeline(unet, load_scheduler(BASE, "DDIMScheduler"), guidance)
        pipeline.set_progress_bar_config(disable=True)
        sample = sampler(pipeline, args.steps, scale)
        table = torch.cat([sample(labels[i : i + 250], seeds[i : i + 250]) for i in range(0, len(labels), 250)])
        job = torch.as_tensor(np.load(samples)["images"])
        tables_fid = measure(metrics, lambda _, batch_seeds: table[batch_seeds], labels, seeds)["fid_pixels"]
        independent = ", ".join(f"{key} {frechet_distance(ref, job):.3f}" for key, ref in references.items())
        print(
            f"{name}: max |table - job| = {(table - job).abs().max():.3g}; tables' FID pixels {tables_fid:.3f}; "
            f"independent FID pixels of the job's samples against {independent}"
        )


if __name__ == "__main__":
    main()
