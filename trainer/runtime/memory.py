"""Memory as finetrain reads and prints it: this process's peak resident memory, and bytes in
binary units."""

from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    """This process's peak resident memory: its own high-water mark (VmHWM) where /proc has it.
    `ru_maxrss` is the fallback only: a forked rank inherits its launcher's peak in it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def format_bytes(count: float) -> str:
    """`count` bytes in the largest binary unit it reaches (GiB, MiB, KiB), two decimals."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"
