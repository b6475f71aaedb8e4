"""Thread counts follow the CPUs a process may use, not the machine's: a
bridge or daemon pinned to one core (systemd CPUAffinity=, taskset) must not
start a thread per machine CPU there."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from armscope.core import cpus

from repo_paths import REPO

PINNED = """
import json, os
os.sched_setaffinity(0, {next(iter(os.sched_getaffinity(0)))})
from armscope.core.bundle import load_bundle
from armscope.core.cpus import usable_cpus
from armscope.edge.backends.onnxruntime_backend import OnnxRuntimeBackend
from armscope.firmware_bridge.link import chunks as link
backend = OnnxRuntimeBackend(load_bundle("samples/demo_bundle"), layout="merged")
print(json.dumps({"usable": usable_cpus(), "machine": os.cpu_count(), "encoder_threads": link._ENCODER_THREADS,
                  "ort_threads": backend.threads}))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_a_process_pinned_to_one_cpu_uses_one_thread():
    out = subprocess.run([sys.executable, "-c", PINNED], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"usable": 1, "machine": os.cpu_count(), "encoder_threads": 1, "ort_threads": 1}


# --- CPU quotas (docker --cpus, systemd CPUQuota=): the kernel throttles, the affinity mask does not show it.


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_v2_quota_of_a_systemd_service_and_its_slice_tightest_wins(tmp_path):
    # the unified hierarchy as systemd lays it out: CPUQuota=150% on the service, 400% on its slice
    root = _tree(tmp_path / "cg", {
        "cgroup.controllers": "cpuset cpu io memory pids\n",
        "cpu.max": "max 100000\n",  # (the root has none in reality; "max" must read as no quota)
        "system.slice/cpu.max": "400000 100000\n",
        "system.slice/armscope.service/cpu.max": "150000 100000\n",
    })
    proc = _tree(tmp_path, {"proc_cgroup": "0::/system.slice/armscope.service\n"}) / "proc_cgroup"
    assert cpus.cgroup_cpu_quota(root, proc) == 1.5
    (root / "system.slice/cpu.max").write_text("50000 100000\n")
    assert cpus.cgroup_cpu_quota(root, proc) == 0.5
    for text in ("max 100000\n", "garbage\n", ""):
        (root / "system.slice/cpu.max").write_text(text)
        (root / "system.slice/armscope.service/cpu.max").write_text(text)
        assert cpus.cgroup_cpu_quota(root, proc) is None, text


def test_v1_quota_of_a_container_that_sees_the_hosts_path(tmp_path):
    # docker on cgroup v1 without a cgroup namespace: /proc/self/cgroup names /docker/ID, but
    # only the container's own cgroup is mounted, as the root of /sys/fs/cgroup/cpu
    root = _tree(tmp_path / "cg", {"cpu,cpuacct/cpu.cfs_quota_us": "200000\n",
                                   "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    proc = _tree(tmp_path, {"proc_cgroup": "12:pids:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n"}) / "proc_cgroup"
    assert cpus.cgroup_cpu_quota(root, proc) == 2.0
    (root / "cpu,cpuacct/cpu.cfs_quota_us").write_text("-1\n")  # v1's "no quota"
    assert cpus.cgroup_cpu_quota(root, proc) is None
    assert cpus.cgroup_cpu_quota(tmp_path / "nothing", proc) is None
    assert cpus.cgroup_cpu_quota(root, tmp_path / "no_proc_file") is None


QUOTA_CHILD = """
import json, sys
sys.stdin.readline()  # moved into the cgroup by now
from armscope.core.cpus import cgroup_cpu_quota, usable_cpus
from armscope.firmware_bridge.link import chunks as link
print(json.dumps({"quota": cgroup_cpu_quota(), "usable": usable_cpus(), "encoder_threads": link._ENCODER_THREADS}))
"""


def test_a_process_under_a_one_cpu_quota_uses_one_thread():
    """A real cgroup (v1 cpu controller, as on this project's machines) with a 1-CPU quota, and
    a process moved into it: skipped where cgroups cannot be created (not root, read-only mount)."""
    mount = Path("/sys/fs/cgroup/cpu")
    group = mount / f"armscope-test-{os.getpid()}"
    try:
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")
    except OSError as exc:
        if group.is_dir():
            group.rmdir()
        pytest.skip(f"cannot make a v1 cpu cgroup here: {exc}")
    child = subprocess.Popen([sys.executable, "-c", QUOTA_CHILD], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        (group / "cgroup.procs").write_text(str(child.pid))
        out, err = child.communicate("go\n", timeout=120)
        assert child.returncode == 0, err
        got = json.loads(out.strip().splitlines()[-1])
        assert got == {"quota": 1.0, "usable": 1, "encoder_threads": 1}
    finally:
        if child.poll() is None:  # a cgroup with a live process in it cannot be removed
            child.kill()
            child.wait()
        group.rmdir()
