"""Searches each row of the training-free page for its setting, as TFG's `searching.py` does, on a validation signal.

    python scripts/search_training_free.py [--samplers DDPM-50 DDIM-25] [--rows TFG DPS ...] [--tasks label segmentation]
                                           [--samples-per-class 10] [--budget 4] [--joint-budget 6]
                                           [--settings docs/results/training_free_settings.json]

TFG's scheme (Ye et al., 2024, `searching.py`): every searched parameter starts small (`SearchAxis.init`); a round
multiplies each parameter of each setting in the beam by its factor, one parameter at a time (capped at its
maximum), evaluates the settings not seen before and keeps the `--beam-width` best of all evaluated so far as the
next beam. Here the search also stops at `--budget` evaluated settings per row (`--joint-budget` for TFG's three
jointly searched), or when the beam's children were all evaluated (the frontier fell out of the beam).

What it selects on never touches the tables' reference or judge (`scripts/protocol.py`): samples get seeds from
`SEARCH_SEED` on (the tables use 0..499), quality is the autoencoder FID against the digits' *validation* split
(`SEARCH_SPLIT`), and class accuracy is read by `JUDGE`, a shipped classifier that neither guides these rows (the
ResNet does) nor judges the tables (the evaluator does). Reading the guide's own classifier would reward adversarial
gradients; reading the evaluator or the test digits would fit the published numbers. A setting's rank follows
`BEST_SCALE_RULE` on these signals (`selection_key`). For the segmentation task the targets are the segmenter's maps
of *training* digits (validation digits would pull samples onto the FID reference) and the map score is read with
`JUDGE` labelling the strokes.

Evaluations are cached in `<out>/evaluations.json` (a rerun resumes); the chosen settings and every search's
trace are written to `--settings`, which `scripts/training_free_table.py` reads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import traceback
from typing import Callable

import torch
from protocol import AUTOENCODER, measure, targets
from sampler_table import SAMPLERS
from training_free_rows import ROWS, SEARCHED_SAMPLERS, TASKS, Row, SearchAxis, guided_sampler, map_scores

from plugguide.datamodules import DigitsDataModule, TargetMapDataModule
from plugguide.metrics import GenerationMetrics
from plugguide.metrics.reporting import PRIMARY_DISTANCE
from plugguide.models import load_unet

# The split the search scores quality against, never `protocol.REFERENCE_SPLIT` ("test"), the tables' reference.
SEARCH_SPLIT = "val"
# The split whose segmenter maps are the dense search's targets (the table's are the validation digits').
SEARCH_TARGET_SPLIT = "train"
# The classifier whose reading is the searched accuracy: neither the guide of these rows nor the tables' evaluator.
JUDGE = "assets/digits/classifier-deit"
# Search samples are seeded SEARCH_SEED, SEARCH_SEED + 1, ...: disjoint from the tables' seeds 0..499.
SEARCH_SEED = 10_000


def beam_search(
    evaluate: Callable[[dict[str, float]], dict],
    axes: dict[str, SearchAxis],
    rank: Callable[[dict], tuple],
    beam_width: int = 2,
    budget: int = 8,
) -> list[dict]:
    """TFG's beam search over `axes`, within `budget` evaluated settings; returns the trace.

    Round 0 evaluates the initial setting and its children; each next round, the children of the `beam_width` best
    settings evaluated so far (by `rank`, higher is better) that were not evaluated yet. The search ends when the
    budget is spent or no child is new. The best setting is `max(trace, key=rank of its result)`.

    Args:
        evaluate (`Callable[[dict], dict]`): a setting `{axis name: value}` -> its result.
        axes (`dict[str, SearchAxis]`): the searched parameters.
        rank (`Callable[[dict], tuple]`): a result -> a sortable key, higher is better.
        beam_width (`int`, defaults to 2): TFG's `topk`.
        budget (`int`, defaults to 8): most settings evaluated.

    Returns:
        `list[dict]`: `{"round", "settings", "result"}` per evaluation, in the order they ran.
    """
    if beam_width < 1 or budget < 1:
        raise ValueError(f"Expected `beam_width` and `budget` >= 1, but got {beam_width} and {budget}.")
    if not axes:
        raise ValueError("Expected at least one searched parameter in `axes`, but got none.")

    def children(settings: dict[str, float]) -> list[dict[str, float]]:
        return [{**settings, name: axis.child(settings[name])} for name, axis in axes.items()]

    def new(candidates: list[dict[str, float]]) -> list[dict[str, float]]:
        seen = [entry["settings"] for entry in trace]
        unique = []
        for candidate in candidates:
            if candidate not in seen and candidate not in unique:
                unique.append(candidate)
        return unique

    trace: list[dict] = []
    start = {name: float(axis.init) for name, axis in axes.items()}
    candidates, round_index = new([start, *children(start)]), 0
    while candidates and len(trace) < budget:
        for settings in candidates[: budget - len(trace)]:
            trace.append({"round": round_index, "settings": settings, "result": evaluate(settings)})
        beam = sorted(trace, key=lambda entry: rank(entry["result"]), reverse=True)[:beam_width]
        candidates = new([child for entry in beam for child in children(entry["settings"])])
        round_index += 1
    return trace


def selection_key(
    result: dict, bound: float, score: str = "guided_accuracy", distance: str = PRIMARY_DISTANCE
) -> tuple[bool, float, float]:
    """`BEST_SCALE_RULE` as a sort key (higher is better): settings whose `distance` is within `bound` (the upper end of
    the unguided interval) first, by `score` and then by lower distance; the others after them, by lower distance.
    A failed evaluation (an `error`, or a non-finite number) ranks last."""
    value, gap = result.get(score, math.nan), result.get(distance, math.nan)
    if "error" in result or not (math.isfinite(value) and math.isfinite(gap)):
        return (False, -math.inf, -math.inf)
    admissible = gap <= bound
    return (admissible, value if admissible else -gap, -gap)


def best_of(trace: list[dict], rank: Callable[[dict], tuple]) -> dict:
    return max(trace, key=lambda entry: rank(entry["result"]))


def validation_metrics(datamodule: DigitsDataModule | None = None) -> GenerationMetrics:
    """`GenerationMetrics` judged by `JUDGE`, with the autoencoder space, against the `SEARCH_SPLIT` digits."""
    datamodule = datamodule or DigitsDataModule()
    metrics = GenerationMetrics.from_paths(JUDGE, AUTOENCODER)
    metrics.update_real(*datamodule.split_images(SEARCH_SPLIT))
    return metrics


def search_targets(task: str, samples_per_class: int) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """(labels, seeds, batch extras) of the search's samples: seeds from `SEARCH_SEED`; for a dense task, targets are
    the segmenter's maps of the first training digits (`SEARCH_TARGET_SPLIT`) and labels the digits they name."""
    if task == "label":
        labels, seeds = targets(samples_per_class)
        return labels, seeds + SEARCH_SEED, None
    maps = TargetMapDataModule(
        model_path=TASKS[task]["model"], splits=[SEARCH_TARGET_SPLIT], num_samples=10 * samples_per_class
    )
    maps.setup("predict")
    rows = maps.dataset.rows
    return rows["target_class"], torch.arange(len(rows["target_map"])) + SEARCH_SEED, rows


