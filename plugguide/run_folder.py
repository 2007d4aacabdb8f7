"""Where a run writes: `<default_root_dir>/version_N/`, a new N for a new run, the checkpoint's N for a resumed one."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

VERSION = re.compile(r"version_(\d+)")
LAST = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"


@dataclass(frozen=True)
class RunFolder:
    """The version folder a run writes into and the checkpoint it starts from.

    Attributes:
        root: `trainer.default_root_dir`, the job's folder (`runs/ppap`).
        version: N of `<root>/version_N`; None: a new run, numbered by the logger (the next free N).
        checkpoint: the checkpoint file the run loads; None: none (a new run, or a keyword Lightning resolves).
    """

    root: str
    version: int | None = None
    checkpoint: str | None = None

    @property
    def path(self) -> str | None:
        return None if self.version is None else os.path.join(self.root, f"version_{self.version}")


def versions(root: str) -> list[int]:
    """The N of every `<root>/version_N` folder, highest first."""
    if not os.path.isdir(root):
        return []
    found = [VERSION.fullmatch(name) for name in os.listdir(root)]
    return sorted(
        (int(match.group(1)) for match in found if match and os.path.isdir(os.path.join(root, match.group(0)))),
        reverse=True,
    )


def next_version(root: str) -> int:
    """The N of a new run's `<root>/version_N`: one above the highest there, as TensorBoard's logger numbers them."""
    return max(versions(root), default=-1) + 1


def newest_last_checkpoint(root: str) -> tuple[int, str] | None:
    """(N, path) of `<root>/version_N/checkpoints/last.ckpt` for the highest N that has one."""
    for version in versions(root):
        path = os.path.join(root, f"version_{version}", "checkpoints", LAST)
        if os.path.isfile(path):
            return version, path
    return None


def best_checkpoint(last: str) -> str | None:
    """The best checkpoint the `ModelCheckpoint` saving `last` recorded (it monitors a metric), if it still exists."""
    callbacks = torch.load(last, map_location="cpu", weights_only=True).get("callbacks", {})
    paths = [
        state.get("best_model_path") for key, state in callbacks.items() if str(key).startswith("ModelCheckpoint")
    ]
    return next((path for path in paths if path and os.path.isfile(path)), None)


def version_of(path: str, root: str) -> int | None:
    """N when `path` lies inside `<root>/version_N/`, else None."""
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root)).split(os.sep)
    match = VERSION.fullmatch(relative[0]) if relative[0] != os.pardir else None
    return int(match.group(1)) if match else None


def resolve_run_folder(root: str, ckpt_path: str | None) -> RunFolder:
    """The run folder and checkpoint of a command with `trainer.default_root_dir`=`root` and `--ckpt_path`=`ckpt_path`.

    - no `ckpt_path`: a new version folder, from step 0 (a crashed run's folder is left as it was);
    - "last": the newest version's `checkpoints/last.ckpt`, and the run keeps writing into that version folder;
    - "best": the best checkpoint that this last checkpoint recorded (jobs whose `ModelCheckpoint` monitors a metric);
    - a file inside `<root>/version_N/`: that file, writing into version N; any other file: a new version folder.

    "last" or "best" with nothing to load gives a new run without a checkpoint; the job says whether it needs one.
    Other keywords ("hpc", "registry") are left to Lightning.

    Args:
        root (str): the job's folder, `trainer.default_root_dir`.
        ckpt_path (str | None): the command's `--ckpt_path`.
    """
    if not ckpt_path:
        return RunFolder(root)
    if ckpt_path in ("last", "best"):
        found = newest_last_checkpoint(root)
        if found is None:
            return RunFolder(root)
        version, last = found
        return RunFolder(root, version, last if ckpt_path == "last" else best_checkpoint(last))
    if os.path.isfile(ckpt_path):
        return RunFolder(root, version_of(ckpt_path, root), ckpt_path)
    return RunFolder(root, None, ckpt_path)
