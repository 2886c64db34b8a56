"""The process's resident memory in MiB: its peak (the console's progress line, the training-memory benchmark)
and its current size.

On Linux both come from /proc/self/status (``VmHWM``, ``VmRSS``). Not ``ru_maxrss``: Linux carries into it the
peak of the process image that ``exec`` replaced (e.g. a larger parent), so it can report more than this
process ever held. Elsewhere ``ru_maxrss`` is the best there is (bytes on macOS, KiB on other Unixes).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

MIB = 2**20


def proc_status_mib(field: str) -> Optional[float]:
    """A memory field of Linux's /proc/self/status (``VmRSS``, ``VmHWM``) in MiB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MIB
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process image's peak resident set size so far: ``VmHWM`` on Linux, else ``ru_maxrss``; NaN where
    neither exists (Windows)."""
    peak = proc_status_mib("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource  # Unix only
    except ImportError:
        return float("nan")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / MIB if sys.platform == "darwin" else maxrss * 1024 / MIB


def current_rss_mib() -> float:
    """This process's resident set size now (``VmRSS``; off Linux, its peak so far)."""
    current = proc_status_mib("VmRSS")
    return peak_rss_mib() if current is None else current