def evaluator_for(row: Row, sampler: str, task: str, metrics: GenerationMetrics, labels, seeds, dense) -> Callable:
    """settings -> validation results of `row` on `sampler` (an `error` entry where sampling fails)."""
    model, *_ = SAMPLERS[sampler]
    unet = load_unet(f"assets/digits/{model}")
    on_images = map_scores(task, metrics.evaluator, dense["target_map"]) if dense else None

    def evaluate(settings: dict[str, float]) -> dict:
        try:
            sample = guided_sampler(
                row, settings, unet, sampler, maps=dense["target_map"] if dense else None, first_seed=SEARCH_SEED
            )
            return measure(metrics, sample, labels, seeds, batch_size=100, on_images=on_images)
        except (FloatingPointError, RuntimeError, ValueError) as error:  # the row's failure is a result, not a crash
            return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=3)}

    return evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--samplers", nargs="+", default=list(SEARCHED_SAMPLERS), choices=list(SEARCHED_SAMPLERS))
    parser.add_argument("--rows", nargs="+", default=None, help="search only these rows (default: every searched row)")
    parser.add_argument("--samples-per-class", type=int, default=10, help="search samples per class (dense: x10 maps)")
    parser.add_argument(
        "--budget", type=int, default=4, help="most settings evaluated per row searching one parameter"
    )
    parser.add_argument(
        "--joint-budget", type=int, default=6, help="most settings evaluated per row searching several (TFG)"
    )
    parser.add_argument("--beam-width", type=int, default=2)
    parser.add_argument("--settings", default="docs/results/training_free_settings.json")
    parser.add_argument(
        "--output-dir",
        default="runs/search_training_free",
        help="run folder: evaluations.json (each evaluated setting, so a rerun resumes)",
    )
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    cache_path = os.path.join(args.output_dir, "evaluations.json")
    cache = json.load(open(cache_path)) if os.path.isfile(cache_path) else {}
    chosen = json.load(open(args.settings)) if os.path.isfile(args.settings) else {}

    def save(path: str, data: dict) -> None:
        with open(path + ".tmp", "w") as file:
            json.dump(data, file, indent=1)
        os.replace(path + ".tmp", path)

    metrics = validation_metrics()
    for task in args.tasks:
        labels, seeds, dense = search_targets(task, args.samples_per_class)
        score = TASKS[task]["score"]
        for sampler in [s for s in args.samplers if s in TASKS[task]["samplers"]]:

            def cached(name: str, settings: dict[str, float]) -> dict:
                entry = f"{task}/{sampler}/{name}/{json.dumps(settings, sort_keys=True)}/{len(labels)}"
                if entry not in cache:
                    evaluate = evaluator_for(ROWS[task][name], sampler, task, metrics, labels, seeds, dense)
                    cache[entry] = evaluate(settings)
                    save(cache_path, cache)
                    shown = {k: round(v, 4) for k, v in cache[entry].items() if isinstance(v, float)}
                    print(task, sampler, name, settings, cache[entry].get("error", shown), flush=True)
                return cache[entry]

            # The unguided row's interval is the bound of every rank.
            bound = cached("unguided", {})["intervals"][PRIMARY_DISTANCE][1]

            def rank(result: dict) -> tuple:
                return selection_key(result, bound, score=score)

            for name, row in ROWS[task].items():
                if not row.axes or (args.rows and name not in args.rows) or row.available():
                    continue
                trace = beam_search(
                    lambda settings: cached(name, settings),
                    row.axes,
                    rank,
                    args.beam_width,
                    args.budget if len(row.axes) == 1 else args.joint_budget,
                )
                best = best_of(trace, rank)
                chosen[f"{task}/{sampler}/{name}"] = {
                    "settings": best["settings"],
                    "admissible": bool(rank(best["result"])[0]),
                    "unguided_bound": bound,
                    "trace": [trace_entry(entry, score) for entry in trace],
                }
                chosen.setdefault("protocol", {}).update(
                    selection=f"BEST_SCALE_RULE with {score} read by {JUDGE} and {PRIMARY_DISTANCE} against the "
                    f"'{SEARCH_SPLIT}' digits",
                    seeds_from=SEARCH_SEED,
                    budget=args.budget,
                    joint_budget=args.joint_budget,
                    beam_width=args.beam_width,
                )
                chosen["protocol"][f"{task}_samples"] = len(labels)
                save(args.settings, dict(sorted(chosen.items())))
                print(f"chosen {task}/{sampler}/{name}: {best['settings']}", flush=True)


def trace_entry(entry: dict, score: str) -> dict:
    """A trace entry as the settings file keeps it: round, setting, and its score and distance (or its error)."""
    result = entry["result"]
    kept = {"error": result["error"]} if "error" in result else {k: result[k] for k in (score, PRIMARY_DISTANCE)}
    return {"round": entry["round"], "settings": entry["settings"], **kept}


if __name__ == "__main__":
    main()
