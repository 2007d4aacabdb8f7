"""Reproduces PPAP's Table 1 on the digits default, with the scale sweep, and prints it as markdown.

    python scripts/ppap_table.py [--families resnet deit] [--rows table options curves] [--steps-per-expert 1000]
                                 [--samples-per-class 50] [--classifier-scales 3 10 30 100] [--output-dir runs/ppap_table]

Every trained row goes through `configs/ppap.yaml` with overrides (finished rows are reused, so the script
resumes) and trains each of its N experts for `--steps-per-expert` steps, as the paper trains every expert to
convergence. Every guided row is sampled at each scale of `--classifier-scales` with the same sampler, steps and seeds and
scored under the protocol of `scripts/protocol.py` (independent evaluator; FID/KID in three feature spaces with
95% intervals); its reported scale follows `plugguide.metrics.reporting.BEST_SCALE_RULE`, never accuracy alone.
Raw results (`results.json`), a grid per row and scale (`grids/`) and the sweep plot go to `--output-dir`.

Row groups: `table` (the paper's Table 1; PPAP experts chained, as the authors and the main job train them),
`options` (the authors' frozen head, conv LoRA and every-bias experts; round-robin experts; the paper's DDIM-25 data),
`curves` (number of experts; parameter-efficient vs full fine-tuning at 500 and 4,000 synthesized images).
"""

from __future__ import annotations

import argparse
import json
import os

import yaml
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

from plugguide.cli import main as lightning
from plugguide.metrics.figures import sweep_figure
from plugguide.metrics.reporting import best_scale, estimate, markdown_table
from plugguide.models import MultiExpertModel, load_scheduler, load_unet
from plugguide.pipelines import GuidedDiffusionPipeline
from plugguide.pipelines.guidance import ExpertGuidance, NaiveClassifierGuidance, PredictedCleanImageGuidance

ASSETS = "assets/digits"
DIFFUSION_MODEL = f"{ASSETS}/ddpm-uncond"
TEACHERS = {"resnet": f"{ASSETS}/classifier-resnet", "deit": f"{ASSETS}/classifier-deit"}
# Every row's experts train this many steps each (`--steps-per-expert`); the main job's config trains 700.
STEPS_PER_EXPERT = 1000
# Full fine-tuning (the paper's noise-aware and multi-experts rows) takes the paper's learning rate, not LoRA's 1e-3.
FULL_FINETUNE_OPTIMIZER = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-4, "weight_decay": 0.05}}
PPAP = dict(finetune="lora", supervision="teacher", num_images=4000, per_expert_head=True, expert_schedule="chain")
ROWS = {
    "table": {
        "naive off-the-shelf": None,
        "gradients on x0": None,
        "single noise-aware": dict(num_experts=1, finetune="full", supervision="labels"),
        "multi-experts-5": dict(num_experts=5, finetune="full", supervision="labels"),
        "PPAP-5": dict(PPAP, num_experts=5),
        "PPAP-10": dict(PPAP, num_experts=10),
    },
    "options": {
        "PPAP-5, frozen head (authors')": dict(PPAP, num_experts=5, per_expert_head=False),
        "PPAP-5, round robin": dict(PPAP, num_experts=5, expert_schedule="round_robin"),
        "PPAP-5, DDIM-25 data (the paper's)": dict(PPAP, num_experts=5, synthesis_steps=25),
        "PPAP-5, loralib conv LoRA (authors')": dict(PPAP, num_experts=5, conv_lora="loralib"),
        "PPAP-5, authors' adapters": dict(PPAP, num_experts=5, conv_lora="loralib", per_expert_head=False),
        "PPAP-5, every bias per expert (authors')": dict(PPAP, num_experts=5, per_expert_biases=True),
    },
    "curves": {
        "PPAP-1": dict(PPAP, num_experts=1),
        "PPAP-2": dict(PPAP, num_experts=2),
        "PPAP-5, 500 images": dict(PPAP, num_experts=5, num_images=500),
        "full-5, 500 images": dict(PPAP, num_experts=5, finetune="full", num_images=500),
        "full-5, 4000 images": dict(PPAP, num_experts=5, finetune="full"),
    },
}


