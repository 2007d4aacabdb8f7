"""Checkpoints whole or absent: written to a temporary name beside the target, then renamed; never loaded damaged."""

from __future__ import annotations

import os
import zipfile
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from plugguide.models import write_file_atomically

#: The checkpoint entry naming the LightningModule class (the job) that wrote it.
JOB_KEY = "plugguide_job"


def job_name(module_class: type) -> str:
    """A job's class as its module path and name, e.g. `plugguide.modules.guided_sampling.GuidedSampling`."""
    return f"{module_class.__module__}.{module_class.__qualname__}"


def checkpoint_damage(path: str) -> str | None:
    """Why the checkpoint file at `path` cannot be read whole, or None when it is intact.

    `torch.save` writes a zip archive whose central directory, the list of every entry with its offset and size,
    sits at the very end of the file. A copy cut short (a full disk, a killed job, Lightning staging a checkpoint
    in the temporary folder and copying it across file systems) loses that end, and an entry that reaches past
    the end of the file is cut too. Checking both reads the directory only (a few kB, not the weights), so it
    costs the same for a 1 kB and a 10 GB checkpoint and needs no sidecar file: it also judges checkpoints
    written before `AtomicCheckpointIO` or by another program. It does not detect flipped bits inside an entry
    (torch.load does not either); those are no failure mode of writing, which is what this guards.

    Args:
        path (str): the checkpoint file.
    """
    try:
        size = os.path.getsize(path)
    except OSError as error:
        return str(error)
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (OSError, zipfile.BadZipFile) as error:
        return f"no whole zip archive in its {size:,} bytes ({error}): truncated, or not a checkpoint"
    if not entries:
        return "an empty archive"
    cut = [entry.filename for entry in entries if entry.header_offset + entry.compress_size > size]
    if cut:
        return f"entry {cut[0]!r} reaches past the end of the file ({size:,} bytes): truncated"
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO`, writing each checkpoint to a temporary name in its own folder, flushed to
    disk (fsync) and then renamed over the target, and recording the job that wrote it.

    Lightning's own save stages a local file through fsspec's transaction in the system's temporary folder and
    moves it into place; across file systems that move is a plain copy, so a full disk leaves a truncated
    `last.ckpt` that the next `--ckpt_path last` tries to load. A rename within one folder is atomic: the
    previous checkpoint stays whole until the new one is complete on disk. Remote paths (`s3://`, ...) keep
    Lightning's save.

    Args:
        job (str | None, default None): the class path of the LightningModule being trained (`job_name`), stored
            in every checkpoint under `JOB_KEY` so that another job's checkpoint can be named as such.
    """

    def __init__(self, job: str | None = None) -> None:
        super().__init__()
        self.job = job

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if self.job is not None:
            checkpoint = {**checkpoint, JOB_KEY: self.job}
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_file_atomically(str(path), lambda file: torch.save(checkpoint, file))

    def load_checkpoint(
        self, path, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Refuses a damaged local checkpoint naming the file, before torch fails on it with a bare zip error."""
        if get_filesystem(path).exists(path) and "://" not in str(path):
            damage = checkpoint_damage(str(path))
            if damage is not None:
                raise ValueError(f"`ckpt_path`={str(path)!r} is damaged ({damage}); give an intact checkpoint.")
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
