"""Particle samplers on the digits against gradient guidance and the distilled guide, with the accuracy-FID frontier.

    python scripts/particles_table.py [--experts runs/ppap/latest/experts] [--only NAME ...] [--samples-per-class 50]
                                      [--timings runs/particles_benchmark.json] [--output-dir runs/particles_table]

Rows, all on `assets/digits/ddpm-uncond` with the same seeds, scored under the protocol of `scripts/protocol.py`:
unguided DDPM-50; gradient guidance at the scales its pages swept (PPAP-5 experts at s = 2, 3, 4, 5, 10 as
docs/results/ppap.md's main-job sweep; calibrated guidance, `CalibratedGuidance` with its defaults, at s = 3, 10 as
docs/results/calibration.md); `ParticleDiffusionPipeline` with K particles per sample, PPAP-5 and calibrated guidance
as TDS's twist (the guided step at s = 1 proposes, the weight corrects it; PPAP-5 also at s = 2, the twist
p(y | .)^2) and as FK steering's "diff" potential (lambda 1, unguided proposals), and best-of-N by the PPAP-5 reward;
and the distilled guide (`--guide`, halved to 8 steps) on its own DDIM-8 grid at the scales its page swept. Each row records its denoiser and guide calls per sample
and, for particle rows, the effective sample size after each step's weights. The guides' ECE_t on the forward-noised
val digits is measured beside them: a twist or potential that is not calibrated at a noise level weighs particles
there by a wrong likelihood.

Time per image is not measured here (the machine is shared while tables run): `benchmarks/particles.py` times each
row's method alone and writes `--timings`, which fills the ms / image column. Finished rows are kept in
`<output-dir>/results.json`, so the script resumes; `--page` rewrites the table between its markers and the frontier
figure (`--figure`) is drawn from the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import torch
from protocol import QUALITY_HEADERS, describe, measure, quality_cells, reference_metrics, slug, targets
from results_page import add_page_arguments, publish_table

from plugguide.datamodules import DigitsDataModule
from plugguide.metrics import calibration_curve, calibration_timesteps
from plugguide.metrics.figures import sweep_figure
from plugguide.metrics.reporting import markdown_table
from plugguide.models import load_scheduler, load_unet
from plugguide.models.seeding import seeded_generators
from plugguide.pipelines import GuidedDiffusionPipeline, ParticleDiffusionPipeline, ParticleSettings
from plugguide.pipelines.guidance import CalibratedGuidance, DistilledGuidance, ExpertGuidance

MODEL = "assets/digits/ddpm-uncond"
CLASSIFIER = "assets/digits/classifier-resnet"
STEPS = 50
DISTILLED_STEPS = 8


@dataclass(frozen=True)
class Method:
    """One method of the table: its guide, how it samples, and what its rows sweep (scales s, or particles K).

    `kind` is "unguided", "gradient" (classifier guidance at each scale of `sweep`), "particles" (K particles for each
    K of `sweep`, the guided proposal at `classifier_scale`) or "distilled" (the distilled guide at each scale)."""

    name: str
    kind: str
    guide: str | None = None  # "ppap", "calibrated" or "distilled"
    sweep: tuple = (0,)
    settings: ParticleSettings | None = None
    classifier_scale: float = 0.0

    @property
    def sampler(self) -> str:
        return f"DDIM-{DISTILLED_STEPS} (its halving grid)" if self.kind == "distilled" else f"DDPM-{STEPS}"

    @property
    def steps(self) -> int:
        return DISTILLED_STEPS if self.kind == "distilled" else STEPS


TDS = ParticleSettings(potential="twisted")
FK = ParticleSettings(potential="diff")
METHODS = [
    Method("unguided", "unguided"),
    Method("gradient, PPAP-5", "gradient", "ppap", (2.0, 3.0, 4.0, 5.0, 10.0)),
    Method("gradient, calibrated", "gradient", "calibrated", (3.0, 10.0)),
    Method("TDS, PPAP-5 twist", "particles", "ppap", (2, 4, 8, 16), TDS, 1.0),
    Method("TDS, PPAP-5 twist, s = 2", "particles", "ppap", (4, 8), TDS, 2.0),
    Method("FK diff, PPAP-5 potential", "particles", "ppap", (2, 4, 8), FK),
    Method("TDS, calibrated twist", "particles", "calibrated", (2, 4, 8), TDS, 1.0),
    Method("FK diff, calibrated potential", "particles", "calibrated", (2, 4, 8), FK),
    Method("best-of-N, PPAP-5 reward", "particles", "ppap", (2, 4, 8), ParticleSettings.best_of_n()),
    Method("distilled guide, 8 steps", "distilled", "distilled", (1.0, 2.0, 4.0, 10.0)),
]


def guides(args) -> dict:
    """name -> a factory of the guide (fresh per row, so no run's state leaks into the next)."""
    return {
        "ppap": lambda: ExpertGuidance(args.experts),
        "calibrated": lambda: CalibratedGuidance(args.classifier),
        "distilled": lambda: DistilledGuidance(args.guide),
    }


def build(method: Method, value, args, unet, guide_factories) -> tuple:
    """(pipeline, call kwargs) of one row: `value` is the row's scale s, or its number of particles K."""
    guidance = None if method.guide is None else guide_factories[method.guide]()
    scheduler = load_scheduler(MODEL, "DDIMScheduler" if method.kind == "distilled" else "DDPMScheduler")
    call = dict(num_inference_steps=method.steps)
    if method.kind == "particles":
        pipeline = ParticleDiffusionPipeline(unet, scheduler, guidance)
        call |= dict(num_particles=int(value), particle_settings=method.settings)
        call["classifier_scale"] = method.classifier_scale
    else:
        pipeline = GuidedDiffusionPipeline(unet, scheduler, guidance)
        call["classifier_scale"] = float(value)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, call


def row_sampler(pipeline, call: dict, record: dict):
    """sample(labels, seeds) for `measure`, one generator per sample seeded with its seed (as `sample_batch`); a
    particle run's calls per sample and its per-step ESS (S, B) go to `record`."""

    def sample(labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        generators = seeded_generators(seeds, pipeline.unet.device)
        output = pipeline(class_labels=labels, generator=generators, output_type="pt", **call)
        if hasattr(output, "ess"):
            record["costs"] = output.costs
            record.setdefault("ess", []).append(output.ess)
        return output.images * 2 - 1

    return sample


def gradient_costs(method: Method) -> dict:
    """Calls per sample of a one-particle run: one denoiser pass per step, one guide pass (gradient, or the distilled
    guide's one pass) per guided step (every DDPM and DDIM step has signal, abar_t > 0)."""
    guided = 0 if method.kind == "unguided" else method.steps
    return {"denoiser": method.steps, "guidance_gradient": guided, "guidance_forward": 0}


def ess_summary(ess: torch.Tensor, num_particles: int) -> dict:
    """Mean over samples of the ESS after each weighing step, as a fraction of K, and its smallest value."""
    per_step = (ess.float().mean(1) / num_particles).tolist()
    return {"ess_per_step": per_step, "ess_min": min(per_step) if per_step else None}


def ess_cell(results: dict) -> str:
    if not results.get("ess_per_step"):
        return "-"
    per_step = results["ess_per_step"]
    return f"{sum(per_step) / len(per_step):.2f} / {results['ess_min']:.2f}"


def value_cells(method: Method, value) -> tuple[str, str]:
    """(K, s) cells of a row."""
    if method.kind == "particles":
        return str(value), f"{method.classifier_scale:g}" if method.classifier_scale else "0"
    return "1", "-" if method.kind == "unguided" else f"{float(value):g}"


def add_guide_arguments(parser: argparse.ArgumentParser) -> None:
    """The guides every row is built from (`--experts`, `--classifier`, `--guide`), shared with the benchmark."""
    parser.add_argument("--experts", default="runs/ppap/latest/experts", help="the main job's exported PPAP-5 experts")
    parser.add_argument("--classifier", default=CLASSIFIER, help="the off-the-shelf classifier of calibrated guidance")
    parser.add_argument(
        "--guide",
        default="runs/guidance-halving/16to8/latest/guides/shift/steps-8",
        help="the distilled ShiftGuide halved to 8 steps (docs/results/guidance_distillation.md)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_guide_arguments(parser)
    parser.add_argument(
        "--only", nargs="+", default=None, help="run only these methods (names of the table's method column)"
    )
    parser.add_argument(
        "--particles", type=int, nargs="+", default=None, help="run only these K of the particle methods"
    )
    parser.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=None,
        help="run only these scales of the gradient and distilled rows",
    )
    parser.add_argument(
        "--measured-only",
        action="store_true",
        help="sample nothing: write the table and figure from the selected rows already in results.json",
    )
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=250, help="samples per pipeline call (K particles each)")
    parser.add_argument("--timesteps", type=int, default=10, help="timesteps of the guides' ECE_t")
    parser.add_argument("--timings", default=None, help="JSON written by benchmarks/particles.py (ms / image per row)")
    parser.add_argument("--output-dir", default="runs/particles_table", help="run folder: results.json, grids/")
    parser.add_argument(
        "--figure",
        default=None,
        help="where to save the frontier figure (PNG), e.g. docs/results/particles_frontier.png",
    )
    add_page_arguments(parser, "particles-table")
    args = parser.parse_args()
    known = [method.name for method in METHODS]
    unknown = [name for name in args.only or [] if name not in known]
    if unknown:
        parser.error(f"`--only` takes method names of {known}, but got {unknown}.")

    os.makedirs(args.output_dir, exist_ok=True)
    results_path = os.path.join(args.output_dir, "results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}
    timings = json.load(open(args.timings)) if args.timings else {}
    labels, seeds = targets(args.samples_per_class)
    unet = load_unet(MODEL).eval().requires_grad_(False)
    factories = guides(args)
    metrics = None  # loaded when a row is first sampled

    def save() -> None:
        with open(f"{results_path}.tmp", "w") as file:
            json.dump(results, file, indent=1)
        os.replace(f"{results_path}.tmp", results_path)

    chosen = [m for m in METHODS if m.kind == "unguided" or args.only is None or m.name in args.only]
    rows = []
    for method in chosen:
        values = [
            v
            for v in method.sweep
            if method.kind == "unguided"
            or (args.particles if method.kind == "particles" else args.scales) is None
            or v in (args.particles if method.kind == "particles" else args.scales)
        ]
        for value in values:
            key = f"{method.name}/{value}"
            if args.measured_only and key not in results:
                continue
            rows.append((method, value, key))
            if key in results:
                continue
            metrics = metrics or reference_metrics()
            pipeline, call = build(method, value, args, unet, factories)
            record = {}
            measured = measure(
                metrics,
                row_sampler(pipeline, call, record),
                labels,
                seeds,
                args.batch_size // (int(value) if method.kind == "particles" else 1),
                os.path.join(args.output_dir, "grids", f"{slug(key)}.png"),
            )
            measured["costs"] = record.get("costs") or gradient_costs(method)
            if "ess" in record:
                measured |= ess_summary(torch.cat(record["ess"], dim=1), int(value))
            results[key] = measured
            save()
            print(key, {k: round(v, 4) for k, v in measured.items() if isinstance(v, float)}, flush=True)

    calibration = results.setdefault("ece_t", {})
    names = {"ppap": "PPAP-5 experts (x_t)", "calibrated": "calibrated classifier (x0_hat)"}
    if any(name not in calibration for name in names):
        data = DigitsDataModule(batch_size=180)
        data.setup("validate")
        held_out = list(data.val_dataloader())
        alphas = load_scheduler(MODEL, "DDPMScheduler").alphas_cumprod
        timesteps = calibration_timesteps(args.timesteps, len(alphas))
        for guide, name in names.items():
            if name not in calibration:
                calibration[name] = calibration_curve(factories[guide](), held_out, timesteps, alphas, unet)
        save()

    unguided = results["unguided/0"]
    table = []
    for method, value, key in rows:
        r = results[key]
        costs = r["costs"]
        k, s = value_cells(method, value)
        ms = timings.get(key)
        table.append(
            [
                method.name,
                method.sampler,
                k,
                s,
                str(costs["denoiser"]),
                f"{costs['guidance_gradient']} + {costs['guidance_forward']}",
                "-" if ms is None else f"{ms:.1f}",
                ess_cell(r),
                *quality_cells(r),
            ]
        )
    particle_rows = [(m, v, k) for m, v, k in rows if m.kind == "particles" and results[k].get("ess_per_step")]
    marks = [0, 10, 20, 30, 40, 45, 48, 49]
    ess_table = [
        [f"{m.name}, K = {v}", *(f"{results[k]['ess_per_step'][i]:.2f}" for i in marks)]
        for m, v, k in particle_rows
        if len(results[k]["ess_per_step"]) == STEPS
    ]
    curves = list(calibration.values())
    ece_table = [
        [name, *(f"{e:.3f} ({a:.2f})" for e, a in zip(curve["ece"], curve["accuracy"]))]
        for name, curve in calibration.items()
    ]
    text = "\n".join(
        [
            describe(len(labels), f"DDPM-{STEPS} (ancestral), the distilled guide on its DDIM-{DISTILLED_STEPS} grid")
            + " K: particles per sample; s: the gradient's classifier scale (for TDS, the proposal's, and the twist"
            " is p(y | .)^s).",
            "",
            markdown_table(
                [
                    "method",
                    "sampler",
                    "K",
                    "s",
                    "denoiser calls / sample",
                    "guide calls / sample (gradient + forward)",
                    "ms / image",
                    "ESS / K (mean over steps / lowest)",
                    *QUALITY_HEADERS,
                ],
                table,
            ),
            "",
            "Effective sample size along the chain (mean over samples, as a fraction of K) after the weights of"
            " sampler step i (DDPM-50 evaluates step i at t = 980 - 20 i):",
            "",
            markdown_table(["row", *(f"step {i}" for i in marks)], ess_table),
            "",
            "The guides' calibration by noise level: ECE_t (accuracy_t) on the 180 val digits forward-noised (seed 0),"
            " on each guide's own input:",
            "",
            markdown_table(["guide", *(f"t = {t}" for t in curves[0]["timestep"])], ece_table),
        ]
    )
    publish_table(text, args.output_dir, args.page, args.marker)
    if args.figure:
        frontier = {}
        for method, value, key in rows:
            if method.kind == "unguided":
                continue
            unit = "K" if method.kind == "particles" else "s"
            frontier.setdefault(f"{method.name} ({unit})", {})[str(value)] = results[key]
        figure = sweep_figure(frontier, unguided, None)
        figure.axes[0].set_title(f"Guided accuracy against FID, {len(labels)} samples per point", fontsize=9)
        figure.savefig(f"{args.figure}.tmp", format="png", dpi=72)
        os.replace(f"{args.figure}.tmp", args.figure)
    print(text)


if __name__ == "__main__":
    main()
