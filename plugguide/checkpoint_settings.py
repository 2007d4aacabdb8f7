"""A checkpoint gives weights; the settings are the run's: where the two differ, say so, and refuse weights that do not fit."""

from __future__ import annotations

import glob
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from plugguide.atomic_checkpoint import JOB_KEY, checkpoint_damage, job_name


def checkpoint_file(ckpt_path: str | None, folders: list[str]) -> str | None:
    """The intact file `ckpt_path` names: itself, or for "last" the newest intact checkpoint of `folders` (the newest
    `last*.ckpt`, unless it is damaged); None when there is none yet or the name is another keyword ("best", ...).

    A damaged file (`checkpoint_damage`: truncated, or bytes that no longer match their checksum) is never returned:
    named explicitly it is refused, naming it and the intact checkpoints beside it; under "last" it is skipped with a
    message saying so.
    """
    if not ckpt_path:
        return None
    if os.path.isfile(ckpt_path):
        damage = checkpoint_damage(ckpt_path)
        if damage is not None:
            folder = os.path.dirname(os.path.abspath(ckpt_path))
            intact = [os.path.basename(path) for path in checkpoints_in(folder) if checkpoint_damage(path) is None]
            beside = f"; intact beside it: {', '.join(sorted(intact))}" if intact else ""
            raise ValueError(
                f"`ckpt_path`={ckpt_path!r} is damaged ({damage}){beside}. Give an intact checkpoint, or `last` for "
                "the newest intact one."
            )
        return ckpt_path
    if ckpt_path != "last":
        return None
    candidates = [path for folder in folders for path in checkpoints_in(folder)]
    last = [path for path in candidates if ModelCheckpoint.CHECKPOINT_NAME_LAST in os.path.basename(path)]
    if not last:
        return None
    newest_last = max(last, key=os.path.getmtime)
    damage = checkpoint_damage(newest_last)
    if damage is None:
        return newest_last
    # Newest first, stopping at the first intact one: judging a checkpoint reads it whole.
    damaged = [newest_last]
    for path in sorted(set(candidates) - {newest_last}, key=os.path.getmtime, reverse=True):
        if checkpoint_damage(path) is None:
            rank_zero_warn(
                f"`ckpt_path`='last': skipping damaged {', '.join(sorted(damaged))} ({damage}); "
                f"resuming from {path}, the newest intact checkpoint."
            )
            return path
        damaged.append(path)
    raise ValueError(
        f"`ckpt_path`='last': every checkpoint in {', '.join(map(repr, folders))} is damaged "
        f"({', '.join(sorted(map(os.path.basename, damaged)))}; {os.path.basename(newest_last)}: {damage}). "
        "Delete them to start afresh, or give an intact checkpoint."
    )


def checkpoints_in(folder: str) -> list[str]:
    """The checkpoint files (`*.ckpt`) of a folder."""
    return glob.glob(os.path.join(glob.escape(folder), f"*{ModelCheckpoint.FILE_EXTENSION}"))


def flat(settings: dict, prefix: str = "") -> dict:
    """Nested settings as `{"a.b": value}`, without the CLI's bookkeeping keys (`_class_path`, `_instantiator`)."""
    rows = {}
    for key, value in settings.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict):
            rows |= flat(value, f"{prefix}{key}.")
        else:
            rows[f"{prefix}{key}"] = value
    return rows


def weights_that_do_not_fit(model: L.LightningModule, state_dict: dict) -> list[str]:
    """Names of the checkpoint's weights the model lacks or holds in another shape, and of the model's weights it lacks."""
    # What Lightning would load: the module's own hook first adapts the checkpoint (FrozenNetworksModule adds back
    # the frozen networks it leaves out of checkpoints).
    probe = {"state_dict": dict(state_dict)}
    model.on_load_checkpoint(probe)
    stored, expected = probe["state_dict"], model.state_dict()
    misfits = [
        key for key, value in stored.items() if key not in expected or tuple(expected[key].shape) != tuple(value.shape)
    ]
    if model.strict_loading:
        misfits += [key for key in expected if key not in stored]
    return misfits


def check_checkpoint_settings(path: str, model: L.LightningModule) -> None:
    """Says which model settings of the checkpoint at `path` differ from this run's (the run's are used), and
    refuses, naming them, when its weights cannot be loaded into this model.

    A checkpoint of another job (its `JOB_KEY`, written by `AtomicCheckpointIO`) is refused naming the job that
    wrote it: listing the settings of two different jobs side by side says nothing useful.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    # The module's own hook reads what it saved in an earlier form (a setting's former unit) before the comparison.
    model.on_load_checkpoint(checkpoint)
    writer, this_job = checkpoint.get(JOB_KEY), job_name(type(model))
    misfits = None
    if writer is not None and writer != this_job:
        misfits = weights_that_do_not_fit(model, checkpoint.get("state_dict", {}))
        if misfits:
            raise ValueError(
                f"`ckpt_path`={path!r} was written by the job {writer}, not by this run's {this_job} "
                f"({len(misfits)} weights do not fit, e.g. {misfits[0]!r}): give a checkpoint of a "
                f"{type(model).__name__} run."
            )
    saved, used = flat(checkpoint.get("hyper_parameters", {})), flat(dict(model.hparams))
    differing = sorted(key for key in saved.keys() & used.keys() if saved[key] != used[key])
    only_saved, only_used = sorted(saved.keys() - used.keys()), sorted(used.keys() - saved.keys())
    if not (differing or only_saved or only_used):
        return
    was = ", ".join(f"{key}={saved[key]!r}" for key in differing) or "the same shared settings"
    now = ", ".join(f"{key}={used[key]!r}" for key in differing) or "the same"
    unshared = "".join(
        f"; {len(keys)} settings only {side} has ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        for keys, side in ((only_saved, "the checkpoint"), (only_used, "this run"))
        if keys
    )
    misfits = weights_that_do_not_fit(model, checkpoint.get("state_dict", {})) if misfits is None else misfits
    if misfits:
        written = f" (written by the job {writer})" if writer else ""
        raise ValueError(
            f"`ckpt_path`={path!r}{written} holds weights of a model saved with {was}, which do not fit this run's "
            f"{now}{unshared} ({len(misfits)} weights differ, e.g. {misfits[0]!r}): run with the checkpoint's "
            "settings, or give a checkpoint made with these."
        )
    rank_zero_info(
        f"Checkpoint {path} was saved with model settings {was}; this run uses {now}{unshared} "
        "(the checkpoint gives the weights only)."
    )
