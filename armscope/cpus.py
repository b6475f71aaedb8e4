"""How many CPUs this process may run on, and what they are.

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


def cpu_name() -> str:
    """The CPU's model as /proc/cpuinfo names it (x86 ``model name``; Arm
    boards such as Jetsons use ``Hardware`` or ``cpu model``), for naming the
    machine a benchmark figure belongs to."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
