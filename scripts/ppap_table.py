"""Reproduces PPAP's Table 1 on the digits default and prints it as markdown, with the scale sweep.

    python scripts/ppap_table.py [--families resnet deit] [--rows table|curves|all] [--samples-per-class 10] [--out runs/ppap_table]
                                 [--train-steps 1000 | --steps-per-expert 1000]

Every row is trained through `configs/ppap.yaml` with overrides (finished rows are reused, so the
script resumes), every guided row is sampled at each scale of `--scales` with the same sampler, steps
and seeds, scored by the independent evaluator (never by the guiding model), and reported at its best
scale by guided accuracy. The sweep is saved as a plot and JSON beside the table. Rows train for the same
total steps (`--train-steps`: an expert of PPAP-N gets 1/N of them) or, as the paper trains each expert to
convergence, for the same steps per expert (`--steps-per-expert`: N times as many in all).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import yaml

from plugguide.cli import main as lightning
from plugguide.datamodules import DigitsDataModule
from plugguide.metrics import GenerationMetrics
from plugguide.models import MultiExpertClassifier
from plugguide.models.classifier import load_classifier
from plugguide.models.diffusion_model import load_scheduler, load_unet
from plugguide.pipelines import sample_batch
from plugguide.pipelines import GuidedDiffusionPipeline
from plugguide.pipelines.guidance import ExpertGuidance, NaiveClassifierGuidance, PredictedCleanImageGuidance

ASSETS = "assets/digits"
TEACHERS = {"resnet": f"{ASSETS}/classifier-resnet", "deit": f"{ASSETS}/classifier-deit"}
# name: (num_experts, finetune, supervision, synthesized images)
TRAINED_ROWS = {
    "single noise-aware": (1, "full", "labels", None),
    "multi-experts-5": (5, "full", "labels", None),
    "PPAP-5": (5, "lora", "teacher", 4000),
    "PPAP-10": (10, "lora", "teacher", 4000),
}
CURVE_ROWS = {
    "PPAP-1": (1, "lora", "teacher", 4000),
    "PPAP-2": (2, "lora", "teacher", 4000),
    "PPAP-5, 500 images": (5, "lora", "teacher", 500),
    "full-5, 500 images": (5, "full", "teacher", 500),
    "full-5, 4000 images": (5, "full", "teacher", 4000),
}


def train_row(directory: str, teacher: str, num_experts: int, finetune: str, supervision: str, num_images: int | None, steps: int) -> str:
    """Trains one row with `lightning fit -c configs/ppap.yaml` plus overrides; returns its experts directory."""
    experts = os.path.join(directory, "experts")
    if os.path.isfile(os.path.join(experts, "experts.json")):
        return experts
    os.makedirs(directory, exist_ok=True)
    model = {"teacher_path": teacher, "num_experts": num_experts, "finetune": finetune, "supervision": supervision}
    if finetune == "full":
        model["optimizer"] = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-4, "weight_decay": 0.05}}
    if supervision == "labels":
        data = {"class_path": "plugguide.datamodules.DigitsDataModule", "init_args": {"batch_size": 128}}
    else:
        # Teacher logits are computed on the fly, so both teacher families share one cached image set.
        data = {"init_args": {"teacher_path": None, "num_images": num_images}}
    overrides = {
        "trainer": {
            "max_steps": steps, "check_val_every_n_epoch": 1000, "enable_progress_bar": False, "default_root_dir": directory,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": directory, "name": "logs"}},
            "callbacks": [{"class_path": "plugguide.callbacks.ExportPretrained", "init_args": {"directory": experts}}],
        },
        "model": {"init_args": model},
        "data": data,
    }
    with open(os.path.join(directory, "overrides.yaml"), "w") as file:
        yaml.safe_dump(overrides, file)
    lightning(["fit", "-c", "configs/ppap.yaml", "-c", os.path.join(directory, "overrides.yaml")])
    return experts


def evaluate(pipeline: GuidedDiffusionPipeline, scale: float, labels: torch.Tensor, real: torch.Tensor, evaluator, steps: int) -> dict:
    metrics = GenerationMetrics(evaluator, 10)
    metrics.update_real(real)
    started = time.perf_counter()
    for start in range(0, len(labels), 100):
        chunk = labels[start : start + 100]
        images = sample_batch(pipeline, {"label": chunk, "seed": torch.arange(start, start + len(chunk))}, num_inference_steps=steps, guidance_scale=scale)
        metrics.update_generated(images, chunk)
    return metrics.compute() | {"seconds_per_image": (time.perf_counter() - started) / len(labels)}


def training_steps(args, num_experts: int) -> int:
    return args.train_steps if args.steps_per_expert is None else args.steps_per_expert * num_experts


def write_table(rows: list, unguided: dict, args, sampler: str, num_samples: int, num_real: int) -> None:
    """Prints the table and writes it to `<out>/table.md` (called after every row, so partial runs keep theirs)."""
    budget = f"{args.train_steps:,} steps per row" if args.steps_per_expert is None else f"{args.steps_per_expert:,} steps per expert"
    lines = [
        f"Sampler: {sampler} (ancestral, mean shift), {num_samples} samples ({args.samples_per_class} per class), seeds 0..{num_samples - 1}, "
        f"scored by the evaluator (assets/digits/evaluator). FID on evaluator features vs the {num_real} real test digits. "
        f"Training: {budget}.\n",
        "| teacher | method | trainable params (% of backbone) | supervision | best scale | guided accuracy | FID | IS |",
        "|---|---|---|---|---|---|---|---|",
        f"| - | unguided | - | - | - | {unguided.get('guided_accuracy', float('nan')):.3f} | {unguided['fid']:.2f} | {unguided['inception_score']:.2f} |",
    ]
    for family, name, params, supervision, best, sweep in rows:
        r = sweep[best]
        lines.append(f"| {family} | {name} | {params} | {supervision} | {float(best):g} | {r['guided_accuracy']:.3f} | {r['fid']:.2f} | {r['inception_score']:.2f} |")
    lines += ["\nSweep (guided accuracy / FID at each scale):\n", "| teacher | method | " + " | ".join(f"s={s:g}" for s in args.scales) + " |", "|---|---|" + "---|" * len(args.scales)]
    for family, name, _, _, _, sweep in rows:
        lines.append(f"| {family} | {name} | " + " | ".join(f"{sweep[str(s)]['guided_accuracy']:.2f} / {sweep[str(s)]['fid']:.1f}" for s in args.scales) + " |")
    with open(os.path.join(args.out, "table.md"), "w") as file:
        file.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["resnet", "deit"], choices=sorted(TEACHERS))
    parser.add_argument("--samples-per-class", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50, help="DDPM (ancestral) sampler steps")
    parser.add_argument("--scales", type=float, nargs="+", default=[3.0, 10.0, 30.0, 100.0])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--train-steps", type=int, default=1000, help="training steps of every row")
    budget.add_argument("--steps-per-expert", type=int, default=None, help="training steps of every expert (a row of N experts trains N times as many)")
    parser.add_argument("--rows", choices=["table", "curves", "all"], default="all", help="Table 1 rows, the curves (number of experts; PE vs full at 500 / 4,000 images; first family), or both")
    parser.add_argument("--only", nargs="+", default=None, help="run only these methods (e.g. PPAP-5)")
    parser.add_argument("--out", default="runs/ppap_table")
    args = parser.parse_args()

    data = DigitsDataModule(batch_size=1000)
    data.setup("test")
    real = next(iter(data.test_dataloader()))["image"]
    evaluator = load_classifier(f"{ASSETS}/evaluator")
    unet = load_unet(f"{ASSETS}/ddpm-uncond")
    labels = torch.arange(10).repeat_interleave(args.samples_per_class)
    sampler = f"DDPM-{args.steps}"
    results_path = os.path.join(args.out, "results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}

    def score(key: str, guidance, scales) -> dict:
        """The row's sweep; scales already measured (same seeds, sampler, steps) are reused from results.json."""
        done = results.setdefault(key, {})
        missing = [s for s in scales if str(s) not in done]
        if missing:
            pipeline = GuidedDiffusionPipeline(unet, load_scheduler(f"{ASSETS}/ddpm-uncond", "DDPMScheduler"), guidance)
            pipeline.set_progress_bar_config(disable=True)
            for s in missing:
                done[str(s)] = evaluate(pipeline, s, labels, real, evaluator, args.steps)
            os.makedirs(args.out, exist_ok=True)
            with open(results_path, "w") as file:
                json.dump(results, file, indent=1)
        return done

    unguided = score("unguided", None, [0.0])["0.0"]
    rows = []
    # Table 1 for every family first, then the curves (number of experts; PE vs full at 500 / 4,000 images).
    plan = []
    if args.rows in ("table", "all"):
        plan += [(family, row) for family in args.families for row in [("naive off-the-shelf", None), ("gradients on x0", None), *TRAINED_ROWS.items()]]
    if args.rows in ("curves", "all"):
        plan += [(args.families[0], row) for row in CURVE_ROWS.items()]
    plan = [(family, row) for family, row in plan if args.only is None or row[0] in args.only]
    for family, (name, spec) in plan:
        teacher = TEACHERS[family]
        if spec is None:
            guidance = NaiveClassifierGuidance(teacher) if name.startswith("naive") else PredictedCleanImageGuidance(teacher)
            params, supervision = "0 (0%)", "none"
        else:
            experts_dir = train_row(os.path.join(args.out, family, name.replace(" ", "_").replace(",", "")), teacher, *spec, training_steps(args, spec[0]))
            experts = MultiExpertClassifier.from_pretrained(experts_dir)
            report = experts.parameter_report()
            guidance = ExpertGuidance(experts)
            params = f"{report['trainable_total']:,} ({report['trainable_percent_of_backbone']:.0f}%)"
            supervision = "real labels" if spec[2] == "labels" else f"data-free ({spec[3]:,} generated)"
        sweep = score(f"{family}/{name}", guidance, args.scales)
        best = max(sweep, key=lambda s: sweep[s]["guided_accuracy"])
        rows.append((family, name, params, supervision, best, sweep))
        write_table(rows, unguided, args, sampler, len(labels), len(real))

    write_table(rows, unguided, args, sampler, len(labels), len(real))

    figure, axes = plt.subplots(1, len(args.families), figsize=(6 * len(args.families), 4), squeeze=False)
    for axis, family in zip(axes[0], args.families):
        for fam, name, _, _, _, sweep in rows:
            if fam == family:
                axis.plot(args.scales, [sweep[str(s)]["guided_accuracy"] for s in args.scales], marker="o", label=name)
        axis.axhline(0.1, color="grey", linestyle=":", label="chance")
        axis.set(xscale="log", xlabel="guidance scale s", ylabel="guided accuracy (evaluator)", title=f"{family} teacher, {sampler}", ylim=(0, 1))
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(args.out, "sweep.png"), dpi=120)
    print(f"\nSweep plot: {os.path.join(args.out, 'sweep.png')}; raw numbers: {results_path}")


if __name__ == "__main__":
    main()
