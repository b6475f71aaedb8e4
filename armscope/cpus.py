"""How many CPUs this process may run on.

Why not ``os.cpu_count()``: it counts the machine's CPUs, not the ones this
process is allowed on. A bridge or daemon pinned to a few cores (systemd's
``CPUAffinity=``, ``taskset``, a Jetson set-up that keeps the camera's cores
free) would otherwise start a thread per machine CPU on the few it has, and
the threads would queue behind each other. (A container's CPU quota, as
opposed to its CPU set, is not seen here.)"""
from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs in this process's affinity mask (all of them where the OS has no such mask)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)
