"""What machine a figure belongs to: CPU model and features, cores, GPU and
driver, runtime versions, load. Every suite JSON carries it, and the
BENCHMARKS.md tables name it, because figures from different machines (or the
same one under load) are not comparable."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata

from armscope.core.cpus import cpu_name, usable_cpus
from armscope.edge.backends.cpu_features import cpu_flags

# the /proc/cpuinfo flags that decide which paths and precisions a CPU has
RELEVANT_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                  "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "bf16", "i8mm", "sve")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def tensorrt_version() -> str | None:
    """TensorRT's version without importing it where it is not installed
    (JetPack installs it outside pip: the module, not the distribution, may be all there is)."""
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_lean"):
        if v := _version(dist):
            return v
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt

        return tensorrt.__version__
    except Exception as exc:   # a broken install is a finding, not a crash
        return f"unimportable ({type(exc).__name__})"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe(board: dict | None = None) -> dict:
    """The machine, now. ``board``: ``sampling.board_state()`` (GPU, Jetson power mode)."""
    flags = cpu_flags()
    gpu = (board or {}).get("gpu")
    driver = None
    if gpu is not None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            driver = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            pass
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(), "arch": platform.machine(), "logical_cpus": os.cpu_count(), "usable_cpus": usable_cpus(),
        "cpu_flags": [f for f in RELEVANT_FLAGS if f in flags],
        "gpu": gpu["name"] if gpu else None, "gpu_compute_capability": gpu.get("compute_capability") if gpu else None,
        "driver": driver, "board": (board or {}).get("kind", "none"),
        "versions": {"python": platform.python_version(), "onnxruntime": _version("onnxruntime"),
                     "openvino": _version("openvino"), "tensorrt": tensorrt_version(), "numpy": _version("numpy"),
                     "opencv": _version("opencv-python-headless") or _version("opencv-python"),
                     "pyzmq": _version("pyzmq"), "tensorflow": _version("tensorflow")},
        "commit": git_commit(), "load_average_start": load_average(),
    }
