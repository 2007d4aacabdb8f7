"""Time per image of every row of docs/results/particles.md: unguided and gradient-guided DDPM-50, the particle samplers
at each K, and the distilled guide at DDIM-8.

    python benchmarks/particles.py [--only NAME ...] [--particles K ...] [--samples 50] [--repeats 3] \
        [--output runs/particles_benchmark.json]

The rows and their settings are the table's (`scripts/particles_table.py`, `METHODS`), built the same way on the same
UNet. Each row samples `--samples` images (K particles each) with per-sample seeds; the rows are timed alternately in
this one process, after a warm-up round, and the median milliseconds per image are printed and written to
`--output` as {row key: ms}, which `particles_table.py --timings` reads. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # the table's rows
from particles_table import METHODS, MODEL, add_guide_arguments, build, guides, row_sampler  # noqa: E402

from plugguide.models import load_unet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_guide_arguments(parser)
    parser.add_argument("--only", nargs="+", default=None, help="time only these methods (the table's names)")
    parser.add_argument("--particles", type=int, nargs="+", default=None, help="time only these K of particle rows")
    parser.add_argument("--samples", type=int, default=50, help="images per timed run (each of K particles)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="runs/particles_benchmark.json", help="where to write {row: ms / image}")
    args = parser.parse_args()

    unet = load_unet(MODEL).eval().requires_grad_(False)
    factories = guides(args)
    labels = torch.arange(args.samples) % 10
    seeds = torch.arange(args.samples)
    runs = {}
    for method in METHODS:
        if args.only is not None and method.kind != "unguided" and method.name not in args.only:
            continue
        for value in method.sweep:
            if method.kind == "particles" and args.particles is not None and value not in args.particles:
                continue
            pipeline, call = build(method, value, args, unet, factories)
            runs[f"{method.name}/{value}"] = row_sampler(pipeline, call, {})

    seconds = {key: [] for key in runs}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for key, sample in runs.items():
            started = time.perf_counter()
            sample(labels, seeds)
            if round_:
                seconds[key].append((time.perf_counter() - started) / args.samples)
    median = {key: 1e3 * statistics.median(values) for key, values in seconds.items()}
    print(f"cpu, {torch.get_num_threads()} threads, {args.samples} samples per run, median of {args.repeats}")
    print("| row | ms / image | / unguided |\n|---|---|---|")
    for key, ms in median.items():
        print(f"| {key} | {ms:.1f} | {ms / median['unguided/0']:.2f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(f"{args.output}.tmp", "w") as file:
        json.dump(median, file, indent=1)
    os.replace(f"{args.output}.tmp", args.output)


if __name__ == "__main__":
    main()
