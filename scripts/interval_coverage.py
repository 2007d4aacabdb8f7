"""How often the tables' 95% intervals of FID, KID (autoencoder space) and the nearest-training distance cover the
value they estimate, and how wide they are against the spread of the estimates from seed to seed.

Samples come from one fixed distribution: the training digits' latents under `assets/digits/autoencoder`, each moved
by Gaussian noise (a kernel density estimate, `--bandwidth` times each latent dimension's spread) and decoded. A pool
of `--pool` such images is drawn and scored once (autoencoder features, distance to the nearest training digit);
each seed draws a row of `--samples` from the pool (a pool 40 times larger than a row, so a row repeats almost no
image). The reference is the tables' own (the held-out test digits), fixed. The value an interval estimates is the
metric's mean over `--seeds` rows. Intervals come from `metrics.generation` (the tables' code, `--resamples`
resamples) for the first `--bootstrap-seeds` rows; the coverage printed is the share of (interval offsets of a
bootstrapped row, estimate of any row) pairs that cover the mean, which uses every row's estimate and so needs few
bootstraps.
    python scripts/interval_coverage.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from protocol import AUTOENCODER, REFERENCE_SPLIT

from plugguide.datamodules import DigitsDataModule
from plugguide.metrics import AutoencoderLatents
from plugguide.metrics.generation import (
    DISTANCES,
    ReferenceStatistics,
    distance_intervals,
    median,
    median_interval,
    nearest_distances,
    resampling_draws,
)
from plugguide.models import load_vae


@torch.no_grad()
def scored_pool(size: int, bandwidth: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pool features, pool nearest-training distances, reference features) in the autoencoder space."""
    data = DigitsDataModule()
    training, reference = data.split_images("train")[0], data.split_images(REFERENCE_SPLIT)[0]
    vae = load_vae(AUTOENCODER, "autoencoder").eval()
    space = AutoencoderLatents(vae)
    latents = vae.encode(training).latent_dist.mean
    generator = torch.Generator().manual_seed(seed)
    features, distances = [], []
    for start in range(0, size, 1000):
        chosen = latents[torch.randint(0, len(latents), (min(1000, size - start),), generator=generator)]
        noise = torch.randn(chosen.shape, generator=generator) * bandwidth * latents.std(0, keepdim=True)
        images = vae.decode(chosen + noise).sample.clamp(-1, 1)
        features.append(space(images))
        distances.append(nearest_distances(images, training))
    return torch.cat(features), torch.cat(distances), space(reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=400, help="rows whose estimates give the seed-to-seed spread")
    parser.add_argument("--bootstrap-seeds", type=int, default=40, help="rows whose intervals are bootstrapped")
    parser.add_argument("--samples", type=int, default=500, help="per row, as the tables")
    parser.add_argument("--resamples", type=int, default=200, help="bootstrap resamples, as the tables")
    parser.add_argument("--pool", type=int, default=20000)
    parser.add_argument("--bandwidth", type=float, default=0.3)
    args = parser.parse_args()
    start = time.time()
    pool, pool_distances, reference = scored_pool(args.pool, args.bandwidth)
    reference = ReferenceStatistics(reference)
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, args.pool, (args.samples,), generator=generator) for _ in range(args.seeds)]
    estimates = {f"{name}_autoencoder": [] for name in DISTANCES} | {"nearest_training_distance": []}
    for row in rows:
        for name, distance in DISTANCES.items():
            estimates[f"{name}_autoencoder"].append(distance(reference, pool[row]))
        estimates["nearest_training_distance"].append(float(median(pool_distances[row])))
    print(f"pool and {args.seeds} estimates: {time.time() - start:.0f} s", flush=True)
    offsets = {name: [] for name in estimates}  # (estimate - low, high - estimate) of each bootstrapped row
    direct = {name: [] for name in estimates}  # that row's own interval
    for index, row in enumerate(rows[: args.bootstrap_seeds]):
        draws = resampling_draws(args.samples, args.resamples, seed=index)
        intervals = {
            f"{name}_autoencoder": bounds for name, bounds in distance_intervals(reference, pool[row], draws).items()
        }
        intervals["nearest_training_distance"] = median_interval(pool_distances[row], draws)
        for name, (low, high) in intervals.items():
            estimate = estimates[name][index]
            offsets[name].append((estimate - low, high - estimate))
            direct[name].append((low, high))
    print(f"{args.bootstrap_seeds} bootstraps: {time.time() - start:.0f} s", flush=True)
    print(
        f"\n{args.seeds} rows of {args.samples} samples from a pool of {args.pool:,} (bandwidth {args.bandwidth}), "
        f"{args.bootstrap_seeds} of them bootstrapped with {args.resamples} resamples"
    )
    print(
        "| metric | mean over rows | coverage of the mean | bootstrapped rows' own intervals covering it | mean width / seed-to-seed 95% range |"
    )
    print("|---|---|---|---|---|")
    for name, values in estimates.items():
        values, below_above = np.array(values), np.array(offsets[name])
        mean, deviations = values.mean(), values - values.mean()
        covered = (-below_above[:, 1:2] <= deviations) & (deviations <= below_above[:, 0:1])
        own = sum(low <= mean <= high for low, high in direct[name])
        low, high = np.percentile(values, [2.5, 97.5])
        ratio = below_above.sum(1).mean() / (high - low)
        print(f"| {name} | {mean:.4g} | {covered.mean():.1%} | {own}/{len(direct[name])} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
