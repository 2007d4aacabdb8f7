"""PPAP beyond classification on the digits default: segmentation and depth guides, and prints the table as markdown.

    python scripts/dense_table.py [--tasks segmentation depth] [--samples 100] [--classifier-scales ...] [--steps 50]
                                  [--max-steps 1500] [--output-dir runs/dense_table]

For each task (the segmenter `assets/digits/segmenter`, the depth stand-in `assets/digits/depth`), the target maps
are the off-the-shelf model's maps of held-out real digits (the first `--samples` of the 180 validation digits: the
test digits are the metrics' reference, and samples guided toward their maps would be pulled onto it),
sample i is seeded with i and guided toward map i; every row uses the same sampler, steps, seeds and targets:
unguided, naive off-the-shelf (the model on x_t), the model on x0_hat, calibrated off-the-shelf (Softplus,
x0_hat, the sine schedule and, for the segmenter, the temperatures per pixel), and PPAP-5 data-free, trained by
`lightning fit -c configs/ppap_<task>.yaml` (its synthesized cache, `--max-steps` steps; a finished row is reused).

Scores never come from a guide: each sample's own map is read off its pixels (`metrics.DenseMapMetrics`: its strokes
labelled with the evaluator's reading, or its distance-to-stroke map) and compared with its target map (mIoU and
stroke IoU; depth MAE, RMSE and correlation); the evaluator's agreement with the digit the target names (the
segmentation map's majority stroke class; for depth, the real digit's label); FID/KID under the protocol of
`scripts/protocol.py`. A row's scale is the best of the sweep by `BEST_SCALE_RULE` with the map score (mIoU, depth
correlation) in place of guided accuracy. Raw results (`results.json`) and, per row and scale, a grid of
target map | sample pairs go to `--output-dir`.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import yaml
from protocol import describe, measure, reference_metrics, slug
from results_page import add_page_arguments, publish_table
from torchvision.utils import save_image

from plugguide.cli import main as lightning
from plugguide.datamodules import TargetMapDataModule
from plugguide.metrics import DenseMapMetrics
from plugguide.metrics.figures import render_maps, sweep_figure
from plugguide.metrics.reporting import best_scale, estimate, markdown_table
from plugguide.models import load_scheduler, load_unet
from plugguide.pipelines import GuidedDiffusionPipeline, sample_batch
from plugguide.pipelines.guidance import (
    CalibratedGuidance,
    ExpertGuidance,
    NaiveClassifierGuidance,
    PredictedCleanImageGuidance,
)
from plugguide.pipelines.tasks import DenseRegressionTask, SegmentationTask

DIFFUSION_MODEL = "assets/digits/ddpm-uncond"
TASKS = {
    "segmentation": dict(
        model="assets/digits/segmenter",
        task=SegmentationTask(0.25),
        score="miou",
        scores=("miou", "stroke_iou"),
        calibrated={},
    ),
    "depth": dict(
        model="assets/digits/depth",
        task=DenseRegressionTask("mse"),
        score="depth_correlation",
        scores=("depth_correlation", "depth_mae", "depth_rmse"),
        calibrated={
            "marginal_discount": 1.0
        },  # a regressor has no class scores: Softplus, x0_hat and the schedule apply
    ),
}
HEADERS = {
    "miou": "mIoU",
    "stroke_iou": "stroke IoU",
    "depth_correlation": "depth correlation",
    "depth_mae": "depth MAE (px)",
    "depth_rmse": "depth RMSE (px)",
    "guided_accuracy": "class agreement",
    "fid_autoencoder": "FID autoencoder",
    "fid_evaluator": "FID evaluator",
    "fid_pixels": "FID pixels",
}


def train_experts(task: str, directory: str, max_steps: int) -> str:
    """PPAP-5 of `configs/ppap_<task>.yaml` (data-free, its synthesized cache), `max_steps` steps; returns the experts' directory."""
    # Absolute: ExportPretrained would take a relative directory under the run's version folder.
    experts = os.path.abspath(os.path.join(directory, "experts"))
    if os.path.isfile(os.path.join(experts, "experts.json")):
        return experts
    os.makedirs(directory, exist_ok=True)
    overrides = {
        "trainer": {
            "max_steps": max_steps,
            "check_val_every_n_epoch": 10_000,
            "enable_progress_bar": False,
            "default_root_dir": directory,
            "callbacks": [{"class_path": "plugguide.callbacks.ExportPretrained", "init_args": {"directory": experts}}],
        },
    }
    with open(os.path.join(directory, "overrides.yaml"), "w") as file:
        yaml.safe_dump(overrides, file)
    lightning(["fit", "-c", f"configs/ppap_{task}.yaml", "-c", os.path.join(directory, "overrides.yaml")])
    return experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument(
        "--samples",
        type=int,
        default=100,
        help="validation digits whose maps are the targets, and samples per row (<= 180)",
    )
    parser.add_argument("--steps", type=int, default=50, help="DDPM (ancestral) sampler steps")
    parser.add_argument(
        "--classifier-scales",
        type=float,
        nargs="+",
        default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
        help="classifier scales s swept (the pipeline's `classifier_scale`, the weight of the classifier's gradient)",
    )
    parser.add_argument(
        "--normalized-scales",
        type=float,
        nargs="+",
        default=[1.0, 3.0, 10.0, 30.0],
        help="scales of the PPAP-5 row with the authors' batch-normalised gradient (another unit than --classifier-scales)",
    )
    parser.add_argument("--max-steps", type=int, default=1500, help="PPAP-5 training steps (the configs' own)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these methods (e.g. PPAP-5)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=250,
        help="samples drawn together (only the batch-normalised row depends on it)",
    )
    parser.add_argument(
        "--output-dir", default="runs/dense_table", help="run folder: results.json, grids/, experts, table.md"
    )
    add_page_arguments(parser, "dense-table")
    args = parser.parse_args()
    if not 1 <= args.samples <= 180:
        parser.error(f"--samples {args.samples}: the targets are maps of the 180 validation digits; give 1..180.")

    metrics = reference_metrics()
    unet = load_unet(DIFFUSION_MODEL)
    results_path = os.path.join(args.output_dir, "results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}
    sections = []
    for name in args.tasks:
        spec = TASKS[name]
        targets = TargetMapDataModule(model_path=spec["model"], splits=["val"], num_samples=args.samples)
        targets.setup("predict")
        maps, classes = targets.dataset.rows["target_map"], targets.dataset.rows["target_class"]
        seeds = torch.arange(len(maps))
        map_metrics = DenseMapMetrics(name, metrics.evaluator)

        def score_and_show(images: torch.Tensor, grid_path: str) -> dict:
            """The map scores of a row's samples, and a grid of its first 16 (target map | sample) pairs."""
            map_metrics.reset()
            map_metrics.update(images, maps, seeds)
            pairs = torch.stack(
                [render_maps(maps[:16]), (images[:16] / 2 + 0.5).expand(-1, 3, -1, -1)], dim=1
            ).flatten(0, 1)
            os.makedirs(os.path.dirname(grid_path), exist_ok=True)
            save_image(pairs, grid_path, nrow=8, padding=1, pad_value=1.0)
            return map_metrics.compute() | {"intervals": map_metrics.compute_intervals()}

        def sweep(key: str, guidance, scales: list[float]) -> dict:
            """The row's results per scale; scales already measured (same protocol) are read from results.json."""
            done = results.setdefault(key, {})
            pipeline = GuidedDiffusionPipeline(unet, load_scheduler(DIFFUSION_MODEL, "DDPMScheduler"), guidance)
            pipeline.set_progress_bar_config(disable=True)
            for scale in [s for s in scales if str(s) not in done]:
                # Sample i: seed i, target map i (the "labels" are the digits the maps name, scored as class agreement).
                def draw(labels, seeds):
                    return sample_batch(
                        pipeline,
                        {"label": torch.full_like(labels, -1), "seed": seeds, "target_map": maps[seeds]},
                        num_inference_steps=args.steps,
                        classifier_scale=scale,
                    )

                grid = os.path.join(args.output_dir, "grids", f"{slug(key)}-s{scale:g}.png")
                done[str(scale)] = measure(
                    metrics,
                    draw,
                    classes,
                    seeds,
                    batch_size=args.batch_size,
                    on_images=lambda images: score_and_show(images, grid),
                )
                os.makedirs(args.output_dir, exist_ok=True)
                with open(results_path + ".tmp", "w") as file:
                    json.dump(results, file, indent=1)
                os.replace(results_path + ".tmp", results_path)
                print(
                    key,
                    scale,
                    {k: round(v, 4) for k, v in done[str(scale)].items() if isinstance(v, float)},
                    flush=True,
                )
            return {str(s): done[str(s)] for s in scales}  # scales of other runs kept in results.json play no part

        unguided = sweep(f"{name}/unguided", None, [0.0])["0.0"]
        rows = {
            "naive off-the-shelf": lambda: NaiveClassifierGuidance(spec["model"], task=spec["task"]),
            "gradients on x0_hat": lambda: PredictedCleanImageGuidance(spec["model"], task=spec["task"]),
            "calibrated off-the-shelf": lambda: CalibratedGuidance(
                spec["model"], task=spec["task"], **spec["calibrated"]
            ),
            "PPAP-5 (data-free)": lambda: ExpertGuidance(experts(), task=spec["task"]),
            "PPAP-5, batch-normalised gradient (authors')": lambda: ExpertGuidance(
                experts(), task=spec["task"], normalize_gradient=True
            ),
        }
        row_scales = {"PPAP-5, batch-normalised gradient (authors')": args.normalized_scales}

        def experts() -> str:
            return train_experts(name, os.path.join(args.output_dir, name, "ppap-5"), args.max_steps)

        columns = [spec["score"], *spec["scores"][1:], "guided_accuracy", "fid_autoencoder", "fid_evaluator"]

        def cells(row):
            return [estimate(row, key, 2 if key.startswith("fid") else 3) for key in columns]

        table = [["unguided", "-", *cells(unguided)]]
        sweeps = {}
        for method, guidance in rows.items():
            if args.only and method not in args.only:
                continue
            key = f"{name}/{method}"
            sweeps[key] = sweep(key, guidance(), row_scales.get(method, args.classifier_scales))
            scale, admissible = best_scale(sweeps[key], unguided, score=spec["score"])
            table.append([method, f"{float(scale):g}" + ("" if admissible else "*"), *cells(sweeps[key][scale])])
        sweep_table = markdown_table(
            ["row", "scale: score / FID autoencoder"],
            [
                [
                    key,
                    ", ".join(
                        f"s={float(s):g}: {v[spec['score']]:.3f} / {v['fid_autoencoder']:.1f}" for s, v in r.items()
                    ),
                ]
                for key, r in sweeps.items()
            ],
        )
        sections += [
            f"### {name}: toward {spec['model']}'s maps of {len(maps)} held-out digits",
            "",
            markdown_table(["method", "best scale", *(HEADERS[key] for key in columns)], table),
            "",
            f"Sweep ({HEADERS[spec['score']]} / FID autoencoder at each scale):",
            "",
            sweep_table,
            "",
        ]
        if sweeps:
            sweep_figure(sweeps, unguided, None, score=spec["score"]).savefig(
                os.path.join(args.output_dir, f"sweep-{name}.png"), dpi=120
            )

    lines = [
        describe(args.samples, f"DDPM-{args.steps} (ancestral, mean shift)")
        + " Sample i is guided toward target map i; maps are read off each sample's pixels and compared with its target"
        " (95% bootstrap intervals); the best-scale rule takes the map score (mIoU; depth correlation) for accuracy.",
        "",
        *sections,
    ]
    text = "\n".join(lines)
    publish_table(text, args.output_dir, args.page, args.marker)
    print(text)
    print(f"\nRaw results: {results_path}; grids: {args.output_dir}/grids/")


if __name__ == "__main__":
    main()
