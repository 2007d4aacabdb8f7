"""Where every random draw of the project gets its seed: per image, per training step, per sample.

Each draw is a function of what it belongs to (an image's index, a step and its rank, a sample's seed), never of the
global RNG, so a set, a run and a batch of samples are the same whatever the batch size, the number of processes or
where a run was resumed.
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np
import torch


def image_seed(seed: int, index: int) -> int:
    """The noise seed of image `index` of a set seeded by `seed`: independent of batch size, shard size and processes."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def step_generator(seed: int, step: int, rank: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by (seed, step, rank): each step's randomness, reproducible after a resume, distinct per rank."""
    state = np.random.SeedSequence([int(seed), int(step), int(rank)]).generate_state(1)[0]
    return torch.Generator(device).manual_seed(int(state))


def seeded_generators(seeds: Iterable[int], device: torch.device | str) -> list[torch.Generator]:
    """One `torch.Generator` per sample, seeded with its seed (diffusers pipelines take such a list)."""
    return [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]


def default_seed() -> int:
    """The seed of `seed_everything` (Lightning exports it as PL_GLOBAL_SEED), else 0, like Lightning's own samplers."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))
