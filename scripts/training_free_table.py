"""Training-free guidance (TFG's design space) beside unguided, calibrated, PPAP-5 and distilled guidance, as markdown.

    python scripts/search_training_free.py                      # the searched settings, docs/results/training_free_settings.json
    python scripts/training_free_table.py [--samplers DDPM-50 DDIM-25] [--tasks label segmentation]
                                          [--samples-per-class 50] [--dense-samples 100] [--output-dir runs/training_free_table]

Label guidance on the digits (the ResNet guides every training-free row; PPAP-5 is the main job's experts, the distilled
guide the 32-step `ShiftGuide` distilled from them), every row at the setting `scripts/search_training_free.py`
selected for it on the validation split (`--settings`), scored under the table protocol (`scripts/protocol.py`: 500
samples, seeds 0..499, the independent evaluator, FID against the test digits with intervals, diversity, the
nearest-training distance). Segmentation: the dense table's protocol (`scripts/dense_table.py`: DDPM-50, sample i
guided toward the segmenter's map of validation digit i, maps read off the samples' pixels), the presets guided by the
segmenter.

Cost columns: calls per image of one run, counted from the method's settings (`Row.cost`: `training_free_cost` for
the presets); ms per image from `benchmarks/training_free.py` run alone (`--timings`), not from this run, whose
wall time shares the machine. A row whose sampling fails keeps its place with the error. Measured entries are kept in
`<out>/results.json` (keyed by their setting, so a new search re-measures) and a grid of each in `<out>/grids/`.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from protocol import QUALITY_HEADERS, describe, measure, quality_cells, reference_metrics, slug, targets
from results_page import add_page_arguments, publish_table
from sampler_table import SAMPLERS
from training_free_rows import ROWS, TASKS, guided_sampler, map_scores, row_cost

from plugguide.datamodules import TargetMapDataModule
from plugguide.metrics.reporting import estimate, markdown_table
from plugguide.models import load_unet

COST_HEADERS = ["denoiser calls (forward / backward)", "guide calls (forward / backward)", "ms per image (alone)"]
DENSE_COLUMNS = {
    "miou": "mIoU",
    "stroke_iou": "stroke IoU",
    "guided_accuracy": "class agreement",
    "fid_autoencoder": "FID autoencoder",
    "fid_evaluator": "FID evaluator",
}


def setting_text(chosen: dict | None) -> str:
    """The searched setting as a cell: `s=2` or `rho=1, mu=0.5, sigma=0.01`; `*` where no searched setting kept the
    validation FID inside the unguided interval."""
    if chosen is None:
        return "-"
    names = {"classifier_scale": "s"}
    text = ", ".join(f"{names.get(k, k)}={v:g}" for k, v in chosen["settings"].items())
    return text + ("" if chosen["admissible"] else "*")


def cost_cells(row, settings: dict, sampler: str, timings: dict, key: str) -> list[str]:
    cost = row_cost(row, settings, sampler)
    seconds = timings.get(key)
    return [
        f"{cost.denoiser_forwards} / {cost.denoiser_backwards}",
        f"{cost.guide_forwards} / {cost.guide_backwards}",
        "-" if seconds is None else f"{1000 * seconds:.1f}",
    ]


def trace_text(chosen: dict, score: str) -> str:
    """Every evaluated setting of a search: `setting: score / FID (validation)`."""
    names = {"classifier_scale": "s"}
    parts = []
    for entry in chosen["trace"]:
        setting = ", ".join(f"{names.get(k, k)}={v:g}" for k, v in entry["settings"].items())
        result = entry.get("error") or f"{entry[score]:.2f} / {entry['fid_autoencoder']:.1f}"
        parts.append(f"{setting}: {result}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--samplers", nargs="+", default=["DDPM-50", "DDIM-25"], choices=list(SAMPLERS))
    parser.add_argument("--rows", nargs="+", default=None, help="measure only these rows (and unguided)")
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--dense-samples", type=int, default=100, help="segmentation targets (<= 180 val digits)")
    parser.add_argument("--settings", default="docs/results/training_free_settings.json")
    parser.add_argument("--timings", default="docs/results/training_free_timings.json")
    parser.add_argument(
        "--output-dir", default="runs/training_free_table", help="run folder: results.json, grids/, table.md"
    )
    add_page_arguments(parser, "training-free-table")
    args = parser.parse_args()
    if not os.path.isfile(args.settings):
        parser.error(f"`--settings` {args.settings!r} does not exist; run scripts/search_training_free.py first.")
    chosen = json.load(open(args.settings))
    timings = json.load(open(args.timings)) if os.path.isfile(args.timings) else {}
    os.makedirs(args.output_dir, exist_ok=True)
    results_path = os.path.join(args.output_dir, "results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}
    metrics = reference_metrics()

    def measured(key: str, settings: dict, sample, labels, seeds, on_images=None) -> dict:
        entry = f"{key}/{json.dumps(settings, sort_keys=True)}/{len(labels)}"
        if entry not in results:
            try:
                grid = os.path.join(args.output_dir, "grids", f"{slug(key)}.png")
                results[entry] = measure(metrics, sample(), labels, seeds, grid_path=grid, on_images=on_images)
            except (FloatingPointError, RuntimeError, ValueError) as error:  # a failed row keeps its place
                results[entry] = {"error": f"{type(error).__name__}: {error}"}
            with open(results_path + ".tmp", "w") as file:
                json.dump(results, file, indent=1)
            os.replace(results_path + ".tmp", results_path)
            shown = {k: round(v, 4) for k, v in results[entry].items() if isinstance(v, float)}
            print(key, settings, results[entry].get("error", shown), flush=True)
        return results[entry]

    sections = []
    for task in args.tasks:
        dense = task != "label"
        if dense:
            maps = TargetMapDataModule(model_path=TASKS[task]["model"], splits=["val"], num_samples=args.dense_samples)
            maps.setup("predict")
            target_maps, labels = maps.dataset.rows["target_map"], maps.dataset.rows["target_class"]
            seeds = torch.arange(len(target_maps))
            on_images = map_scores(task, metrics.evaluator, target_maps)
            headers = list(DENSE_COLUMNS.values())
        else:
            (labels, seeds), target_maps, on_images = targets(args.samples_per_class), None, None
            headers = QUALITY_HEADERS
        table, traces = [], []
        # A sampler the search has not run for this task is left out, not listed row by row as unmeasured.
        samplers = [
            s
            for s in args.samplers
            if s in TASKS[task]["samplers"] and any(k.startswith(f"{task}/{s}/") for k in chosen)
        ]
        for sampler in samplers:
            model, *_ = SAMPLERS[sampler]
            unet = load_unet(f"assets/digits/{model}")
            for name, row in ROWS[task].items():
                if args.rows and name != "unguided" and name not in args.rows:
                    continue
                key = f"{task}/{sampler}/{name}"
                search = chosen.get(key)
                if row.axes and search is None:
                    reason = row.available() or "not searched yet (scripts/search_training_free.py)"
                    table.append([sampler, name, "-", f"not measured: {reason}", *[""] * (len(headers) + 2)])
                    continue
                settings = search["settings"] if search else {}
                result = measured(
                    key,
                    settings,
                    lambda: guided_sampler(row, settings, unet, sampler, maps=target_maps),
                    labels,
                    seeds,
                    on_images,
                )
                if "error" in result:
                    cells = [f"failed: {result['error']}", *[""] * (len(headers) - 1)]
                elif dense:
                    cells = [estimate(result, k, 2 if k.startswith("fid") else 3) for k in DENSE_COLUMNS]
                else:
                    cells = quality_cells(result)
                table.append(
                    [sampler, name, setting_text(search), *cells, *cost_cells(row, settings, sampler, timings, key)]
                )
                if search:
                    traces.append([sampler, name, trace_text(search, TASKS[task]["score"])])
        caption = (
            describe(len(labels), " and ".join(samplers))
            if not dense
            else f"DDPM-50, {len(labels)} samples, sample i seeded with i and guided toward the segmenter's map of "
            f"validation digit i (the dense table's protocol); maps read off each sample's pixels (strokes labelled "
            f"by the evaluator), 95% bootstrap intervals; class agreement by the evaluator; FID against the test digits."
        )
        sections += [
            f"### {'label guidance' if not dense else task}",
            "",
            caption,
            "Setting: each row's, searched on the validation split (`scripts/search_training_free.py`); `*`: no "
            "searched setting kept the validation FID inside the unguided interval (the lowest FID taken).",
            "",
            markdown_table(["sampler", "method", "setting", *headers, *COST_HEADERS], table),
            "",
            f"Search (setting: {'accuracy by the DeiT classifier' if not dense else 'mIoU, strokes labelled by the DeiT classifier'} "
            "/ FID autoencoder against the validation digits, in the order evaluated):",
            "",
            markdown_table(["sampler", "method", "search"], traces),
            "",
        ]
    text = "\n".join(sections)
    publish_table(text, args.output_dir, args.page, args.marker)
    print(text)


if __name__ == "__main__":
    main()
