"""A checkpoint gives weights; the settings are the run's: where the two differ, say so, and refuse weights that do not fit."""

from __future__ import annotations

import glob
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info


def checkpoint_file(ckpt_path: str | None, trainer: L.Trainer) -> str | None:
    """The file `ckpt_path` names: itself, or for "last" the newest `last*.ckpt` of the trainer's `ModelCheckpoint`
    folders (as Lightning resolves it); None when there is none yet or the name is another keyword ("best", ...)."""
    if not ckpt_path:
        return None
    if os.path.isfile(ckpt_path):
        return ckpt_path
    if ckpt_path != "last":
        return None
    folders = [callback.dirpath for callback in trainer.checkpoint_callbacks if isinstance(callback, ModelCheckpoint) and callback.dirpath]
    candidates = [path for folder in folders for path in glob.glob(os.path.join(glob.escape(folder), f"*{ModelCheckpoint.CHECKPOINT_NAME_LAST}*{ModelCheckpoint.FILE_EXTENSION}"))]
    return max(candidates, key=os.path.getmtime) if candidates else None


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
    misfits = [key for key, value in stored.items() if key not in expected or tuple(expected[key].shape) != tuple(value.shape)]
    if model.strict_loading:
        misfits += [key for key in expected if key not in stored]
    return misfits


def check_checkpoint_settings(path: str, model: L.LightningModule) -> None:
    """Says which model settings of the checkpoint at `path` differ from this run's (the run's are used), and
    refuses, naming them, when its weights cannot be loaded into this model."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    saved, used = flat(checkpoint.get("hyper_parameters", {})), flat(dict(model.hparams))
    differing = sorted(key for key in saved.keys() | used.keys() if saved.get(key, "<unset>") != used.get(key, "<unset>"))
    if not differing:
        return
    was = ", ".join(f"{key}={saved.get(key, '<unset>')!r}" for key in differing)
    now = ", ".join(f"{key}={used.get(key, '<unset>')!r}" for key in differing)
    misfits = weights_that_do_not_fit(model, checkpoint.get("state_dict", {}))
    if misfits:
        raise ValueError(
            f"`ckpt_path`={path!r} holds weights of a model saved with {was}, which do not fit this run's {now} "
            f"({len(misfits)} weights differ, e.g. {misfits[0]!r}): run with the checkpoint's settings, or give a checkpoint made with these."
        )
    rank_zero_info(f"Checkpoint {path} was saved with model settings {was}; this run uses {now} (the checkpoint gives the weights only).")
