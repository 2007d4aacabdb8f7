"""Time per image of a stock diffusers pipeline under `guided` beside `GuidedDiffusionPipeline`, on the same work.

    python benchmarks/stock_pipelines.py [--samples 100] [--repeats 3] [--classifier-scale 3]

The stock `DDIMPipeline` of `assets/digits/ddpm-uncond` inside `with guided(pipe, CalibratedGuidance(ResNet), ...)` and
`GuidedDiffusionPipeline` with the same UNet, scheduler, guidance, scale, seeds and DDIM-25 steps, unguided and guided,
timed alternately in this one process. Prints the median ms per image of each over `--repeats` (after one warm-up
round), side by side; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DDIMPipeline

from plugguide.pipelines import GuidedDiffusionPipeline, guided
from plugguide.pipelines.guidance import CalibratedGuidance

STEPS = 25


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/digits/ddpm-uncond")
    parser.add_argument("--classifier", default="assets/digits/classifier-resnet")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--classifier-scale",
        type=float,
        default=3.0,
        help="classifier scale s (`classifier_scale`) of the guided runs",
    )
    args = parser.parse_args()
    labels = torch.arange(args.samples) % 10
    guidance = CalibratedGuidance(args.classifier)
    stock = DDIMPipeline.from_pretrained(args.model)
    stock.set_progress_bar_config(disable=True)
    project = GuidedDiffusionPipeline(stock.unet, stock.scheduler, guidance)
    project.set_progress_bar_config(disable=True)

    def run_stock(scale: float):
        with guided(stock, guidance, classifier_scale=scale, targets=labels):
            return stock(
                batch_size=args.samples,
                num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            )

    def run_project(scale: float):
        return project(
            class_labels=labels,
            num_inference_steps=STEPS,
            classifier_scale=scale,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )

    runs = {
        ("unguided", "stock + guided"): lambda: run_stock(0.0),
        ("unguided", "GuidedDiffusionPipeline"): lambda: run_project(0.0),
        ("guided", "stock + guided"): lambda: run_stock(args.classifier_scale),
        ("guided", "GuidedDiffusionPipeline"): lambda: run_project(args.classifier_scale),
    }
    seconds = {name: [] for name in runs}
    for repeat in range(args.repeats + 1):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            if repeat:  # round 0 warms up
                seconds[name].append(time.perf_counter() - started)
    print(
        f"DDIM-25, {args.samples} samples per run, classifier_scale {args.classifier_scale:g}, torch threads: "
        f"{torch.get_num_threads()}"
    )
    print(
        "| run | stock DDIMPipeline + guided (ms per image) | GuidedDiffusionPipeline (ms per image) |\n|---|---|---|"
    )
    for kind in ("unguided", "guided"):
        cells = [
            f"{1000 * statistics.median(seconds[(kind, pipeline)]) / args.samples:.1f}"
            for pipeline in ("stock + guided", "GuidedDiffusionPipeline")
        ]
        print(f"| {kind} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
