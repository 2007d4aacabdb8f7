"""Checkpoints whole or absent: written to a temporary name beside the target, then renamed; never loaded damaged."""

from __future__ import annotations

import math
import os
import shutil
import zipfile
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.serialization import config as serialization_config

from plugguide.models import write_file_atomically

#: The checkpoint entry naming the LightningModule class (the job) that wrote it.
JOB_KEY = "plugguide_job"
#: Bytes read at a time when a checkpoint's entries are hashed.
CHUNK_BYTES = 1 << 24


def job_name(module_class: type) -> str:
    """A job's class as its module path and name, e.g. `plugguide.modules.guided_sampling.GuidedSampling`."""
    return f"{module_class.__module__}.{module_class.__qualname__}"


def checkpoint_damage(path: str) -> str | None:
    """Why the checkpoint file at `path` cannot be read whole and as written, or None when it is intact.

    `torch.save` writes a zip archive whose central directory, the list of every entry with its offset, size and
    CRC-32 checksum, sits at the very end of the file. A copy cut short (a full disk, a killed job, Lightning staging a
    checkpoint in the temporary folder and copying it across file systems) loses that end, or leaves an entry that
    reaches past it. Bytes changed inside an entry (a flipped disk block, a bad copy) keep the size and the
    directory, and `torch.load` reads them without a word; each entry's bytes are therefore hashed, in chunks, and
    compared with the CRC-32 the directory holds for it.

    The checksum is the one inside the file, not a sidecar: torch computes it while writing (no second pass over a
    GB checkpoint), it travels with every copy or rename of the file and cannot be orphaned by Lightning removing an
    old top-k checkpoint, and it also covers checkpoints written before this check, by Lightning's own save or by
    another program. CRC-32 misses a random corruption with probability 2^-32 per entry: it guards against accidents,
    which is what it is for, not against deliberate edits. The cost is one read of the file at disk speed, paid only
    when a checkpoint is about to be loaded. Entries written with torch's `compute_crc32` off carry a checksum of 0
    and are not hashed (`checkpoint_without_checksums` says so).

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
            if not entries:
                return "an empty archive"
            cut = [entry.filename for entry in entries if entry.header_offset + entry.compress_size > size]
            if cut:
                return f"entry {cut[0]!r} reaches past the end of the file ({size:,} bytes): truncated"
            for entry in entries:
                if entry.CRC == 0:  # empty, or written without a checksum
                    continue
                try:
                    with archive.open(entry) as data:  # zipfile compares the CRC-32 once the entry is read
                        while data.read(CHUNK_BYTES):
                            pass
                except (zipfile.BadZipFile, EOFError) as error:
                    return f"entry {entry.filename!r} is not as written ({error}): changed bytes"
    except (OSError, zipfile.BadZipFile) as error:
        return f"no whole zip archive in its {size:,} bytes ({error}): truncated, or not a checkpoint"
    return None


def checkpoint_without_checksums(path: str) -> bool:
    """Whether no entry of the (intact) checkpoint at `path` that holds bytes has a CRC-32 (torch's `compute_crc32`
    off when it was written): `checkpoint_damage` could check its structure only."""
    with zipfile.ZipFile(path) as archive:
        return all(entry.CRC == 0 for entry in archive.infolist() if entry.file_size > 0)


def checkpoint_bytes(checkpoint: Any) -> int:
    """Bytes `torch.save` writes for the tensors of `checkpoint` (nested dicts, lists, tuples): each storage once, whole."""
    storages, pending = {}, [checkpoint]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[(storage.data_ptr(), storage.device)] = storage.nbytes()
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return sum(storages.values())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO`, writing each checkpoint to a temporary name in its own folder, flushed to
    disk (fsync) and then renamed over the target, with the CRC-32 of every entry, and recording the job that wrote
    it; loading only what `checkpoint_damage` finds intact.

    Lightning's own save stages a local file through fsspec's transaction in the system's temporary folder and
    moves it into place; across file systems that move is a plain copy, so a full disk leaves a truncated
    `last.ckpt` that the next `--ckpt_path last` tries to load. A rename within one folder is atomic: the
    previous checkpoint stays whole until the new one is complete on disk. A failed write (a full disk) is reported
    with what the checkpoint takes and the folder's free space, not as torch's serializer traceback. Torch computes
    the checksums unless its `compute_crc32` is switched off; here they are always on. Remote paths (`s3://`, ...)
    keep Lightning's save.

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
        try:
            with serialization_config.patch({"save.compute_crc32": True}):  # the checksums `checkpoint_damage` reads
                write_file_atomically(str(path), lambda file: torch.save(checkpoint, file))
        except OSError as error:
            raise OSError(error.errno, self.write_error(error, str(path), checkpoint)) from error

    @staticmethod
    def write_error(error: OSError, path: str, checkpoint: dict[str, Any]) -> str:
        """What failed (a full disk, a read-only folder), the checkpoint's size and the folder's free space, and the
        settings that move checkpoints elsewhere."""
        folder = os.path.dirname(os.path.abspath(path))
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:,.1f} MiB free"
        except OSError:
            free = "no free space it can report"
        return (
            f"Could not write the checkpoint {path!r} ({error.strerror or error}): it takes about "
            f"{math.ceil(checkpoint_bytes(checkpoint) / 2**20 * 10) / 10:,.1f} MiB and {folder} has {free}. Free "
            "space there, or write checkpoints elsewhere (`trainer.default_root_dir`, or the `dirpath` of the "
            "ModelCheckpoint callback); the checkpoints already written there are whole."
        )

    def load_checkpoint(
        self, path, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Refuses a damaged local checkpoint naming the file, before torch fails on it with a bare zip error or
        loads changed weights; one without checksums (torch's `compute_crc32` off) is loaded with a warning."""
        if get_filesystem(path).exists(path) and "://" not in str(path):
            damage = checkpoint_damage(str(path))
            if damage is not None:
                raise ValueError(f"`ckpt_path`={str(path)!r} is damaged ({damage}); give an intact checkpoint.")
            if checkpoint_without_checksums(str(path)):
                rank_zero_warn(
                    f"`ckpt_path`={str(path)!r} holds no CRC-32 checksums (written with torch's `compute_crc32` "
                    "off): its size and layout are intact, but changed bytes inside it could not be detected."
                )
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
