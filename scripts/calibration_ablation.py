"""Ablation of calibrated off-the-shelf guidance (Ma et al., 2023) on the digits default, printed as markdown.

    python scripts/calibration_ablation.py [--experts runs/ppap_table/resnet/PPAP-5/experts] [--scales 3 10 30]
                                           [--samples-per-class 50] [--out runs/calibration_ablation]

Rows: naive (classifier on x_t), plain classifier on x0_hat, Softplus beta in {8, 5, 3}, marginal discount 0.5,
sine gamma 0.3, the full calibrated guide on x_t instead of x0_hat, and, with `--experts`, PPAP experts and
calibrated experts (Softplus + temperatures on the experts). Every row is sampled with DDPM-`--steps` at each
scale of `--scales` and scored under the protocol of `scripts/protocol.py`; its reported scale follows
`BEST_SCALE_RULE`. Each row's guide is also measured for its integral ECE (mean ECE_t over `--timesteps`
timesteps on the 180 val digits, forward-noised with seed 0, on the guide's own input). The script ends with the
Spearman rank correlation between integral ECE and FID (autoencoder and evaluator features) across rows.
"""

from __future__ import annotations

import argparse
import json
import os

from scipy.stats import spearmanr

from plugguide.datamodules import DigitsDataModule
from plugguide.metrics import calibration_curve, calibration_timesteps, read_curves_csv, write_curves_csv
from plugguide.metrics.reporting import BEST_SCALE_RULE, best_scale, markdown_table
from plugguide.models import load_scheduler, load_unet
from plugguide.pipelines import GuidedDiffusionPipeline, sample_batch
from plugguide.pipelines.guidance import CalibratedGuidance, ExpertGuidance, NaiveClassifierGuidance
from protocol import QUALITY_HEADERS, describe, measure, quality_cells, reference_metrics, targets

OFF = dict(softplus_beta=None, marginal_discount=1.0, sine_gamma=0.0)


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
        table[f"{experts_name}, beta 3, discount 0.5"] = lambda: CalibratedGuidance(ExpertGuidance(experts), sine_gamma=0.0)
        table[f"{experts_name}, beta 3, discount 0.5, gamma 0.3"] = lambda: CalibratedGuidance(ExpertGuidance(experts))
    return table


def correlations(chosen: list[dict], every: list[dict]) -> list[str]:
    lines = []
    for distance in ("fid_autoencoder", "fid_evaluator"):
        rho_best = spearmanr([e["integral_ece"] for e in chosen], [e[distance] for e in chosen])
        rho_all = spearmanr([e["integral_ece"] for e in every], [e[distance] for e in every])
        lines.append(
            f"Spearman rank correlation, integral ECE vs {distance}: {rho_best.statistic:.2f} (p = {rho_best.pvalue:.2f}) across the "
            f"{len(chosen)} rows at their reported scale; {rho_all.statistic:.2f} (p = {rho_all.pvalue:.2f}) over all {len(every)} (row, scale) entries."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusion-model", default="assets/digits/ddpm-uncond")
    parser.add_argument("--classifier", default="assets/digits/classifier-resnet")
    parser.add_argument("--experts", default=None, help="a saved MultiExpertClassifier directory (PPAP rows)")
    parser.add_argument("--experts-name", default="PPAP-5 experts", help="row label of the expert rows")
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scales", type=float, nargs="+", default=[3.0, 10.0, 30.0])
    parser.add_argument("--timesteps", type=int, default=20)
    parser.add_argument("--out", default="runs/calibration_ablation")
    parser.add_argument("--only", default=None, help="run only the rows whose name contains this text (e.g. PPAP)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    unet = load_unet(args.diffusion_model).eval().requires_grad_(False)
    scheduler = load_scheduler(args.diffusion_model, "DDPMScheduler")
    metrics = reference_metrics()
    data = DigitsDataModule(batch_size=180)
    data.setup("validate")
    held_out = list(data.val_dataloader())
    timesteps = calibration_timesteps(args.timesteps, len(scheduler.alphas_cumprod))
    labels, seeds = targets(args.samples_per_class)
    results_path, curves_path = os.path.join(args.out, "results.json"), os.path.join(args.out, "curves.csv")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}
    curves = read_curves_csv(curves_path) if os.path.isfile(curves_path) else {}

    def sample(guidance, scale: float, name: str) -> dict:
        pipeline = GuidedDiffusionPipeline(unet, scheduler, guidance)
        pipeline.set_progress_bar_config(disable=True)
        return measure(
            metrics, lambda l, s: sample_batch(pipeline, {"label": l, "seed": s}, num_inference_steps=args.steps, guidance_scale=scale),
            labels, seeds, grid_path=os.path.join(args.out, "grids", f"{''.join(c if c.isalnum() else '_' for c in name)}-s{scale:g}.png"),
        )

    def save() -> None:
        with open(results_path + ".tmp", "w") as file:
            json.dump(results, file, indent=1)
        os.replace(results_path + ".tmp", results_path)
        write_curves_csv(curves, curves_path)

    if "unguided" not in results:
        results["unguided"] = {"0": sample(None, 0.0, "unguided")}
        save()
    unguided = results["unguided"]["0"]
    table, chosen, every = [["unguided", "-", "-", *quality_cells(unguided)]], [], []
    for name, make in rows(args.classifier, args.experts, args.experts_name).items():
        if args.only and args.only not in name:
            continue
        if name not in curves:
            curves[name] = calibration_curve(make(), held_out, timesteps, scheduler.alphas_cumprod, unet)
        sweep = results.setdefault(name, {})
        for scale in [s for s in args.scales if str(s) not in sweep]:
            sweep[str(scale)] = sample(make(), scale, name)
            save()
            print(name, scale, {k: round(v, 4) for k, v in sweep[str(scale)].items() if isinstance(v, float)}, flush=True)
        integral = curves[name]["integral_ece"][0]
        scale, admissible = best_scale(sweep, unguided)
        every += [{"integral_ece": integral, **r} for r in sweep.values()]
        chosen.append({"integral_ece": integral, **sweep[scale]})
        table.append([name, f"{integral:.3f}", f"{float(scale):g}" + ("" if admissible else "*"), *quality_cells(sweep[scale])])
    save()

    text = "\n".join([
        describe(len(labels), f"DDPM-{args.steps}") + f" Scales swept: {', '.join(f'{s:g}' for s in args.scales)}.",
        f"Scale: {BEST_SCALE_RULE}.",
        "",
        markdown_table(["row", "integral ECE", "reported scale", *QUALITY_HEADERS], table),
        "",
        *correlations(chosen, every),
    ])
    with open(os.path.join(args.out, "table.md"), "w") as file:
        file.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
