"""Synthesis throughput: SynthesizedImageDataModule against a plain diffusers DDIMPipeline loop.

    python benchmarks/synthesis_throughput.py [--images 500] [--batch-size 250] [--steps 25] [--repeats 3]

Same model, sampler, steps and batch size; the two are timed alternately in one process and the ratio is
printed per repeat. The data module adds per-image seeds, Arrow shards with checksums, and progress.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from diffusers import DDIMPipeline

from plugguide.datamodules import SynthesizedImageDataModule
from plugguide.models.diffusion_model import load_scheduler, load_unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/digits/ddpm-uncond")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    unet = load_unet(args.model)
    plain = DDIMPipeline(unet, load_scheduler(args.model, "DDIMScheduler"))
    plain.set_progress_bar_config(disable=True)

    def run_plain() -> None:
        with torch.inference_mode():
            for start in range(0, args.images, args.batch_size):
                plain(batch_size=min(args.batch_size, args.images - start), num_inference_steps=args.steps, eta=0.0, output_type="np", generator=torch.Generator().manual_seed(start))

    def run_ours() -> None:
        with tempfile.TemporaryDirectory() as cache:
            SynthesizedImageDataModule(args.model, num_inference_steps=args.steps, num_images=args.images, generation_batch_size=args.batch_size, shard_size=args.images, batch_size=min(128, args.images), cache_dir=cache).generate()

    ratios = []
    for repeat in range(args.repeats + 1):
        timings = []
        for run in (run_ours, run_plain):
            started = time.perf_counter()
            run()
            timings.append(time.perf_counter() - started)
        if repeat:  # the first round warms up
            ratios.append(timings[0] / timings[1])
            print(f"repeat {repeat}: SynthesizedImageDataModule {args.images / timings[0]:.1f} img/s, DDIMPipeline {args.images / timings[1]:.1f} img/s, time ratio {ratios[-1]:.3f}")
    print(f"median time ratio (ours / plain diffusers): {statistics.median(ratios):.3f}  [torch threads: {torch.get_num_threads()}]")


if __name__ == "__main__":
    main()
