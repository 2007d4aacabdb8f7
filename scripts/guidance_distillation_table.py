"""Distilled gradient guidance (a `ShiftGuide`, no classifier at sampling time) beside its teacher, as markdown.

    python scripts/guidance_distillation_table.py --experts runs/ppap/version_0/experts \
        --guides 32=runs/guidance-distillation/version_0/guides/shift/steps-32 \
                 16=runs/guidance-halving/32to16/version_0/guides/shift/steps-16 \
                 8=runs/guidance-halving/16to8/version_0/guides/shift/steps-8 \
                 4=runs/guidance-halving/8to4/version_0/guides/shift/steps-4 \
        [--samples-per-class 50] [--out runs/guidance_distillation_table] [--page docs/results/guidance_distillation.md]

Rows, all on `assets/digits/ddpm-uncond` with the same seeds and scored under the protocol of `scripts/protocol.py`
(held-out reference, independent evaluator): unguided sampling at DDPM-50, DDIM-25 and at each guide's step count;
the teacher (PPAP-5 experts, gradient guidance) at DDPM-50 and DDIM-25; each distilled guide at DDIM with the steps
it was trained or halved for, and the 32-step guide also at 8 steps without halving; then every guide plugged
without retraining into the fine-tuned thick-stroke base (`assets/digits/ddpm-cond-thick`, sampled unconditionally
through its null class), against that base's own held-out digits. Each guided row is swept over `--scales` and
reported at the best scale by the rule of `plugguide.metrics.reporting`; the sweep is printed below the table.
ms / image is the sampling time of the row on this machine (batch 250; 2 CPU threads unless set otherwise; the side
by side timing is `benchmarks/distilled_guidance.py`). Finished rows are kept in `<out>/results.json`, so the script
resumes; `--page` rewrites the table between its markers.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from protocol import QUALITY_HEADERS, describe, measure, quality_cells, reference_metrics, slug, targets
from results_page import add_page_arguments, write_between_markers

from plugguide.datamodules import ThickDigitsDataModule
from plugguide.metrics.reporting import BEST_SCALE_RULE, best_scale, markdown_table
from plugguide.models import load_scheduler, load_unet
from plugguide.models.seeding import seeded_generators
from plugguide.pipelines import GuidedDiffusionPipeline
from plugguide.pipelines.guidance import DistilledGuidance, ExpertGuidance

BASE = "assets/digits/ddpm-uncond"
THICK = "assets/digits/ddpm-cond-thick"
TEACHER_RUNS = (("DDPMScheduler", 50), ("DDIMScheduler", 25))


def sampler(pipeline: GuidedDiffusionPipeline, steps: int, scale: float):
    """sample(labels, seeds) -> images in [-1, 1], guided toward `labels`; a class-conditional base samples under its
    null class (the guide alone says which digit)."""

    def sample(labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        output = pipeline(
            targets=labels,
            batch_size=len(labels),
            generator=seeded_generators(seeds, pipeline.unet.device),
            num_inference_steps=steps,
            classifier_scale=scale,
            output_type="pt",
        )
        return output.images * 2 - 1

    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", required=True, help="the teacher: the main job's exported PPAP-5 experts")
    parser.add_argument("--guides", nargs="+", required=True, help="STEPS=PATH of each exported ShiftGuide")
    parser.add_argument("--scales", type=float, nargs="+", default=[2.0, 4.0, 10.0])
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--out", default="runs/guidance_distillation_table")
    add_page_arguments(parser, "guidance-distillation-table")
    args = parser.parse_args()
    guides = {int(steps): path for steps, path in (item.split("=", 1) for item in args.guides)}
    labels, seeds = targets(args.samples_per_class)
    results_path = os.path.join(args.out, "results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}
    os.makedirs(args.out, exist_ok=True)
    teacher = ExpertGuidance(args.experts)
    distilled = {steps: DistilledGuidance(path) for steps, path in guides.items()}
    parameters = {steps: sum(p.numel() for p in g.guide.parameters()) for steps, g in distilled.items()}
    # Every row of the table, in its order: (section, base, sampler, steps, method, the guide's own steps or None).
    descending = sorted(guides, reverse=True)
    rows = [
        ("digits", BASE, "DDPMScheduler", 50, "unguided", None),
        ("digits", BASE, "DDIMScheduler", 25, "unguided", None),
    ]
    rows += [("digits", BASE, "DDIMScheduler", steps, "unguided", None) for steps in descending]
    rows += [("digits", BASE, sampler_, steps, "PPAP-5 (teacher, gradient)", None) for sampler_, steps in TEACHER_RUNS]
    rows += [("digits", BASE, "DDIMScheduler", steps, f"distilled, {steps}-step guide", steps) for steps in descending]
    if 8 in guides and max(guides) != 8:  # what halving buys: the first guide at 8 steps, not halved
        rows.append(("digits", BASE, "DDIMScheduler", 8, f"distilled, {max(guides)}-step guide", max(guides)))
    rows += [("thick", THICK, "DDIMScheduler", steps, "unguided", None) for steps in descending]
    rows += [("thick", THICK, "DDIMScheduler", steps, f"distilled, {steps}-step guide", steps) for steps in descending]

    metrics = {"digits": reference_metrics(), "thick": reference_metrics(ThickDigitsDataModule())}
    unets = {base: load_unet(base).eval() for base in (BASE, THICK)}

    def guidance_of(method: str, guide_steps: int | None):
        return distilled[guide_steps] if guide_steps else teacher if method.startswith("PPAP") else None

    for section, base, scheduler, steps, method, guide_steps in rows:
        guidance = guidance_of(method, guide_steps)
        pipeline = GuidedDiffusionPipeline(unets[base], load_scheduler(base, scheduler), guidance)
        pipeline.set_progress_bar_config(disable=True)
        for scale in [0.0] if guidance is None else args.scales:
            key = f"{section}/{scheduler}-{steps}/{method}/{scale:g}"
            if key in results:
                continue
            grid = os.path.join(args.out, "grids", f"{slug(key)}.png")
            results[key] = measure(
                metrics[section], sampler(pipeline, steps, scale), labels, seeds, args.batch_size, grid
            )
            with open(f"{results_path}.tmp", "w") as file:
                json.dump(results, file, indent=1)
            os.replace(f"{results_path}.tmp", results_path)
            print(key, {k: round(v, 4) for k, v in results[key].items() if isinstance(v, float)}, flush=True)

    table, sweep = [], []
    for section, base, scheduler, steps, method, guide_steps in rows:
        prefix = f"{section}/{scheduler}-{steps}/{method}"
        sampler_name = f"{scheduler.removesuffix('Scheduler')}-{steps}"
        guided = guidance_of(method, guide_steps) is not None
        chosen, marker = "0", ""
        if guided:
            swept = {f"{scale:g}": results[f"{prefix}/{scale:g}"] for scale in args.scales}
            chosen, met = best_scale(swept, results[f"{section}/{scheduler}-{steps}/unguided/0"])
            marker = "" if met else "*"
            sweep.append(
                f"- {base}, {sampler_name}, {method}: "
                + ", ".join(
                    f"s = {scale}: accuracy {r['guided_accuracy']:.3f}, FID {r['fid_autoencoder']:.2f}"
                    for scale, r in swept.items()
                )
            )
        row = results[f"{prefix}/{chosen}"]
        table.append(
            [
                base.removeprefix("assets/digits/"),
                sampler_name,
                method,
                f"{chosen}{marker}" if guided else "-",
                *quality_cells(row),
                f"{1000 * row['seconds_per_image']:.1f}",
                f"{parameters[guide_steps]:,}" if guide_steps else "-",
            ]
        )
    text = "\n".join(
        [
            describe(len(labels), "Unguided, PPAP-5 and distilled guidance"),
            f"Best scale: {BEST_SCALE_RULE}. Scales swept: {', '.join(f'{s:g}' for s in args.scales)}.",
            "",
            markdown_table(
                ["base", "sampler", "method", "classifier_scale", *QUALITY_HEADERS, "ms / image", "trainable params"],
                table,
            ),
            "",
            "The sweep (guided accuracy and autoencoder FID at each scale):",
            "",
            *sweep,
        ]
    )
    if args.page:
        write_between_markers(args.page, args.marker, text)
    print(text)


if __name__ == "__main__":
    main()
