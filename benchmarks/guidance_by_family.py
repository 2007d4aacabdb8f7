"""What guidance costs in each model family: guided vs unguided sampling, and unguided vs a plain diffusers loop.

    python benchmarks/guidance_by_family.py [--samples 100] [--repeats 3] [--flow-model assets/digits/flow-uncond]

Per family, one sampler (ancestral DDPM-50, DDIM-25 and Euler-Karras-25 on the DDPM model, Heun/EDM-18 with its
two evaluations per step, flow-matching Euler-25 on the flow model), three runs of the same samples, seeds and
steps, timed alternately in this one process: the plain loop diffusers' pipelines run (`scale_model_input`, the
UNet, `scheduler.step`), `GuidedDiffusionPipeline` unguided (the cost of the conversion layer), and guided by
`CalibratedGuidance` on the ResNet (the classifier's forward and backward on x0_hat per evaluation). Prints the
median ratios over `--repeats` (after one warm-up round); run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from diffusers.utils.torch_utils import randn_tensor

from plugguide.models import load_scheduler, load_unet
from plugguide.pipelines import GuidedDiffusionPipeline
from plugguide.pipelines.guidance import CalibratedGuidance

# family: (model, sampler class, scheduler config overrides, steps)
FAMILIES = {
    "vp, ancestral DDPM-50": ("ddpm", "DDPMScheduler", {}, 50),
    "vp, DDIM-25": ("ddpm", "DDIMScheduler", {}, 25),
    "sigma, Euler-Karras-25": ("ddpm", "EulerDiscreteScheduler", {"use_karras_sigmas": True}, 25),
    "sigma, Heun/EDM-18": ("ddpm", "HeunDiscreteScheduler", {"use_karras_sigmas": True}, 18),
    "flow, Euler-25": ("flow", "FlowMatchEulerDiscreteScheduler", {}, 25),
}


@torch.no_grad()
def plain_loop(unet, scheduler, batch: int, steps: int) -> torch.Tensor:
    """Unguided sampling as diffusers' own pipelines loop (no guidance code at all)."""
    config = unet.config
    x = randn_tensor(
        (batch, config.in_channels, config.sample_size, config.sample_size), generator=torch.Generator().manual_seed(0)
    )
    scheduler.set_timesteps(steps)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(unet(model_input, t).sample, t, x).prev_sample
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/digits/ddpm-uncond")
    parser.add_argument("--flow-model", default="assets/digits/flow-uncond")
    parser.add_argument("--classifier", default="assets/digits/classifier-resnet")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    paths = {"ddpm": args.model, "flow": args.flow_model}
    labels = torch.arange(args.samples) % 10
    guidance = CalibratedGuidance(args.classifier)
    print(f"{args.samples} samples per run, torch threads: {torch.get_num_threads()}")
    for family, (model, scheduler_name, overrides, steps) in FAMILIES.items():
        if not os.path.isdir(paths[model]):
            print(f"{family}: skipped, {paths[model]} does not exist")
            continue
        unet = load_unet(paths[model]).eval()
        plain_scheduler = load_scheduler(paths[model], scheduler_name, overrides=overrides)
        pipeline = GuidedDiffusionPipeline(
            unet, load_scheduler(paths[model], scheduler_name, overrides=overrides), guidance
        )
        pipeline.set_progress_bar_config(disable=True)
        runs = {
            "plain": lambda: plain_loop(unet, plain_scheduler, args.samples, steps),
            "unguided": lambda: pipeline(
                class_labels=labels,
                num_inference_steps=steps,
                classifier_scale=0.0,
                generator=torch.Generator().manual_seed(0),
                output_type="pt",
            ),
            "guided": lambda: pipeline(
                class_labels=labels,
                num_inference_steps=steps,
                classifier_scale=10.0,
                generator=torch.Generator().manual_seed(0),
                output_type="pt",
            ),
        }
        ratios = {"guided / unguided": [], "unguided / plain": []}
        for repeat in range(args.repeats + 1):
            seconds = {}
            for name, run in runs.items():
                started = time.perf_counter()
                run()
                seconds[name] = time.perf_counter() - started
            if repeat:  # round 0 warms up
                ratios["guided / unguided"].append(seconds["guided"] / seconds["unguided"])
                ratios["unguided / plain"].append(seconds["unguided"] / seconds["plain"])
        medians = ", ".join(f"{name} {statistics.median(values):.3f}" for name, values in ratios.items())
        print(
            f"{family}: median time ratios {medians} (last round: {', '.join(f'{k} {v:.2f} s' for k, v in seconds.items())})",
            flush=True,
        )


if __name__ == "__main__":
    main()
