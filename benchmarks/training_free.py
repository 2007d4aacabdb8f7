"""Time per image of every row of the training-free page, at its searched setting, for its "ms per image" column.

    python benchmarks/training_free.py [--samples 100] [--repeats 3] [--samplers DDPM-50 DDIM-25] [--tasks label segmentation]
                                       [--settings docs/results/training_free_settings.json]
                                       [--output docs/results/training_free_timings.json]

Run it alone on an idle machine: each row samples `--samples` images (the table's first seeds and targets) in one
batch, after a warm-up run of a few images, `--repeats` times; the median wall time over the images is kept, per
`<task>/<sampler>/<row>`, in `--output` (written after every row), with the torch thread count and the machine's CPU. The
rows are built exactly as `scripts/training_free_table.py` builds them (`scripts/training_free_rows.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # the page's rows
from protocol import targets  # noqa: E402
from sampler_table import SAMPLERS  # noqa: E402
from training_free_rows import ROWS, TASKS, guided_sampler  # noqa: E402

from plugguide.datamodules import TargetMapDataModule  # noqa: E402
from plugguide.models import load_unet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--samplers", nargs="+", default=["DDPM-50", "DDIM-25"], choices=list(SAMPLERS))
    parser.add_argument("--samples", type=int, default=100, help="images per timed run (one batch)")
    parser.add_argument("--warmup", type=int, default=4, help="images of the untimed first run of each row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", default="docs/results/training_free_settings.json")
    parser.add_argument(
        "--output", default="docs/results/training_free_timings.json", help="where to write {row: ms / image}"
    )
    args = parser.parse_args()
    if args.samples < 10 or args.samples % 10:
        parser.error(
            f"Expected `--samples` to be a positive multiple of 10 (as many of each class), but got {args.samples}."
        )
    chosen = json.load(open(args.settings)) if os.path.isfile(args.settings) else {}
    timings = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}",
        "samples": args.samples,
    }
    for task in args.tasks:
        if task == "label":
            labels, seeds = targets(args.samples // 10)
            maps = None
        else:
            rows = TargetMapDataModule(model_path=TASKS[task]["model"], splits=["val"], num_samples=args.samples)
            rows.setup("predict")
            maps, labels = rows.dataset.rows["target_map"], rows.dataset.rows["target_class"]
            seeds = torch.arange(len(maps))
        for sampler in [s for s in args.samplers if s in TASKS[task]["samplers"]]:
            unet = load_unet(f"assets/digits/{SAMPLERS[sampler][0]}")
            for name, row in ROWS[task].items():
                key = f"{task}/{sampler}/{name}"
                if row.axes and key not in chosen:
                    print(f"{key}: no searched setting in {args.settings}, skipped", flush=True)
                    continue
                sample = guided_sampler(row, chosen[key]["settings"] if row.axes else {}, unet, sampler, maps=maps)
                sample(labels[: args.warmup], seeds[: args.warmup])
                seconds = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    sample(labels, seeds)
                    seconds.append((time.perf_counter() - started) / len(labels))
                timings[key] = statistics.median(seconds)
                print(f"{key}: {1000 * timings[key]:.1f} ms per image", flush=True)
                with open(args.output + ".tmp", "w") as file:
                    json.dump(timings, file, indent=1)
                os.replace(args.output + ".tmp", args.output)


if __name__ == "__main__":
    main()
