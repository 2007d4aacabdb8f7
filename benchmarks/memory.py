"""Peak resident memory of this process, shared by the benchmarks that report memory on CPU."""

from __future__ import annotations

import resource


def peak_rss() -> float:
    """Peak resident memory of this process in MiB: Linux's VmHWM (`ru_maxrss` survives exec, so a spawned process would
    report its parent's peak), else `ru_maxrss`."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
