"""Reading training batches of a synthesized set: `ArrowBatches` against `datasets`' own torch formatting.

    python benchmarks/synthesized_reads.py [--images 4000] [--shard-size 500] [--batch-size 128] [--repeats 5]

Writes shards the way `SynthesizedImageDataModule` does (Array3D images, index, cached teacher logits),
loads them memory-mapped, and times the same random batches both ways, interleaved; prints the median time
per batch of each and their ratio, after checking that both give the same rows.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import datasets
import numpy as np
import torch

from plugguide.datamodules.arrow_batches import ArrowBatches


def write_shards(root: str, num_images: int, shard_size: int, shape: tuple[int, ...]) -> datasets.Dataset:
    features = datasets.Features(
        image=datasets.Array3D(shape=shape, dtype="float32"),
        index=datasets.Value("int64"),
        teacher_logits=datasets.List(datasets.Value("float32"), length=10),
    )
    rng = np.random.default_rng(0)
    shards = []
    datasets.disable_progress_bars()
    for start in range(0, num_images, shard_size):
        rows = min(shard_size, num_images - start)
        columns = {
            "image": rng.uniform(-1, 1, (rows, *shape)).astype(np.float32),
            "index": np.arange(start, start + rows),
            "teacher_logits": rng.normal(size=(rows, 10)).astype(np.float32),
        }
        datasets.Dataset.from_dict(columns, features=features).save_to_disk(f"{root}/shard-{start}")
        shards.append(datasets.load_from_disk(f"{root}/shard-{start}"))
    return datasets.concatenate_datasets(shards).with_format("torch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-shape", type=int, nargs=3, default=[1, 16, 16])
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each reads the same 10 batches both ways")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        dataset = write_shards(root, args.images, args.shard_size, tuple(args.image_shape))
        fast = ArrowBatches(dataset)
        rng = np.random.default_rng(1)
        batches = [rng.permutation(args.images)[: args.batch_size].tolist() for _ in range(10)]
        reference = dataset[batches[0]]
        assert all(torch.equal(fast.__getitems__(batches[0])[k], reference[k]) for k in reference), (
            "the two readers disagree"
        )
        readers = {"datasets formatting": dataset.__getitems__, "ArrowBatches": fast.__getitems__}
        seconds = {name: [] for name in readers}
        for _ in range(args.repeats):
            for name, read in readers.items():
                started = time.perf_counter()
                for batch in batches:
                    read(batch)
                seconds[name].append((time.perf_counter() - started) / len(batches))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    for name, value in medians.items():
        print(f"{name:>20}: {value * 1e3:8.3f} ms per batch of {args.batch_size}")
    print(
        f"median time ratio datasets / ArrowBatches: {medians['datasets formatting'] / medians['ArrowBatches']:.0f}x"
    )


if __name__ == "__main__":
    main()
