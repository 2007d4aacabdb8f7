"""What guidance costs: DDPM-50 sampling unguided, with PPAP-5 experts and with calibrated off-the-shelf guidance.

    python benchmarks/guidance_overhead.py [--experts runs/ppap/version_0/experts] [--samples 100] [--steps 50] [--repeats 3]

The settings of docs/results/speed.md: the main job's exported experts (`lightning fit -c configs/ppap.yaml` writes
them) at its guidance scale 4, run as sampling runs them (each expert's LoRA update merged into the weights at its
switch) and unmerged (the LoRA branches run at every step), and `CalibratedGuidance` on the ResNet with the paper's defaults at scale 10 (its best
scale in docs/results/calibration.md). Same UNet, sampler, samples and seeds; the three are timed alternately in this one process,
after a warm-up round, and the median time ratios guided / unguided are printed. The breakdown of each guided run
(summed over the timed rounds, as a share of its time): the UNet, the guide's forward (its log-likelihood), its
backward (the rest of the gradient call: autograd, the input clone), expert switches (`MultiExpertModel.set_expert`), x0_hat formation and
the rest of the loop; and, once, what building each guide costs (loading the experts; the Softplus copy of the
classifier).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time

import torch
from timers import timed

from plugguide.models import MultiExpertModel, load_scheduler, load_unet
from plugguide.pipelines import GuidedDiffusionPipeline
from plugguide.pipelines.guidance import CalibratedGuidance, ExpertGuidance
from plugguide.pipelines.model_family import ModelFamily


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/digits/ddpm-uncond")
    parser.add_argument("--experts", default="runs/ppap/version_0/experts", help="the main job's exported experts")
    parser.add_argument("--classifier", default="assets/digits/classifier-resnet")
    parser.add_argument("--ppap-scale", type=float, default=4.0, help="classifier scale s of the PPAP experts")
    parser.add_argument(
        "--calibrated-scale", type=float, default=10.0, help="classifier scale s of calibrated guidance"
    )
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.experts, "experts.json")):
        parser.error(
            f"--experts {args.experts!r} holds no exported experts; run `lightning fit -c configs/ppap.yaml` first or point to them."
        )

    build = {}
    started = time.perf_counter()
    experts = ExpertGuidance(args.experts)
    build["PPAP-5 (loading the experts)"] = time.perf_counter() - started
    unmerged = ExpertGuidance(args.experts, merge_adapters=False)
    started = time.perf_counter()
    calibrated = CalibratedGuidance(args.classifier)
    build["calibrated (loading the classifier, Softplus copy)"] = time.perf_counter() - started

    seconds: dict[tuple[str, str], float] = collections.defaultdict(float)
    unet = load_unet(args.model).eval()
    current = ["unguided"]
    for owner, name, key in (
        (unet, "forward", "UNet"),
        (experts, "log_likelihood", "guide forward"),
        (experts, "gradient", "guide gradient"),
        (unmerged, "log_likelihood", "guide forward"),
        (unmerged, "gradient", "guide gradient"),
        (calibrated, "log_likelihood", "guide forward"),
        (calibrated, "gradient", "guide gradient"),
        (MultiExpertModel, "set_expert", "expert switches"),
        (ModelFamily, "predicted_clean", "x0_hat"),
    ):
        timed(owner, name, seconds, lambda key=key: (current[0], key))
    runs = {
        "unguided": (None, 0.0),
        "PPAP-5": (experts, args.ppap_scale),
        "PPAP-5 unmerged": (unmerged, args.ppap_scale),
        "calibrated": (calibrated, args.calibrated_scale),
    }
    pipelines = {
        name: GuidedDiffusionPipeline(unet, load_scheduler(args.model, "DDPMScheduler"), guide)
        for name, (guide, _) in runs.items()
    }
    labels = torch.arange(args.samples) % 10
    ratios = {name: [] for name in runs if name != "unguided"}
    totals = collections.defaultdict(float)
    for repeat in range(args.repeats + 1):
        timings = {}
        for name, (_, scale) in runs.items():
            pipelines[name].set_progress_bar_config(disable=True)
            current[0] = name
            started = time.perf_counter()
            pipelines[name](
                class_labels=labels,
                num_inference_steps=args.steps,
                classifier_scale=scale,
                generator=torch.Generator().manual_seed(0),
                output_type="pt",
            )
            timings[name] = time.perf_counter() - started
        if not repeat:  # round 0 warms up
            seconds.clear()
            continue
        for name in ratios:
            ratios[name].append(timings[name] / timings["unguided"])
        for name, value in timings.items():
            totals[name] += value
        print(f"repeat {repeat}: " + ", ".join(f"{name} {value:.2f} s" for name, value in timings.items()), flush=True)
    print(f"{args.samples} samples, DDPM-{args.steps}, torch threads: {torch.get_num_threads()}")
    for name, values in ratios.items():
        print(f"median time ratio {name} / unguided: {statistics.median(values):.3f}")
    for name, total in totals.items():
        parts = {key: value for (run, key), value in seconds.items() if run == name}
        if "guide gradient" in parts:  # the gradient call is the guide's forward and its backward
            parts["guide backward"] = parts.pop("guide gradient") - parts.get("guide forward", 0.0)
        rest = total - sum(parts.values())
        shares = ", ".join(
            f"{key} {100 * value / total:.1f}%" for key, value in sorted(parts.items(), key=lambda item: -item[1])
        )
        print(f"{name}: {shares}, rest {100 * rest / total:.1f}%")
    print("building the guides: " + ", ".join(f"{name} {value * 1e3:.0f} ms" for name, value in build.items()))


if __name__ == "__main__":
    main()
