"""Writing a directory so that a reader never sees it half-written, not even after a power cut; reading one back
with errors that name the setting it came from."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Callable
from typing import BinaryIO

from huggingface_hub import PyTorchModelHubMixin
from safetensors import SafetensorError

# The card `save_pretrained` writes beside the weights. The hub mixin's default asks for code, paper and docs links
# ("[More Information Needed]"); a saved model of this project says what the folder holds and where its recipe is.
MODEL_CARD = """
---
{{ card_data }}
---

Saved by plugguide's `save_pretrained`: config.json names the architecture and its arguments, model.safetensors holds
the weights; `from_pretrained` on this folder rebuilds the model. The run that wrote it keeps its full recipe in
`config.yaml` of its run folder (`runs/<job>/version_N/`). Licence: Apache-2.0, as plugguide.
"""


class HubModelMixin(PyTorchModelHubMixin, model_card_template=MODEL_CARD, license="apache-2.0", tags=["plugguide"]):
    """`huggingface_hub.PyTorchModelHubMixin` (config.json + model.safetensors, loadable from a folder or the hub) that
    loads without printing (the hub's own mixin prints "Loading weights from local directory" on every local load) and
    writes a model card of its own (`MODEL_CARD`) instead of the mixin's placeholder links."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        with contextlib.redirect_stdout(io.StringIO()):
            return super().from_pretrained(*args, **kwargs)


def fsync_directory(path: str) -> None:
    """Flushes a directory's entries (the names created or renamed in it) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(directory: str) -> None:
    """Flushes every file under `directory`, and the directories themselves, to disk.

    A rename reaches the disk independently of the renamed files' contents: without this, a crash shortly after
    the rename can leave empty or partial files under the final name.
    """
    for root, _, files in os.walk(directory):
        for name in files:
            descriptor = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        fsync_directory(root)


def save_atomically(directory: str, save: Callable[[str], object]) -> None:
    """Calls `save(tmp)` on a sibling temporary directory, flushes it to disk, then renames it to `directory`.

    If `save` fails (a full disk, an interrupt), the temporary directory is removed; one left by a killed process
    is named `<directory>.tmp-*`, so its owner can find and remove it.
    """
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        save(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(directory):
        old = f"{directory}.old-{uuid.uuid4().hex[:8]}"
        os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old)
    else:
        os.rename(tmp, directory)
    fsync_directory(parent)


def write_file_atomically(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Calls `write(file)` on a temporary file beside `path`, flushes it to disk, then renames it to `path`.

    The temporary file sits in the same folder, so the rename is atomic (never a copy across file systems): a
    reader sees the old file or the whole new one. If `write` fails (a full disk, an interrupt) the temporary file
    is removed and the old file is left as it was; one left by a killed process is named `<path>.tmp-*`.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_directory(parent)


def read_saved_config(directory: str, name: str, setting: str, written_by: str) -> dict:
    """The JSON config `name` of a saved folder, or an error naming `setting`, the folder and what should have written it.

    Args:
        directory (`str`): the saved folder.
        name (`str`): its config file, e.g. "config.json".
        setting (`str`): the setting that named the folder, for the error.
        written_by (`str`): the method that writes such folders, for the error.
    """
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"`{setting}`={directory!r} holds no {name}; expected a directory written by `{written_by}`."
        )
    with open(path) as file:
        return json.load(file)


def load_saved(model_class, path: str, setting: str, what: str, embedded: str | None = None, **model_kwargs):
    """`model_class.from_pretrained(path, strict=True, **model_kwargs)`; a missing folder or a damaged, truncated or
    foreign file fails naming `setting`, what belongs there (`what`) and where the embedded ones are (`embedded`, if
    any).

    `model_kwargs` reach the constructor beside the saved config (`PyTorchModelHubMixin.from_pretrained`): what a
    config cannot hold, such as the frozen UNet a guide is built on.
    """
    if not os.path.isfile(os.path.join(path, "config.json")):
        where = f" (the embedded ones are {embedded})" if embedded else ""
        raise FileNotFoundError(
            f"`{setting}`={path!r} is not a saved {what}: expected a directory with config.json and model.safetensors "
            f"written by `{model_class.__name__}.save_pretrained`{where}."
        )
    try:
        return model_class.from_pretrained(path, strict=True, **model_kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise OSError(
            f"`{setting}`={path!r} could not be loaded: its config.json or model.safetensors is damaged, truncated or "
            f"of another model ({type(error).__name__}: {error})."
        ) from error
