"""Paths of what a run writes, under the run's own folder."""

from __future__ import annotations

import os

import lightning as L


def in_run_folder(trainer: L.Trainer, path: str) -> str:
    """`path` under the run's folder (`trainer.log_dir`: `<default_root_dir>/version_N`) when relative, as given
    when absolute.

    Call it on every process: `trainer.log_dir` broadcasts rank 0's folder, a collective under DDP.
    """
    if os.path.isabs(path):
        return path
    return os.path.join(trainer.log_dir or trainer.default_root_dir, path)
