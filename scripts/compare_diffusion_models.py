"""Unguided samples of several diffusion models side by side under the table protocol, printed as markdown.

    python scripts/compare_diffusion_models.py assets/digits/ddpm-uncond runs/retrain/export \
        [--samplers DDIMScheduler DDPMScheduler] [--steps 50] [--samples-per-class 50]

What decides whether a retrained model replaces a shipped one: every model is sampled from the same
seeds with each sampler and scored against the 359 held-out test digits (`scripts/protocol.py`); a row is better only
where its 95% interval clears the other's, and a nearest-training ratio well below the other's means it copies more.
"""

from __future__ import annotations

import argparse

import torch
from protocol import QUALITY_HEADERS, describe, measure, pipeline_sampler, quality_cells, reference_metrics, targets

from plugguide.metrics.reporting import markdown_table
from plugguide.models import load_scheduler, load_unet
from plugguide.pipelines import GuidedDiffusionPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="diffusers pipeline directories")
    parser.add_argument("--samplers", nargs="+", default=["DDIMScheduler", "DDPMScheduler"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--samples-per-class", type=int, default=50)
    args = parser.parse_args()

    metrics = reference_metrics()
    labels, seeds = targets(args.samples_per_class)
    rows = []
    for sampler in args.samplers:
        for path in args.models:
            pipeline = GuidedDiffusionPipeline(load_unet(path), load_scheduler(path, sampler))
            pipeline.set_progress_bar_config(disable=True)
            row_labels = labels if pipeline.is_class_conditional else torch.full_like(labels, -1)
            row = measure(
                metrics,
                pipeline_sampler(pipeline, num_inference_steps=args.steps),
                row_labels,
                seeds,
            )
            rows.append([path, f"{sampler.removesuffix('Scheduler')}-{args.steps}", *quality_cells(row)])
            print(rows[-1], flush=True)
    print(f"\n{describe(len(labels), 'Unguided sampling')}\n")
    print(markdown_table(["model", "sampler", *QUALITY_HEADERS], rows))


if __name__ == "__main__":
    main()
