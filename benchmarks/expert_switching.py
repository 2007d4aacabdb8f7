"""Cost of expert switching: guided sampling with PPAP-10 against one classifier of the same backbone.

    python benchmarks/expert_switching.py [--samples 100] [--steps 50] [--repeats 3]

Both guides are the same LoRA-wrapped backbone; PPAP-10 switches adapter 10 times per sampling run (once
per noise range), the single-expert guide never does. Same UNet, sampler, steps, seeds; timed alternately.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from plugguide.models import MultiExpertModel
from plugguide.models.classifier import load_classifier
from plugguide.models.diffusion_model import load_scheduler, load_unet
from plugguide.pipelines import GuidedDiffusionPipeline
from plugguide.pipelines.guidance import ExpertGuidance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/digits/ddpm-uncond")
    parser.add_argument("--classifier", default="assets/digits/classifier-resnet")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    unet = load_unet(args.model)
    pipelines = {}
    for experts in (10, 1):
        guide = ExpertGuidance(MultiExpertModel(load_classifier(args.classifier), num_experts=experts, lora_rank=8))
        pipelines[experts] = GuidedDiffusionPipeline(unet, load_scheduler(args.model, "DDPMScheduler"), guide)
        pipelines[experts].set_progress_bar_config(disable=True)
    labels = torch.arange(args.samples) % 10
    ratios = []
    for repeat in range(args.repeats + 1):
        timings = {}
        for experts, pipeline in pipelines.items():
            started = time.perf_counter()
            pipeline(
                class_labels=labels,
                num_inference_steps=args.steps,
                classifier_scale=1.0,
                generator=torch.Generator().manual_seed(0),
                output_type="pt",
            )
            timings[experts] = time.perf_counter() - started
        if repeat:
            ratios.append(timings[10] / timings[1])
            print(
                f"repeat {repeat}: PPAP-10 {timings[10]:.2f} s, single classifier {timings[1]:.2f} s, ratio {ratios[-1]:.3f}"
            )
    print(
        f"median time ratio (PPAP-10 / single classifier): {statistics.median(ratios):.3f}  [torch threads: {torch.get_num_threads()}]"
    )


if __name__ == "__main__":
    main()
