"""Synthesis throughput against the bare UNet forward rate, where the rest of the time goes, and peak memory.

    python benchmarks/synthesis_throughput.py [--images 4000] [--batch-size 250] [--steps 20] [--repeats 2]
        [--memory-batch-sizes 50 250 1000] [--memory-images 2000 8000] [--memory-steps 2]

Rates (one process, the main job's data section: DDIM-20, teacher logits cached, shards of 500): the bare UNet
forward of the embedded model at the synthesis batch size under `torch.inference_mode` (image-steps/s, and the
images/s bound it sets for DDIM-N: rate / N), timed before and after each synthesis of `--images` images by
`SynthesizedImageDataModule.generate`, and the ratio synthesis / bound. The breakdown times the UNet calls inside
synthesis, `scheduler.step`, the teacher's logits, building and writing the Arrow shards and the checksums; the
remainder is the rest of the loop (seeds, noise, progress bar).

Memory (each in a fresh process, so the peak is its own): peak resident memory (`ru_maxrss`) after loading and
after synthesis, per batch size, and for two set sizes at one batch size; the synthesis writes a shard at a time,
so the peak should not grow with the number of images. Memory does not depend on the sampler's steps: those runs
take `--memory-steps`.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import datasets
import torch
from memory import peak_rss
from timers import timed

from plugguide.datamodules import SynthesizedImageDataModule, synthesized

MODEL = "assets/digits/ddpm-uncond"
TEACHER = "assets/digits/classifier-resnet"


def data_module(cache: str, images: int, batch_size: int, steps: int) -> SynthesizedImageDataModule:
    """The main job's data section (configs/ppap.yaml) with the count, batch size and steps given."""
    return SynthesizedImageDataModule(
        MODEL,
        "DDIMScheduler",
        num_inference_steps=steps,
        num_images=images,
        generation_batch_size=batch_size,
        shard_size=500,
        batch_size=min(128, images),
        cache_dir=cache,
        teacher_path=TEACHER,
    )


@torch.inference_mode()
def bare_unet_seconds(unet, batch_size: int, steps: int, batches: int) -> float:
    """Seconds per image-step of the UNet alone: `batches` x `steps` forwards at `batch_size` on DDIM-N's timesteps."""
    x = torch.randn(
        batch_size,
        unet.config.in_channels,
        unet.config.sample_size,
        unet.config.sample_size,
        generator=torch.Generator().manual_seed(0),
    )
    started = time.perf_counter()
    for _ in range(batches):
        for t in torch.linspace(999, 0, steps).long():
            unet(x, t)
    return (time.perf_counter() - started) / (batches * steps * batch_size)


def rates(args: argparse.Namespace) -> None:
    """Bare UNet rate, synthesis rate and their ratio per repeat (after a warm-up round), then where synthesis spends its time."""
    seconds: dict[str, float] = collections.defaultdict(float)
    for owner, name, key in (
        (datasets.Dataset, "from_dict", "Arrow table"),
        (datasets.Dataset, "save_to_disk", "Arrow write"),
        (synthesized, "file_digest", "checksums"),
    ):
        timed(owner, name, seconds, lambda key=key: key)
    ratios, total = [], 0.0
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeats + 1):
            module = data_module(f"{root}/{repeat}", args.images, args.batch_size, args.steps)
            before = bare_unet_seconds(module.unet.eval(), args.batch_size, args.steps, args.bare_batches)
            if repeat == 1:
                seconds.clear()  # the breakdown counts the timed rounds only
            for owner, key in ((module.unet, "UNet forward"), (module.teacher, "teacher logits")):
                timed(owner, "forward", seconds, lambda key=key: key)
            timed(module.scheduler, "step", seconds, lambda: "scheduler.step")
            started = time.perf_counter()
            module.generate()
            synthesis = time.perf_counter() - started
            del module.unet.forward  # the bare rate below times the module's own forward
            after = bare_unet_seconds(module.unet, args.batch_size, args.steps, args.bare_batches)
            if not repeat:  # round 0 warms up
                continue
            bare_rate = 2 / (before + after)  # image-steps/s
            bound, rate = bare_rate / args.steps, args.images / synthesis
            ratios.append(rate / bound)
            total += synthesis
            print(
                f"repeat {repeat}: bare UNet {bare_rate:,.0f} image-steps/s at batch {args.batch_size} = {bound:.1f} images/s for "
                f"DDIM-{args.steps}; synthesis {rate:.1f} images/s; ratio {ratios[-1]:.3f}",
                flush=True,
            )
    print(
        f"median ratio synthesis / bare-UNet bound: {statistics.median(ratios):.3f}  [torch threads: {torch.get_num_threads()}]"
    )
    accounted = sum(seconds.values())
    parts = ", ".join(
        f"{key} {100 * value / total:.1f}%" for key, value in sorted(seconds.items(), key=lambda item: -item[1])
    )
    print(f"synthesis time: {parts}, rest of the loop {100 * (total - accounted) / total:.1f}%")


def peak_memory(images: int, batch_size: int, steps: int) -> tuple[float, float]:
    """(peak RSS after loading the models, peak RSS after synthesizing `images`) in MiB, of this (fresh) process."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        module = data_module(root, images, batch_size, steps)
        loaded = peak_rss()
        module.generate()
        return loaded, peak_rss()


def memory(args: argparse.Namespace) -> None:
    """Peak RSS per batch size (at the first of `--memory-images`), then per set size at `--batch-size`, each in a fresh process."""
    runs = [(args.memory_images[0], batch) for batch in args.memory_batch_sizes]
    runs += [(images, args.batch_size) for images in args.memory_images if (images, args.batch_size) not in runs]
    for images, batch in runs:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            loaded, peak = pool.submit(peak_memory, images, batch, args.memory_steps).result()
        print(
            f"peak RSS, {images:,} images at batch {batch}: {loaded:,.0f} MiB loaded, {peak:,.0f} MiB after synthesis (+{peak - loaded:,.0f} MiB)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--bare-batches",
        type=int,
        default=2,
        help="UNet batches of `--steps` forwards timed before and after each synthesis",
    )
    parser.add_argument("--memory-batch-sizes", type=int, nargs="*", default=[50, 250, 1000])
    parser.add_argument("--memory-images", type=int, nargs="*", default=[2000, 8000])
    parser.add_argument("--memory-steps", type=int, default=2)
    args = parser.parse_args()
    rates(args)
    memory(args)


if __name__ == "__main__":
    main()
