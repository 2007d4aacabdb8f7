"""Wall-time accounting shared by the benchmarks: wrap a method so every call adds its run time to a tally."""

from __future__ import annotations

import time
from typing import Callable


def timed(owner, name: str, tally: dict, slot: Callable[[], object]) -> None:
    """Replaces `owner.name` by the same callable that adds its run time to `tally[slot()]` (slot read at each call)."""
    function = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            tally[slot()] += time.perf_counter() - started

    setattr(owner, name, wrapper)
