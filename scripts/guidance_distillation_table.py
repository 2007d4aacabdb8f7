"""Distilled gradient guidance (a `ShiftGuide`, no classifier at sampling time) beside its teacher, as markdown.

    python scripts/guidance_distillation_table.py --experts runs/ppap/version_0/experts \
        --guides 32=runs/guidance-distillation/version_0/guides/shift/steps-32 \
                 16=runs/guidance-halving/32to16/version_0/guides/shift/steps-16 \
                 8=runs/guidance-halving/16to8/version_0/guides/shift/steps-8 \
                 4=runs/guidance-halving/8to4/version_0/guides/shift/steps-4 \
        [--trailing-guides 16=... 8=... 4=...] [--samples-per-class 50] [--output-dir runs/guidance_distillation_table] [--page docs/results/guidance_distillation.md]

Rows, all with the same seeds and scored under the protocol of `scripts/protocol.py` (held-out reference,
independent evaluator): on `assets/digits/ddpm-uncond`, unguided sampling at DDPM-50, DDIM-25 and at each guide's
step count; the teacher (PPAP-5 experts, gradient guidance) at DDPM-50, DDIM-25 and DDIM-8; each distilled guide at
DDIM with the steps it was trained or halved for, the 32-step guide also at 8 steps without halving, first-stage guides
of other sizes (`--other-guides`), and the guides halved on "trailing" timesteps (`--trailing-guides`, sampled with
that spacing beside unguided sampling with it); then, on the fine-tuned thick-stroke base
(`assets/digits/ddpm-cond-thick`, sampled unconditionally through its null class, scored against its own held-out
digits), the teacher at DDIM-32 and every guide of the first chain plugged in without retraining. Each guided row is
swept over `--classifier-scales` and reported at the best scale by the rule of `plugguide.metrics.reporting`; the sweep is
printed below the table. Time per image is not a column: it is measured side by side, alone on the machine, by
`benchmarks/distilled_guidance.py`. Finished rows are kept in `<output-dir>/results.json`, so the script
resumes; `--page` rewrites the table between its markers.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import torch
from protocol import QUALITY_HEADERS, describe, measure, quality_cells, reference_metrics, slug, targets
from results_page import add_page_arguments, write_between_markers

from plugguide.datamodules import ThickDigitsDataModule
from plugguide.metrics.reporting import best_scale, markdown_table
from plugguide.models import load_scheduler, load_unet, sampler_on_grid
from plugguide.models.seeding import seeded_generators
from plugguide.pipelines import GuidedDiffusionPipeline
from plugguide.pipelines.guidance import DistilledGuidance, ExpertGuidance

BASE = "assets/digits/ddpm-uncond"
THICK = "assets/digits/ddpm-cond-thick"
TEACHER = "PPAP-5 (teacher, gradient)"
SPACINGS = ("leading", "trailing")


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


@dataclass(frozen=True)
class Row:
    """One row: a base, a sampler with its timestep spacing and steps, and a method (a guide is named by its chain)."""

    section: str  # "digits" or "thick": which reference set
    base: str
    scheduler: str
    steps: int
    method: str  # "unguided", "PPAP-5 (teacher, gradient)", or "distilled"
    chain: str | None = None  # the distilled guide's chain: "leading" or "trailing"
    guide_steps: int | None = None  # the step count the distilled guide was trained or halved for
    spacing: str = "leading"
    grid: tuple[int, ...] | None = None  # a halved guide's own DDIM timesteps, where they are not DDIM's spacing's

    @property
    def sampler(self) -> str:
        return f"{self.scheduler}-{self.steps}-{self.spacing}" + ("-halving-grid" if self.grid else "")

    @property
    def key(self) -> str:
        return f"{self.section}/{self.sampler}/{self.label}"

    @property
    def unguided_key(self) -> str:
        return f"{self.section}/{self.sampler}/unguided/0"

    @property
    def label(self) -> str:
        if self.method != "distilled":
            return self.method
        if self.chain not in SPACINGS:
            return f"distilled, {self.guide_steps}-step guide ({self.chain})"
        halved = "" if self.chain == "leading" and self.guide_steps == 32 else f", halved on {self.chain} timesteps"
        return f"distilled, {self.guide_steps}-step guide{halved}"


def own_grid(guidance: DistilledGuidance, steps: int, spacing: str) -> tuple[int, ...] | None:
    """The DDIM timesteps a halved guide samples on, unless DDIM samples them itself: leading spacing on its own grid.
    (DDIM steps t -> t - T // N, which leaves a trailing grid: 999 -> 937 -> 875, where 16 trailing steps are at 874.)"""
    if guidance.timesteps is None:
        return None
    own = load_scheduler(BASE, "DDIMScheduler", overrides={"timestep_spacing": spacing})
    own.set_timesteps(steps)
    return None if spacing == "leading" and own.timesteps.tolist() == guidance.timesteps else tuple(guidance.timesteps)


def parse_guides(items: list[str]) -> dict[int, str]:
    return {int(steps): path for steps, path in (item.split("=", 1) for item in items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", required=True, help="the teacher: the main job's exported PPAP-5 experts")
    parser.add_argument("--guides", nargs="+", required=True, help="STEPS=PATH of each exported ShiftGuide")
    parser.add_argument(
        "--trailing-guides", nargs="*", default=[], help="STEPS=PATH of guides halved on trailing timesteps"
    )
    parser.add_argument(
        "--other-guides", nargs="*", default=[], help="NAME=PATH of first-stage guides of other sizes, for comparison"
    )
    parser.add_argument(
        "--classifier-scales",
        type=float,
        nargs="+",
        default=[1.0, 2.0, 4.0, 10.0],
        help="classifier scales s swept (the pipeline's `classifier_scale`, the weight of the classifier's gradient)",
    )
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument(
        "--output-dir", default="runs/guidance_distillation_table", help="run folder: results.json, grids/"
    )
    add_page_arguments(parser, "guidance-distillation-table")
    args = parser.parse_args()
    chains = {"leading": parse_guides(args.guides), "trailing": parse_guides(args.trailing_guides)}
    first = max(chains["leading"])
    chains |= {name: {first: path} for name, path in (item.split("=", 1) for item in args.other_guides)}
    labels, seeds = targets(args.samples_per_class)
    results_path = os.path.join(args.output_dir, "results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}
    os.makedirs(args.output_dir, exist_ok=True)
    teacher = ExpertGuidance(args.experts)
    distilled = {(c, n): DistilledGuidance(path) for c, guides in chains.items() for n, path in guides.items()}
    parameters = {key: sum(p.numel() for p in g.guide.parameters()) for key, g in distilled.items()}
    grids = {
        key: own_grid(g, key[1], spacing) for key, g in distilled.items() for spacing in SPACINGS if key[0] == spacing
    }

    leading, trailing = (sorted(chains[c], reverse=True) for c in ("leading", "trailing"))
    teacher_runs = [("DDPMScheduler", 50), ("DDIMScheduler", 25), ("DDIMScheduler", 8)]
    rows = [Row("digits", BASE, scheduler, n, "unguided") for scheduler, n in teacher_runs[:2]]
    rows += [Row("digits", BASE, "DDIMScheduler", n, "unguided") for n in leading if n != 25]
    rows += [Row("digits", BASE, scheduler, n, TEACHER) for scheduler, n in teacher_runs]
    # A guide halved on a grid that is not DDIM's own samples there, beside unguided DDIM on the same timesteps.
    rows += [
        Row("digits", BASE, "DDIMScheduler", n, "unguided", grid=grids[("leading", n)])
        for n in leading
        if grids[("leading", n)]
    ]
    rows += [
        Row("digits", BASE, "DDIMScheduler", n, "distilled", "leading", n, grid=grids[("leading", n)]) for n in leading
    ]
    if 8 in leading and first != 8:  # what halving buys: the first guide at 8 steps, not halved
        rows.append(Row("digits", BASE, "DDIMScheduler", 8, "distilled", "leading", first))
    # Other guides of the first stage (other sizes), at the step count they were trained for.
    rows += [
        Row("digits", BASE, "DDIMScheduler", first, "distilled", name, first)
        for name in chains
        if name not in SPACINGS
    ]
    for n in trailing:
        rows += [
            Row("digits", BASE, "DDIMScheduler", n, "unguided", spacing="trailing", grid=grids[("trailing", n)]),
            Row("digits", BASE, "DDIMScheduler", n, "distilled", "trailing", n, "trailing", grids[("trailing", n)]),
        ]
    rows.append(Row("thick", THICK, "DDIMScheduler", first, TEACHER))  # the teacher itself on the fine-tuned base
    for n in leading:
        rows += [
            Row("thick", THICK, "DDIMScheduler", n, "unguided", grid=grids[("leading", n)]),
            Row("thick", THICK, "DDIMScheduler", n, "distilled", "leading", n, grid=grids[("leading", n)]),
        ]

    metrics = {"digits": reference_metrics(), "thick": reference_metrics(ThickDigitsDataModule())}
    unets = {base: load_unet(base).eval() for base in (BASE, THICK)}

    def guidance_of(row: Row):
        if row.method == "distilled":
            return distilled[(row.chain, row.guide_steps)]
        return teacher if row.method == TEACHER else None

    for row in rows:
        guidance = guidance_of(row)
        scheduler = load_scheduler(row.base, row.scheduler, overrides={"timestep_spacing": row.spacing})
        scheduler = sampler_on_grid(scheduler, row.grid)
        pipeline = GuidedDiffusionPipeline(unets[row.base], scheduler, guidance)
        pipeline.set_progress_bar_config(disable=True)
        for scale in [0.0] if guidance is None else args.classifier_scales:
            key = f"{row.key}/{scale:g}"
            if key in results:
                continue
            grid = os.path.join(args.output_dir, "grids", f"{slug(key)}.png")
            results[key] = measure(
                metrics[row.section], sampler(pipeline, row.steps, scale), labels, seeds, args.batch_size, grid
            )
            with open(f"{results_path}.tmp", "w") as file:
                json.dump(results, file, indent=1)
            os.replace(f"{results_path}.tmp", results_path)
            print(key, {k: round(v, 4) for k, v in results[key].items() if isinstance(v, float)}, flush=True)

    table, sweep = [], []
    for row in rows:
        sampler_name = f"{row.scheduler.removesuffix('Scheduler')}-{row.steps}" + (
            f" ({row.spacing})" if row.spacing != "leading" else ""
        )
        if row.grid:
            sampler_name += f" (halving grid {', '.join(map(str, row.grid))})"
        guided = guidance_of(row) is not None
        chosen, marker = "0", ""
        if guided:
            swept = {f"{scale:g}": results[f"{row.key}/{scale:g}"] for scale in args.classifier_scales}
            chosen, met = best_scale(swept, results[row.unguided_key])
            marker = "" if met else "*"
            sweep.append(
                f"- {row.base}, {sampler_name}, {row.label}: "
                + ", ".join(
                    f"s = {scale}: accuracy {r['guided_accuracy']:.3f}, FID {r['fid_autoencoder']:.2f}"
                    for scale, r in swept.items()
                )
            )
        measured = results[f"{row.key}/{chosen}"]
        table.append(
            [
                row.base.removeprefix("assets/digits/"),
                sampler_name,
                row.label,
                f"{chosen}{marker}" if guided else "-",
                *quality_cells(measured),
                f"{parameters[(row.chain, row.guide_steps)]:,}" if row.method == "distilled" else "-",
            ]
        )
    text = "\n".join(
        [
            describe(len(labels), "Unguided, PPAP-5 and distilled guidance"),
            f"Scales swept: {', '.join(f'{s:g}' for s in args.classifier_scales)}.",
            "",
            markdown_table(
                ["base", "sampler", "method", "classifier_scale", *QUALITY_HEADERS, "trainable params"],
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