def train_row(directory: str, teacher: str, spec: dict, steps_per_expert: int) -> str:
    """Trains one row with `lightning fit -c configs/ppap.yaml` plus overrides; returns its experts directory."""
    # Absolute: ExportPretrained would take a relative directory under the run's version folder.
    experts = os.path.abspath(os.path.join(directory, "experts"))
    if os.path.isfile(os.path.join(experts, "experts.json")):
        return experts
    os.makedirs(directory, exist_ok=True)
    model = {"teacher_path": teacher, **{k: spec[k] for k in ("num_experts", "finetune", "supervision")}}
    model |= {
        k: spec[k] for k in ("per_expert_head", "expert_schedule", "conv_lora", "per_expert_biases") if k in spec
    }
    if spec["finetune"] == "full":
        model["optimizer"] = FULL_FINETUNE_OPTIMIZER
    if spec["supervision"] == "labels":
        data = {"class_path": "plugguide.datamodules.DigitsDataModule", "init_args": {"batch_size": 128}}
    else:
        # The cache holds model.teacher_path's logits; DDIM-20 synthesis unless the row names its steps.
        data = {
            "init_args": {"num_images": spec["num_images"], "num_inference_steps": spec.get("synthesis_steps", 20)}
        }
    overrides = {
        "trainer": {
            "max_steps": steps_per_expert * spec["num_experts"],
            "check_val_every_n_epoch": 10_000,
            "enable_progress_bar": False,
            "default_root_dir": directory,
            "callbacks": [{"class_path": "plugguide.callbacks.ExportPretrained", "init_args": {"directory": experts}}],
        },
        "model": {"init_args": model},
        "data": data,
    }
    with open(os.path.join(directory, "overrides.yaml"), "w") as file:
        yaml.safe_dump(overrides, file)
    lightning(["fit", "-c", "configs/ppap.yaml", "-c", os.path.join(directory, "overrides.yaml")])
    return experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["resnet"], choices=sorted(TEACHERS))
    parser.add_argument("--rows", nargs="+", default=["table", "options", "curves"], choices=sorted(ROWS))
    parser.add_argument("--only", nargs="+", default=None, help="run only these methods (e.g. PPAP-5)")
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--steps", type=int, default=50, help="DDPM (ancestral) sampler steps")
    parser.add_argument(
        "--classifier-scales",
        type=float,
        nargs="+",
        default=[3.0, 10.0, 30.0, 100.0],
        help="classifier scales s swept (the pipeline's `classifier_scale`, the weight of the classifier's gradient)",
    )
    parser.add_argument("--steps-per-expert", type=int, default=STEPS_PER_EXPERT)
    parser.add_argument(
        "--experts",
        nargs="+",
        default=[],
        metavar="NAME=DIR",
        help="also score experts trained elsewhere, e.g. 'main job=runs/ppap/version_0/experts'",
    )
    parser.add_argument(
        "--output-dir", default="runs/ppap_table", help="run folder: results.json, grids/, experts, sweep.png"
    )
    add_page_arguments(parser, "ppap-table-per-expert")
    args = parser.parse_args()

    metrics = reference_metrics()
    unet = load_unet(DIFFUSION_MODEL)
    labels, seeds = targets(args.samples_per_class)
    results_path = os.path.join(args.output_dir, "results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}

    def sweep(key: str, guidance, scales: list[float]) -> dict:
        """The row's results per scale; scales already measured (same protocol) are read from results.json."""
        done = results.setdefault(key, {})
        pipeline = GuidedDiffusionPipeline(unet, load_scheduler(DIFFUSION_MODEL, "DDPMScheduler"), guidance)
        pipeline.set_progress_bar_config(disable=True)
        for scale in [s for s in scales if str(s) not in done]:
            done[str(scale)] = measure(
                metrics,
                pipeline_sampler(pipeline, num_inference_steps=args.steps, classifier_scale=scale),
                labels,
                seeds,
                grid_path=os.path.join(args.output_dir, "grids", f"{slug(key)}-s{scale:g}.png"),
            )
            os.makedirs(args.output_dir, exist_ok=True)
            with open(results_path + ".tmp", "w") as file:
                json.dump(results, file, indent=1)
            os.replace(results_path + ".tmp", results_path)
            print(
                key, scale, {k: round(v, 4) for k, v in done[str(scale)].items() if isinstance(v, float)}, flush=True
            )
        return done

    unguided = sweep("unguided", None, [0.0])["0.0"]
    table = [["-", "unguided", "-", "-", "-", *quality_cells(unguided)]]
    sweeps = {}
    trained_here = False  # rows of `--experts` were trained elsewhere, with their own steps
    for family in args.families:
        teacher = TEACHERS[family]
        for group in args.rows:
            for name, spec in ROWS[group].items():
                if args.only and name not in args.only:
                    continue
                if spec is None:
                    guidance = (
                        NaiveClassifierGuidance(teacher)
                        if name.startswith("naive")
                        else PredictedCleanImageGuidance(teacher)
                    )
                    params, supervision = "0 (0%)", "none"
                else:
                    directory = os.path.join(args.output_dir, family, slug(name))
                    trained_here = True
                    experts = MultiExpertModel.from_pretrained(
                        train_row(directory, teacher, spec, args.steps_per_expert)
                    )
                    report = experts.parameter_report()
                    guidance = ExpertGuidance(experts)
                    params = f"{report['trainable_total']:,} ({report['trainable_percent_of_backbone']:.0f}%)"
                    supervision = (
                        "real labels"
                        if spec["supervision"] == "labels"
                        else f"data-free ({spec['num_images']:,} generated)"
                    )
                key = f"{family}/{name}"
                sweeps[key] = sweep(key, guidance, args.classifier_scales)
                scale, admissible = best_scale(sweeps[key], unguided)
                table.append(
                    [
                        family,
                        name,
                        params,
                        supervision,
                        f"{float(scale):g}" + ("" if admissible else "*"),
                        *quality_cells(sweeps[key][scale]),
                    ]
                )

    for name, directory in (entry.split("=", 1) for entry in args.experts):
        experts = MultiExpertModel.from_pretrained(directory)
        report = experts.parameter_report()
        sweeps[name] = sweep(f"given/{name}", ExpertGuidance(experts), args.classifier_scales)
        scale, admissible = best_scale(sweeps[name], unguided)
        params = f"{report['trainable_total']:,} ({report['trainable_percent_of_backbone']:.0f}%)"
        table.append(
            [
                experts.backbone_config["model_name"],
                name,
                params,
                "as trained",
                f"{float(scale):g}" + ("" if admissible else "*"),
                *quality_cells(sweeps[name][scale]),
            ]
        )

    lines = [
        describe(len(labels), f"DDPM-{args.steps} (ancestral, mean shift)")
        + (f" Training: {args.steps_per_expert:,} steps per expert." if trained_here else ""),
        "",
        markdown_table(
            ["teacher", "method", "trainable params (% of backbone)", "supervision", "best scale", *QUALITY_HEADERS],
            table,
        ),
        "",
        "Sweep (guided accuracy / FID autoencoder at each scale):",
        "",
        markdown_table(
            ["row", *(f"s={s:g}" for s in args.classifier_scales)],
            [
                [
                    key,
                    *(
                        f"{estimate(r[str(s)], 'guided_accuracy', 2).split(' ')[0]} / {r[str(s)]['fid_autoencoder']:.1f}"
                        for s in args.classifier_scales
                    ),
                ]
                for key, r in sweeps.items()
            ],
        ),
    ]
    text = "\n".join(lines)
    publish_table(text, args.output_dir, args.page, args.marker)
    sweep_figure(sweeps, unguided, args.classifier_scales).savefig(os.path.join(args.output_dir, "sweep.png"), dpi=120)
    print(text)
    print(f"\nRaw results: {results_path}; grids: {args.output_dir}/grids/; sweep plot: {args.output_dir}/sweep.png")


if __name__ == "__main__":
    main()
