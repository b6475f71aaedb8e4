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

REPO = Path(__file__).resolve().parents[1]

PINNED = """
import json, os
os.sched_setaffinity(0, {next(iter(os.sched_getaffinity(0)))})
from armscope.bundle import load_bundle
from armscope.cpus import usable_cpus
from edge.backends.onnxruntime_backend import OnnxRuntimeBackend
from firmware_bridge import link
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
