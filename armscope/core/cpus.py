"""How many CPUs this process may run on, and what they are.

Why not ``os.cpu_count()``: it counts the machine's CPUs, not the ones this
process is allowed on. A bridge or daemon pinned to a few cores (systemd's
``CPUAffinity=``, ``taskset``, a Jetson set-up that keeps the camera's cores
free) would otherwise start a thread per machine CPU on the few it has, and
the threads would queue behind each other. The same goes for a CPU *quota*
(``docker run --cpus=2``, systemd's ``CPUQuota=200%``): the kernel lets the
process run on every core but throttles it to the quota each period, so
sixteen threads under a two-CPU quota run in bursts and stall. A quota is
read from the process's own cgroup and its ancestors (v2 ``cpu.max``, v1
``cpu.cfs_quota_us``/``cpu.cfs_period_us``), which covers containers (their
cgroup is the mount's root) and systemd services (a cgroup deeper in the
tree), where libraries that read only the mount root's file miss the latter."""
from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask (all CPUs where the OS has
    no such mask), lowered to its cgroup CPU quota rounded up."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def cgroup_cpu_quota(root: "str | os.PathLike" = "/sys/fs/cgroup",
                     proc_cgroup: "str | os.PathLike" = "/proc/self/cgroup") -> float | None:
    """The tightest CPU quota (in CPUs, e.g. 1.5) on this process's cgroup or
    any ancestor, or None when there is none (or no cgroup file system).

    ``/proc/self/cgroup`` names the cgroup (v2: ``0::/system.slice/x.service``;
    v1: ``N:cpu,cpuacct:/docker/ID``). Directories that do not exist under the
    mount are skipped: a container without its own cgroup namespace sees the
    host's path but has only its own cgroup mounted, as the mount's root."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    root = Path(root)
    v2_path = v1_path = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_path = parts[2]
        elif "cpu" in parts[1].split(","):
            v1_path = parts[2]
    if v1_path is not None:
        mount = next((root / name for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu") if (root / name).is_dir()), None)
        if mount is not None:
            return _tightest(mount, v1_path, _v1_quota)
    if v2_path is not None and (root / "cgroup.controllers").is_file():
        return _tightest(root, v2_path, _v2_quota)
    return None


def _tightest(mount: Path, cgroup: str, read) -> float | None:
    """The smallest quota from ``mount/cgroup`` up to ``mount``."""
    rel = Path(cgroup.strip().lstrip("/"))
    dirs = [mount / rel] + [mount / p for p in rel.parents]
    quotas = [q for d in dirs if d.is_dir() and (q := read(d)) is not None]
    return min(quotas) if quotas else None


def _v2_quota(d: Path) -> float | None:
    try:
        quota, period = (d / "cpu.max").read_text().split()[:2]
        return int(quota) / int(period) if quota != "max" and int(period) > 0 and int(quota) > 0 else None
    except (OSError, ValueError):
        return None


def _v1_quota(d: Path) -> float | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None  # -1: no quota


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
