"""Writing a directory so that a reader never sees it half-written."""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Callable


def save_atomically(directory: str, save: Callable[[str], object]) -> None:
    """Calls `save(tmp)` on a sibling temporary directory, then renames it to `directory`."""
    directory = os.path.abspath(directory)
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
    save(tmp)
    if os.path.isdir(directory):
        old = f"{directory}.old-{uuid.uuid4().hex[:8]}"
        os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old)
    else:
        os.rename(tmp, directory)
