"""A benchmark process's own peak RSS."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux keeps that across execve, and
    Python starts children with vfork, so a child's ru_maxrss would be its parent's peak (a
    pytest worker's 3.8 GB read as a full-size detect's)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
