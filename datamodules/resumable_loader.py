"""Exact mid-epoch resume: a data order and per-step randomness that are functions of seeds, never of global RNG state.

Lightning restores model, optimiser and loop counters from a checkpoint, but not the global RNGs, and a
plain shuffled `DataLoader` restarts its epoch from the first batch. Here the order of an epoch is a
permutation seeded by (seed, epoch), sharded per rank; the loader records how many batches it yielded
(Lightning saves it with the checkpoint through `state_dict`) and skips them after `load_state_dict`.
Training steps draw their noise from `step_generator(seed, step, rank)`. Together a run stopped
mid-epoch and resumed with `--ckpt_path last` sees the same batches and the same noise as one that
never stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from plugguide.models.seeding import default_seed


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (permutation seeded by seed + epoch, rank r takes every W-th index) that can start mid-epoch.

    Being a `DistributedSampler`, Lightning neither replaces it under DDP nor forgets to call `set_epoch`.

    Args:
        dataset (`Dataset`): the map-style dataset.
        num_replicas (`int`, defaults to 1): world size W.
        rank (`int`, defaults to 0): this process's rank r.
        shuffle (`bool`, defaults to `True`): permute every epoch (else the natural order).
        seed (`int`, defaults to 0): seed of the permutations.
        drop_last (`bool`, defaults to `True`): drop the tail so that every rank gets the same number of indices (else
            pad by repeating).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0  # a resume offset applies to one epoch only
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A `DataLoader` whose epoch order is a seeded permutation per rank and which resumes mid-epoch.

    Lightning saves `state_dict()` in the checkpoint (`loops.fit_loop.combined_loader`) and calls
    `load_state_dict` on resume before iterating; the next epoch then skips the batches already trained.
    Batches are counted as they are handed to the training loop (not as workers prefetch them).

    Args:
        dataset (`Dataset`): the map-style dataset.
        batch_size (`int`, defaults to 1): samples per batch (per rank).
        shuffle (`bool`, defaults to `True`): permute every epoch.
        seed (`int`, *optional*): seed of the permutations; default: `seed_everything`'s seed (PL_GLOBAL_SEED), else 0.
        drop_last (`bool`, defaults to `True`): drop incomplete batches and the tail that does not split evenly across
            ranks.
        num_replicas (`int`, *optional*): world size; default: the initialised process group's, else 1.
        rank (`int`, *optional*): this process's rank; default: the process group's, else 0.
        **kwargs: other `DataLoader` arguments (`num_workers`, `collate_fn`, ...), not `sampler`. `pin_memory`
            defaults to whether CUDA is available: batches then leave page-locked memory, and Lightning's
            copies to the GPU are non-blocking.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int | None = None,
        drop_last: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        **kwargs: Any,
    ) -> None:
        if "sampler" in kwargs or "batch_sampler" in kwargs:
            raise ValueError("`ResumableDataLoader` builds its own sampler; do not pass `sampler` or `batch_sampler`.")
        group_rank, group_size = distributed_rank()
        rank = group_rank if rank is None else rank
        num_replicas = group_size if num_replicas is None else num_replicas
        seed = default_seed() if seed is None else seed
        sampler = ResumableSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        kwargs.setdefault("pin_memory", torch.cuda.is_available())
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **kwargs)
        self._epoch = 0
        self._batches = 0
        self._resume: dict | None = None

    def __iter__(self) -> Iterator:
        # A generator: the body runs at the first `next`, after Lightning has called `set_epoch`.
        epoch = self.sampler.epoch
        skip = 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            skip = self._resume["batches"]
        self._resume = None
        self.sampler.start = skip * self.batch_size
        self._epoch, self._batches = epoch, skip
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where the current epoch stands: its number, the batches yielded, and the order's seed and world size."""
        return {
            "epoch": self._epoch,
            "batches": self._batches,
            "seed": self.sampler.seed,
            "num_replicas": self.sampler.num_replicas,
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Makes the next iteration of epoch `state_dict["epoch"]` skip the batches already yielded."""
        if state_dict["seed"] != self.sampler.seed or state_dict["num_replicas"] != self.sampler.num_replicas:
            rank_zero_warn(
                f"Resuming a data order of seed {state_dict['seed']} on {state_dict['num_replicas']} processes with seed "
                f"{self.sampler.seed} on {self.sampler.num_replicas}: the epoch continues, but not with the same batches."
            )
        self._resume = dict(state_dict)
