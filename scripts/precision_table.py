"""Reduced precision and compilation of the UNet, measured for speed and for quality, printed as markdown.

    python scripts/precision_table.py [--experts runs/ppap/version_0/experts] [--settings fp32 bf16 compile compile+bf16]
                                      [--samples-per-class 50] [--timing-samples 100] [--repeats 3] [--output-dir runs/precision_table]

Two workloads, both DDPM-50 on `assets/digits/ddpm-uncond`: unguided sampling (the UNet alone, as in synthesis) and
the main job's guided sampling (PPAP-5 experts, `--experts`, scale 4). Each setting is what the sampling and
synthesis jobs take: `autocast_dtype` (the UNet under autocast, guidance in float32) and `compile_unet`
(`torch.compile` of the UNet's forward).

Speed: every repeat samples `--timing-samples` images with each setting in turn, after one warm-up round that also
compiles; the table gives the median time per image and its ratio to fp32 of the same workload, so the ratios are
side by side in one run. Quality: each setting samples the protocol's seeds and is scored under `scripts/protocol.py`
(independent evaluator, FID/KID in three spaces with 95% intervals); a setting is only as good as fp32 where its
intervals overlap fp32's. Raw results go to `<output-dir>/results.json`, the table to `<output-dir>/table.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from protocol import QUALITY_HEADERS, describe, measure, pipeline_sampler, quality_cells, reference_metrics, targets
from results_page import add_page_arguments, write_between_markers

from plugguide.metrics.reporting import markdown_table
from plugguide.models import MultiExpertModel, compile_denoiser, load_scheduler, load_unet
from plugguide.pipelines import GuidedDiffusionPipeline, sample_batch
from plugguide.pipelines.guidance import ExpertGuidance

MODEL = "assets/digits/ddpm-uncond"
# name: (autocast dtype, compile the UNet)
SETTINGS = {
    "fp32": (None, False),
    "bf16": ("bfloat16", False),
    "fp16": ("float16", False),
    "compile": (None, True),
    "compile+bf16": ("bfloat16", True),
}
STEPS = 50


def pipelines(settings: list[str], guidance) -> dict[str, GuidedDiffusionPipeline]:
    """One pipeline per setting, each with its own UNet (a compiled UNet stays compiled)."""
    built = {}
    for name in settings:
        dtype, compiled = SETTINGS[name]
        unet = load_unet(MODEL).eval().requires_grad_(False)
        if compiled:
            compile_denoiser(unet)
        built[name] = GuidedDiffusionPipeline(
            unet, load_scheduler(MODEL, "DDPMScheduler"), guidance, autocast_dtype=dtype
        )
        built[name].set_progress_bar_config(disable=True)
    return built


def timings(
    runs: dict[str, GuidedDiffusionPipeline], scale: float, samples: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per image of each setting, per repeat, the settings interleaved (after a warm-up round)."""
    labels, seeds = torch.arange(samples) % 10, torch.arange(samples)
    seconds = {name: [] for name in runs}
    for repeat in range(repeats + 1):
        for name, pipeline in runs.items():
            started = time.perf_counter()
            sample_batch(pipeline, {"label": labels, "seed": seeds}, num_inference_steps=STEPS, classifier_scale=scale)
            if repeat:
                seconds[name].append((time.perf_counter() - started) / samples)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", default="runs/ppap/version_0/experts", help="the main job's exported experts")
    parser.add_argument(
        "--classifier-scale",
        type=float,
        default=4.0,
        help="classifier scale s (`classifier_scale`) of the PPAP workload (the main job's)",
    )
    parser.add_argument(
        "--settings", nargs="+", default=["fp32", "bf16", "compile", "compile+bf16"], choices=list(SETTINGS)
    )
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--timing-samples", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output-dir", default="runs/precision_table", help="run folder: results and grids/")
    add_page_arguments(parser, "precision-table")
    args = parser.parse_args()
    if args.settings[0] != "fp32":
        parser.error("--settings must start with fp32, the reference of every ratio and interval")
    workloads = {
        "unguided": (None, 0.0),
        "PPAP-5": (ExpertGuidance(MultiExpertModel.from_pretrained(args.experts)), args.classifier_scale),
    }
    metrics, (labels, seeds) = reference_metrics(), targets(args.samples_per_class)
    results, rows = {}, []
    for workload, (guidance, scale) in workloads.items():
        runs = pipelines(args.settings, guidance)
        seconds = timings(runs, scale, args.timing_samples, args.repeats)
        reference = statistics.median(seconds["fp32"])
        for name, pipeline in runs.items():
            quality = measure(
                metrics,
                pipeline_sampler(pipeline, num_inference_steps=STEPS, classifier_scale=scale),
                labels,
                seeds,
                grid_path=os.path.join(args.output_dir, "grids", f"{workload}-{name}.png"),
            )
            median = statistics.median(seconds[name])
            results[f"{workload} | {name}"] = quality | {"timing_seconds_per_image": seconds[name]}
            rows.append([workload, name, f"{1000 * median:.1f}", f"{median / reference:.3f}", *quality_cells(quality)])
            print(
                workload,
                name,
                f"{1000 * median:.1f} ms/image",
                f"ratio {median / reference:.3f}",
                f"accuracy {quality['guided_accuracy']:.3f}",
                flush=True,
            )
    text = "\n".join(
        [
            describe(len(labels), f"DDPM-{STEPS}") + f" PPAP-5: `{args.experts}` at s = {args.classifier_scale:g}.",
            f"Speed: median of {args.repeats} interleaved repeats of {args.timing_samples} samples after a warm-up round "
            f"(which compiles); torch threads: {torch.get_num_threads()}.",
            "",
            markdown_table(["workload", "setting", "ms per image", "time vs fp32", *QUALITY_HEADERS], rows),
        ]
    )
    os.makedirs(args.output_dir, exist_ok=True)
    for name, content in (("results.json", json.dumps(results, indent=1)), ("table.md", text + "\n")):
        path = os.path.join(args.output_dir, name)
        with open(path + ".tmp", "w") as file:
            file.write(content)
        os.replace(path + ".tmp", path)
    if args.page:
        write_between_markers(args.page, args.marker, text)
    print(text)


if __name__ == "__main__":
    main()
