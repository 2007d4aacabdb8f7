"""Ablation of calibrated off-the-shelf guidance (Ma et al., 2023) on the digits default, printed as markdown.

    python scripts/calibration_ablation.py [--experts runs/ppap_table/resnet/PPAP-5/experts] [--classifier-scales 3 10 30]
                                           [--samples-per-class 50] [--trajectory-samples 200] [--output-dir runs/calibration_ablation]

Rows: naive (classifier on x_t), plain classifier on x0_hat, Softplus beta in {8, 5, 3}, marginal discount 0.5,
sine gamma 0.3, the full calibrated guide on x_t instead of x0_hat, and, with `--experts`, PPAP experts and
calibrated experts (Softplus + temperatures on the experts). Every row is sampled with DDPM-`--steps` at each
scale of `--classifier-scales` and scored under the protocol of `scripts/protocol.py`; its reported scale follows
`BEST_SCALE_RULE`. Each row's guide is also measured for its integral ECE (mean ECE_t over t, on the guide's own
input: x_t, or x0_hat from the guided model) in two ways:

- forward: on the 180 val digits, forward-noised with seed 0, at `--timesteps` timesteps spanning 0..T-1;
- reverse, EluCD's definition (Ma et al., 2023, section 4.1): on the reverse-process samples x_t of the
  class-conditional `--conditional-model` (DDPM-`--steps`, no CFG, `--trajectory-samples` samples, classes 0..9
  in turn, seeds 0.., labelled by their condition), at each of its sampler's timesteps.

Both curve sets are written (curves.csv, curves_reverse.csv) and drawn (calibration_forward.png,
calibration_reverse.png). The script ends with the Spearman rank correlation between each integral ECE and FID
(autoencoder and evaluator features) across rows. Measured rows, scales and curves are kept in `--output-dir` and a rerun
resumes from them.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from protocol import (
    QUALITY_HEADERS,
    describe,
    measure,
    pipeline_sampler,
    quality_cells,
    reference_metrics,
    slug,
    targets,
)
from results_page import add_page_arguments, publish_table
from scipy.stats import spearmanr

from plugguide.datamodules import DigitsDataModule
from plugguide.metrics import (
    calibration_curve,
    calibration_figure,
    calibration_timesteps,
    read_curves_csv,
    write_curves_csv,
)
from plugguide.metrics.calibration import reverse_process_calibration_curve
from plugguide.metrics.reporting import best_scale, markdown_table
from plugguide.models import load_scheduler, load_unet
from plugguide.pipelines import GuidedDiffusionPipeline, sample_trajectory
from plugguide.pipelines.guidance import CalibratedGuidance, ExpertGuidance, NaiveClassifierGuidance

OFF = dict(softplus_beta=None, marginal_discount=1.0, sine_gamma=0.0)
# The two definitions of ECE_t: the table column of their integral, the files of their curves and figure.
DEFINITIONS = {
    "forward": dict(column="integral ECE (forward)", curves="curves.csv", figure="calibration_forward.png"),
    "reverse": dict(column="integral ECE (reverse)", curves="curves_reverse.csv", figure="calibration_reverse.png"),
}


def rows(classifier: str, experts: str | None, experts_name: str) -> dict:
    """name: a factory of the row's guidance (fresh, so the sine schedule's state never leaks between rows)."""
    table = {
        "naive (x_t, all off)": lambda: NaiveClassifierGuidance(classifier),
        "x0_hat, beta inf": lambda: CalibratedGuidance(classifier, **OFF),
        "x0_hat, beta 8": lambda: CalibratedGuidance(classifier, **{**OFF, "softplus_beta": 8.0}),
        "x0_hat, beta 5": lambda: CalibratedGuidance(classifier, **{**OFF, "softplus_beta": 5.0}),
        "x0_hat, beta 3": lambda: CalibratedGuidance(classifier, **{**OFF, "softplus_beta": 3.0}),
        "x0_hat, beta 3, discount 0.5": lambda: CalibratedGuidance(classifier, sine_gamma=0.0),
        "x0_hat, beta 3, discount 0.5, gamma 0.3 (calibrated)": lambda: CalibratedGuidance(classifier),
        "x_t, beta 3, discount 0.5, gamma 0.3": lambda: CalibratedGuidance(classifier, input="x_t"),
    }
    if experts:
        table[f"{experts_name} (x_t)"] = lambda: ExpertGuidance(experts)
        table[f"{experts_name}, beta 3, discount 0.5"] = lambda: CalibratedGuidance(
            ExpertGuidance(experts), sine_gamma=0.0
        )
        table[f"{experts_name}, beta 3, discount 0.5, gamma 0.3"] = lambda: CalibratedGuidance(ExpertGuidance(experts))
    return table


def correlations(chosen: list[dict], every: list[dict]) -> list[str]:
    lines = []
    for definition, files in DEFINITIONS.items():
        for distance in ("fid_autoencoder", "fid_evaluator"):
            rho_best = spearmanr([e[definition] for e in chosen], [e[distance] for e in chosen])
            rho_all = spearmanr([e[definition] for e in every], [e[distance] for e in every])
            lines.append(
                f"Spearman rank correlation, {files['column']} vs {distance}: {rho_best.statistic:.2f} (p = {rho_best.pvalue:.2f}) across the "
                f"{len(chosen)} rows at their reported scale; {rho_all.statistic:.2f} (p = {rho_all.pvalue:.2f}) over all {len(every)} (row, scale) entries."
            )
    return lines


def save_figure(curves: dict, title: str, path: str) -> None:
    figure = calibration_figure(curves)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path + ".tmp", format="png", dpi=120)
    os.replace(path + ".tmp", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusion-model", default="assets/digits/ddpm-uncond")
    parser.add_argument(
        "--conditional-model",
        default="assets/digits/ddpm-cond",
        help="the class-conditional model whose sampler gives the reverse-process x_t",
    )
    parser.add_argument("--classifier", default="assets/digits/classifier-resnet")
    parser.add_argument("--experts", default=None, help="a saved MultiExpertModel directory (PPAP rows)")
    parser.add_argument("--experts-name", default="PPAP-5 experts", help="row label of the expert rows")
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--classifier-scales",
        type=float,
        nargs="+",
        default=[3.0, 10.0, 30.0],
        help="classifier scales s swept (the pipeline's `classifier_scale`, the weight of the classifier's gradient)",
    )
    parser.add_argument("--timesteps", type=int, default=20, help="timesteps of the forward-noised ECE curve")
    parser.add_argument(
        "--trajectory-samples",
        type=int,
        default=200,
        help="reverse-process samples of the reverse ECE curve (a multiple of 10)",
    )
    parser.add_argument(
        "--output-dir", default="runs/calibration_ablation", help="run folder: results, curves, grids/, table.md"
    )
    parser.add_argument("--only", default=None, help="run only the rows whose name contains this text (e.g. PPAP)")
    add_page_arguments(parser, "calibration-ablation")
    args = parser.parse_args()
    if args.trajectory_samples < 10 or args.trajectory_samples % 10:
        parser.error(
            f"Expected `--trajectory-samples` to be a positive multiple of 10 (as many of each class), but got {args.trajectory_samples}."
        )
    os.makedirs(args.output_dir, exist_ok=True)

    unet = load_unet(args.diffusion_model).eval().requires_grad_(False)
    scheduler = load_scheduler(args.diffusion_model, "DDPMScheduler")
    conditional = GuidedDiffusionPipeline(
        load_unet(args.conditional_model).eval().requires_grad_(False),
        load_scheduler(args.conditional_model, "DDPMScheduler"),
    )
    conditional.set_progress_bar_config(disable=True)
    if not torch.equal(conditional.scheduler.alphas_cumprod, scheduler.alphas_cumprod):
        # x0_hat of an x0_hat guide is formed by the guided model at the trajectory's timesteps: the noise levels must agree.
        parser.error(
            f"`--conditional-model` {args.conditional_model} has another noise schedule than `--diffusion-model` {args.diffusion_model}."
        )
    metrics = reference_metrics()
    data = DigitsDataModule(batch_size=180)
    data.setup("validate")
    held_out = list(data.val_dataloader())
    timesteps = calibration_timesteps(args.timesteps, len(scheduler.alphas_cumprod))
    labels, seeds = targets(args.samples_per_class)
    results_path = os.path.join(args.output_dir, "results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}
    curves_paths = {
        definition: os.path.join(args.output_dir, files["curves"]) for definition, files in DEFINITIONS.items()
    }
    curves = {
        definition: read_curves_csv(path) if os.path.isfile(path) else {} for definition, path in curves_paths.items()
    }
    trajectory_labels, trajectory_seeds = targets(args.trajectory_samples // 10)
    trajectory = {}  # sampled when a row first needs it

    def reverse_curve(guidance) -> dict:
        if not trajectory:
            batch = {"label": trajectory_labels, "seed": trajectory_seeds}
            trajectory.update(sample_trajectory(conditional, batch, num_inference_steps=args.steps))
        return reverse_process_calibration_curve(
            guidance, trajectory, trajectory_labels, scheduler.alphas_cumprod, unet
        )

    def sample(guidance, scale: float, name: str) -> dict:
        pipeline = GuidedDiffusionPipeline(unet, scheduler, guidance)
        pipeline.set_progress_bar_config(disable=True)
        return measure(
            metrics,
            pipeline_sampler(pipeline, num_inference_steps=args.steps, classifier_scale=scale),
            labels,
            seeds,
            grid_path=os.path.join(args.output_dir, "grids", f"{slug(name)}-s{scale:g}.png"),
        )

    def save() -> None:
        with open(results_path + ".tmp", "w") as file:
            json.dump(results, file, indent=1)
        os.replace(results_path + ".tmp", results_path)
        for definition, path in curves_paths.items():
            write_curves_csv(curves[definition], path)

    if "unguided" not in results:
        results["unguided"] = {"0": sample(None, 0.0, "unguided")}
        save()
    unguided = results["unguided"]["0"]
    table, chosen, every = [["unguided", "-", "-", "-", *quality_cells(unguided)]], [], []
    for name, make in rows(args.classifier, args.experts, args.experts_name).items():
        if args.only and args.only not in name:
            continue
        if name not in curves["forward"]:
            curves["forward"][name] = calibration_curve(make(), held_out, timesteps, scheduler.alphas_cumprod, unet)
        if name not in curves["reverse"]:
            curves["reverse"][name] = reverse_curve(make())
        sweep = results.setdefault(name, {})
        for scale in [s for s in args.classifier_scales if str(s) not in sweep]:
            sweep[str(scale)] = sample(make(), scale, name)
            save()
            print(
                name, scale, {k: round(v, 4) for k, v in sweep[str(scale)].items() if isinstance(v, float)}, flush=True
            )
        integrals = {definition: curves[definition][name]["integral_ece"][0] for definition in DEFINITIONS}
        scale, admissible = best_scale(sweep, unguided)
        every += [integrals | r for r in sweep.values()]
        chosen.append(integrals | sweep[scale])
        table.append(
            [
                name,
                *(f"{value:.3f}" for value in integrals.values()),
                f"{float(scale):g}" + ("" if admissible else "*"),
                *quality_cells(sweep[scale]),
            ]
        )
    save()
    shown = [row[0] for row in table[1:]]
    titles = {
        "forward": f"ECE_t on the val digits, forward-noised (seed 0), {args.timesteps} timesteps",
        "reverse": f"ECE_t on reverse-process x_t of {args.conditional_model} (DDPM-{args.steps}, {args.trajectory_samples} samples, label = condition)",
    }
    for definition, files in DEFINITIONS.items():
        save_figure(
            {name: curves[definition][name] for name in shown},
            titles[definition],
            os.path.join(args.output_dir, files["figure"]),
        )

    text = "\n".join(
        [
            describe(len(labels), f"DDPM-{args.steps}")
            + f" Scales swept: {', '.join(f'{s:g}' for s in args.classifier_scales)}.",
            "",
            markdown_table(
                ["row", *(files["column"] for files in DEFINITIONS.values()), "reported scale", *QUALITY_HEADERS],
                table,
            ),
            "",
            *correlations(chosen, every),
        ]
    )
    publish_table(text, args.output_dir, args.page, args.marker)
    print(text)


if __name__ == "__main__":
    main()
