"""What the bench reads of a process from ``/proc``: CPU time and resident memory.

The server's cost is measured from the outside, the way ``top`` sees it: user +
system CPU of the whole process (every thread: the event loop, SQLite's writer
thread, the argon2 workers) from ``/proc/<pid>/stat``, and its resident set
from ``/proc/<pid>/status``. Linux only; elsewhere the figures are missing.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class ProcSample:
    """One reading of a process: CPU seconds so far and memory now."""

    cpu_s: float
    """User + system CPU seconds since the process started (all threads)."""
    rss_kib: int
    """Resident set size now (VmRSS)."""
    hwm_kib: int
    """Peak resident set size so far (VmHWM)."""


def read_proc(pid: int) -> ProcSample | None:
    """Sample ``pid``; ``None`` when it is gone or ``/proc`` is not there."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; fields count from after its ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    rss = hwm = 0
    for line in status.splitlines():
        if line.startswith(b"VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith(b"VmHWM:"):
            hwm = int(line.split()[1])
    return ProcSample((utime + stime) / _TICK, rss, hwm)


def raise_nofile_limit(wanted: int) -> int:
    """Raise this process's open-file limit towards ``wanted`` (up to the hard limit).

    Child processes (the self-started server, the load generators) inherit it.
    Returns the soft limit in force afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target
