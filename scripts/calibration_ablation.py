"""Ablation of calibrated off-the-shelf guidance (Ma et al., 2023) on the digits default, printed as markdown.

    OMP_NUM_THREADS=1 python scripts/calibration_ablation.py [--experts runs/ppap/experts] [--out runs/calibration_ablation]

Rows: naive (classifier on x_t), plain classifier on x0_hat, Softplus beta in {8, 5, 3}, marginal discount 0.5,
sine gamma 0.3, the full calibrated guide on x_t instead of x0_hat, and, with `--experts`, PPAP experts
and calibrated experts (Softplus + temperatures on the experts). Every row is sampled with the same
sampler, steps and seeds (DDPM, `--steps`) at each scale of `--scales`, scored by the independent
evaluator (guided accuracy, FID on evaluator features against the test split), and measured for its
integral ECE (mean ECE_t over `--timesteps` timesteps, on the 180 val images, forward-noise seed 0, on
the guide's own input). Time is wall-clock per image relative to unguided sampling of the same batch.
Ends with the Spearman rank correlation between integral ECE and FID across the rows (at each row's
best-accuracy scale, and over all (row, scale) entries).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from scipy.stats import spearmanr

from plugguide.datamodules.digits import DigitsDataModule
from plugguide.metrics import GenerationMetrics, calibration_curve, calibration_timesteps, read_curves_csv, write_curves_csv
from plugguide.models.classifier import load_classifier
from plugguide.models.diffusion_model import load_scheduler, load_unet
from plugguide.pipelines import sample_batch
from plugguide.pipelines.guidance.calibrated import CalibratedGuidance
from plugguide.pipelines.guidance.naive_classifier import NaiveClassifierGuidance
from plugguide.pipelines.guided_diffusion import GuidedDiffusionPipeline

OFF = dict(softplus_beta=None, marginal_discount=1.0, sine_gamma=0.0)


def rows(classifier_path: str, experts: str | None, experts_name: str = "PPAP experts") -> dict:
    """name: a factory of the row's guidance (fresh, so the sine schedule's state never leaks between rows)."""
    table = {
        "naive (x_t, all off)": lambda: NaiveClassifierGuidance(classifier_path),
        "x0_hat, beta inf": lambda: CalibratedGuidance(classifier_path, **OFF),
        "x0_hat, beta 8": lambda: CalibratedGuidance(classifier_path, **{**OFF, "softplus_beta": 8.0}),
        "x0_hat, beta 5": lambda: CalibratedGuidance(classifier_path, **{**OFF, "softplus_beta": 5.0}),
        "x0_hat, beta 3": lambda: CalibratedGuidance(classifier_path, **{**OFF, "softplus_beta": 3.0}),
        "x0_hat, beta 3, discount 0.5": lambda: CalibratedGuidance(classifier_path, sine_gamma=0.0),
        "x0_hat, beta 3, discount 0.5, gamma 0.3 (calibrated)": lambda: CalibratedGuidance(classifier_path),
        "x_t, beta 3, discount 0.5, gamma 0.3": lambda: CalibratedGuidance(classifier_path, input="x_t"),
    }
    if experts:
        from plugguide.pipelines.guidance.ppap_experts import ExpertGuidance

        table[f"{experts_name} (x_t)"] = lambda: ExpertGuidance(experts)
        table[f"{experts_name}, beta 3, discount 0.5"] = lambda: CalibratedGuidance(ExpertGuidance(experts), sine_gamma=0.0)
        table[f"{experts_name}, beta 3, discount 0.5, gamma 0.3"] = lambda: CalibratedGuidance(ExpertGuidance(experts))
    return table


def report(args, unguided: dict, results: list[dict], curves: dict) -> None:
    """Writes and prints the markdown table and the ECE-FID rank correlations."""
    labels_count = args.samples_per_class * 10
    high = {name: [e for t, e in zip(c["timestep"], c["ece"]) if t >= 500] for name, c in curves.items()}
    high = {name: sum(v) / len(v) for name, v in high.items()}
    best = {}
    for entry in results:
        if entry["row"] not in best or entry["guided_accuracy"] > best[entry["row"]]["guided_accuracy"]:
            best[entry["row"]] = entry
    lines = [
        f"Digits, DDPM {args.steps} steps, {labels_count} samples ({args.samples_per_class} per class, seeds 0..{labels_count - 1}), "
        f"scales {args.scales}; unguided: FID {unguided['fid']:.2f}, evaluator accuracy vs random targets {unguided.get('guided_accuracy', float('nan')):.3f}, "
        f"{unguided['seconds'] / labels_count * 1000:.0f} ms/image.",
        "",
        "| row | integral ECE | ECE, t >= 500 | scale | guided accuracy | FID | time / unguided |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in results:
        mark = " **(best acc.)**" if best[entry["row"]] is entry else ""
        lines.append(
            f"| {entry['row']} | {entry['integral_ece']:.3f} | {high[entry['row']]:.3f} | {entry['scale']:g}{mark} | {entry['guided_accuracy']:.3f} | {entry['fid']:.2f} | {entry['time_ratio']:.2f} |"
        )
    chosen = list(best.values())
    lines.append("")
    for label, ece_of in (("integral ECE", lambda e: e["integral_ece"]), ("ECE over t >= 500", lambda e: high[e["row"]])):
        rho_best = spearmanr([ece_of(e) for e in chosen], [e["fid"] for e in chosen])
        rho_all = spearmanr([ece_of(e) for e in results], [e["fid"] for e in results])
        lines.append(
            f"Spearman rank correlation, {label} vs FID: {rho_best.statistic:.2f} (p = {rho_best.pvalue:.2f}) across the {len(chosen)} rows "
            f"at their best-accuracy scale; {rho_all.statistic:.2f} (p = {rho_all.pvalue:.2f}) over all {len(results)} (row, scale) entries."
        )
    table = "\n".join(lines)
    with open(os.path.join(args.out, "table.md"), "w") as file:
        file.write(table + "\n")
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusion-model", default="assets/digits/ddpm-uncond")
    parser.add_argument("--classifier", default="assets/digits/classifier-resnet")
    parser.add_argument("--evaluator", default="assets/digits/evaluator")
    parser.add_argument("--experts", default=None, help="a saved MultiExpertClassifier directory (PPAP rows)")
    parser.add_argument("--samples-per-class", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scales", type=float, nargs="+", default=[3.0, 10.0, 30.0])
    parser.add_argument("--timesteps", type=int, default=20)
    parser.add_argument("--out", default="runs/calibration_ablation")
    parser.add_argument("--timing-repeats", type=int, default=0, help="only time unguided / naive / calibrated sampling, interleaved, N times each")
    parser.add_argument("--experts-name", default="PPAP experts", help="row label of the expert rows")
    parser.add_argument("--only", default=None, help="run only the rows whose name contains this text (e.g. PPAP)")
    parser.add_argument("--report", action="store_true", help="only rebuild table.md from rows.json and curves.csv in --out")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.report:
        with open(os.path.join(args.out, "rows.json")) as file:
            saved = json.load(file)
        report(args, saved["unguided"], saved["rows"], read_curves_csv(os.path.join(args.out, "curves.csv")))
        return
    torch.manual_seed(0)

    unet = load_unet(args.diffusion_model).eval().requires_grad_(False)
    scheduler = load_scheduler(args.diffusion_model, "DDPMScheduler")
    evaluator = load_classifier(args.evaluator, "evaluator")
    metrics = GenerationMetrics(evaluator, evaluator.num_classes)
    data = DigitsDataModule(batch_size=180)
    data.setup("fit")
    for batch in data.test_dataloader():
        metrics.update_real(batch["image"])
    held_out = list(data.val_dataloader())
    timesteps = calibration_timesteps(args.timesteps, len(scheduler.alphas_cumprod))
    labels = torch.arange(10).repeat_interleave(args.samples_per_class)
    batch = {"label": labels, "seed": torch.arange(len(labels))}  # the same seeds for every row

    def sample(guidance, scale: float) -> tuple[torch.Tensor, float]:
        pipeline = GuidedDiffusionPipeline(unet, scheduler, guidance)
        pipeline.set_progress_bar_config(disable=True)
        start = time.perf_counter()
        images = sample_batch(pipeline, batch, num_inference_steps=args.steps, guidance_scale=scale)
        return images, time.perf_counter() - start

    def score(images: torch.Tensor) -> dict:
        metrics.update_generated(images, labels)
        results = metrics.compute()
        metrics.reset()
        return results

    if args.timing_repeats:
        # The machine is shared: interleave the kinds and keep each one's fastest run (least disturbed).
        kinds = {"unguided": (lambda: None, 0.0), "naive (x_t, all off)": (rows(args.classifier, None)["naive (x_t, all off)"], 10.0),
                 "calibrated (x0_hat, beta 3, 0.5, gamma 0.3)": (lambda: CalibratedGuidance(args.classifier), 10.0)}
        seconds = {name: [] for name in kinds}
        for _ in range(args.timing_repeats):
            for name, (make, scale) in kinds.items():
                seconds[name].append(sample(make(), scale)[1])
                print(name, f"{seconds[name][-1]:.2f}s", flush=True)
        base = min(seconds["unguided"])
        lines = [f"Sampling time, DDPM {args.steps} steps, batch {len(labels)}, fastest of {args.timing_repeats} interleaved runs (OMP_NUM_THREADS=1):", "",
                 "| sampler | s / batch (fastest) | ms / image | all runs (s) | relative to unguided |", "|---|---|---|---|---|"]
        for name, values in seconds.items():
            lines.append(f"| {name} | {min(values):.2f} | {min(values) / len(labels) * 1000:.0f} | {', '.join(f'{v:.1f}' for v in values)} | {min(values) / base:.2f} |")
        with open(os.path.join(args.out, "timing.md"), "w") as file:
            file.write("\n".join(lines) + "\n")
        print("\n".join(lines))
        return

    images, unguided_time = sample(None, 0.0)
    unguided = score(images)
    print(f"unguided: {unguided}, {unguided_time:.1f}s", flush=True)
    results, curves = [], {}
    for name, make in rows(args.classifier, args.experts, args.experts_name).items():
        if args.only and args.only not in name:
            continue
        guidance = make()
        curves[name] = calibration_curve(guidance, held_out, timesteps, scheduler.alphas_cumprod, unet)
        integral = curves[name]["integral_ece"][0]
        for scale in args.scales:
            images, seconds = sample(make(), scale)
            scores = score(images)
            results.append({"row": name, "scale": scale, "integral_ece": integral, **scores, "time_ratio": seconds / unguided_time})
            print(json.dumps(results[-1]), flush=True)
    write_curves_csv(curves, os.path.join(args.out, "curves.csv"))
    with open(os.path.join(args.out, "rows.json"), "w") as file:
        json.dump({"unguided": {**unguided, "seconds": unguided_time}, "rows": results}, file, indent=1)

    report(args, {**unguided, "seconds": unguided_time}, results, curves)


if __name__ == "__main__":
    main()
