"""What distilled guidance costs: a halved ShiftGuide at 8 steps, against PPAP-5 at DDPM-50 and unguided sampling.

    python benchmarks/distilled_guidance.py --guide runs/guidance-halving/16to8/version_0/guides/shift/steps-8 \
        [--other-guides NAME=PATH ...] [--experts runs/ppap/version_0/experts] [--samples 250] [--repeats 3]

Same UNet (`assets/digits/ddpm-uncond`), samples and seeds; the runs are timed alternately in this one process after a
warm-up round, and the median time per image and the ratios are printed: distilled guide at DDIM-8 / unguided DDIM-8
(target 1.10 at most), PPAP-5 at DDPM-50 / distilled at DDIM-8 (target 5 at least), plus unguided DDPM-50;
`--other-guides` adds guides of other sizes at DDIM-8 (their time does not depend on their training). Peak memory
of each run: on CUDA `torch.cuda.max_memory_allocated` of the run; on CPU, in a fresh process that loads what the run
needs and samples once (1 thread), how far sampling raises the peak resident memory above what loading reached.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import statistics
import time

import torch
from memory import peak_rss

from plugguide.models import load_scheduler, load_unet
from plugguide.models.seeding import seeded_generators
from plugguide.pipelines import GuidedDiffusionPipeline
from plugguide.pipelines.guidance import DistilledGuidance, ExpertGuidance

MODEL = "assets/digits/ddpm-uncond"


def runs(args) -> dict[str, tuple]:
    """name -> (scheduler, steps, guidance factory, classifier_scale)."""
    others = dict(item.split("=", 1) for item in args.other_guides)
    return {
        "unguided DDIM-8": ("DDIMScheduler", 8, lambda: None, 0.0),
        "distilled guide DDIM-8": ("DDIMScheduler", 8, lambda: DistilledGuidance(args.guide), args.distilled_scale),
        **{
            f"distilled guide DDIM-8 ({name})": (
                "DDIMScheduler",
                8,
                lambda path=path: DistilledGuidance(path),
                args.distilled_scale,
            )
            for name, path in others.items()
        },
        "unguided DDPM-50": ("DDPMScheduler", 50, lambda: None, 0.0),
        "PPAP-5 DDPM-50": ("DDPMScheduler", 50, lambda: ExpertGuidance(args.experts), args.ppap_scale),
    }


def sample_once(pipeline: GuidedDiffusionPipeline, steps: int, scale: float, samples: int, device: str) -> None:
    labels = torch.arange(samples) % 10
    pipeline(
        targets=labels.to(device),
        batch_size=samples,
        generator=seeded_generators(torch.arange(samples), device),
        num_inference_steps=steps,
        classifier_scale=scale,
        output_type="pt",
    )


def build(args, name: str) -> tuple[GuidedDiffusionPipeline, int, float]:
    scheduler, steps, guidance, scale = runs(args)[name]
    unet = load_unet(MODEL).eval().to(args.device)
    pipeline = GuidedDiffusionPipeline(unet, load_scheduler(MODEL, scheduler), guidance())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, steps, scale


def peak_memory(args, name: str, queue) -> None:
    """Child process: (peak resident memory after loading run `name`'s models, after sampling it once), in MiB."""
    torch.set_num_threads(1)
    pipeline, steps, scale = build(args, name)
    loaded = peak_rss()
    sample_once(pipeline, steps, scale, args.samples, args.device)
    queue.put((loaded, peak_rss()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guide", required=True, help="the ShiftGuide halved to 8 steps (its export folder)")
    parser.add_argument("--other-guides", nargs="*", default=[], help="NAME=PATH of more guides timed at DDIM-8")
    parser.add_argument("--experts", default="runs/ppap/version_0/experts", help="the main job's exported experts")
    parser.add_argument("--distilled-scale", type=float, default=4.0, help="classifier scale s of the distilled guide")
    parser.add_argument("--ppap-scale", type=float, default=4.0, help="classifier scale s of the PPAP experts")
    parser.add_argument("--samples", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    built = {name: build(args, name) for name in runs(args)}
    seconds, peaks = collections.defaultdict(list), {}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for name, (pipeline, steps, scale) in built.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            sample_once(pipeline, steps, scale, args.samples, args.device)
            if args.device == "cuda":
                torch.cuda.synchronize()
                peaks[name] = torch.cuda.max_memory_allocated() / 2**20
            if round_:
                seconds[name].append((time.perf_counter() - started) / args.samples)
    if args.device != "cuda":
        context = multiprocessing.get_context("spawn")
        for name in runs(args):
            queue = context.Queue()
            process = context.Process(target=peak_memory, args=(args, name, queue))
            process.start()
            loaded, peak = queue.get()
            peaks[name] = peak - loaded
            process.join()
    median = {name: statistics.median(values) for name, values in seconds.items()}
    memory = "peak GPU memory (MiB)" if args.device == "cuda" else "peak resident memory above the loaded models (MiB)"
    print(
        f"device {args.device}, {torch.get_num_threads()} threads, {args.samples} samples per run, median of {args.repeats}"
    )
    print(f"| run | ms / image | {memory} |\n|---|---|---|")
    for name, value in median.items():
        print(f"| {name} | {1000 * value:.2f} | {peaks[name]:.0f} |")
    for name in median:
        if name.startswith("distilled"):
            print(f"{name} / unguided DDIM-8: {median[name] / median['unguided DDIM-8']:.3f}")
    print(
        f"PPAP-5 DDPM-50 / distilled DDIM-8: {median['PPAP-5 DDPM-50'] / median['distilled guide DDIM-8']:.2f}\n"
        f"PPAP-5 DDPM-50 / unguided DDPM-50: {median['PPAP-5 DDPM-50'] / median['unguided DDPM-50']:.3f}"
    )


if __name__ == "__main__":
    main()
