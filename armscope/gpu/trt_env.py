"""The one place that imports TensorRT and knows its versions, and finds the GPU.

Why one place: the build (``armscope.calibration.trt_build``), the backend
(``armscope.edge.backends.tensorrt_backend``) and ``--backend auto`` all need the
same answers (is TensorRT importable, which major version, which GPU), and
TensorRT wants one logger per process: builders and runtimes created with
different ``ILogger`` objects make it warn, and its messages must go to
armscope's log, not straight to the terminal.

Versions: TensorRT 10 (JetPack 6.x, and x86 wheels) builds weakly typed
networks with FP16/INT8 builder flags and still has implicit INT8
calibration; TensorRT 11 removed weak typing and implicit INT8 (every
network strongly typed: the precision comes from the ONNX). Both run
engines the same way (``execute_async_v3``, named tensors). Older majors
lack the named-tensor API this code uses and are refused by name.
"""
from __future__ import annotations

import logging
import subprocess
import threading
from pathlib import Path

from armscope.core.errors import ArmscopeError, require_module

log = logging.getLogger(__name__)

MIN_MAJOR = 10  # JetPack 6.1 and later ship TensorRT 10.3 (6.0: 8.6); the backend uses named-tensor execute_async_v3
STRONGLY_TYPED_FROM = 11  # TensorRT 11: weak typing and implicit INT8 removed

# JetPack installs TensorRT's Python module system-wide (apt), and pip has no Jetson wheels for it
JETSON_TENSORRT = ("on a Jetson it comes with JetPack (apt package python3-libnvinfer): "
                   "make the venv with --system-site-packages")


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # ImportError, or a broken install raising OSError on its .so
        return False
    return True


def require_tensorrt(purpose: str):
    """The ``tensorrt`` module, or one clear error: not installed (how to get it),
    or a version this code does not drive."""
    trt = require_module("tensorrt", "gpu", purpose, JETSON_TENSORRT)
    if trt_major(trt.__version__) < MIN_MAJOR:
        raise ArmscopeError(f"{purpose} needs TensorRT >= {MIN_MAJOR} (JetPack 6.1 or newer); this is TensorRT "
                           f"{trt.__version__}")
    return trt


def trt_major(version: str) -> int:
    return int(version.split(".")[0])


def strongly_typed_only(version: str) -> bool:
    """TensorRT >= 11: every network is strongly typed; no FP16/INT8 builder flags, no implicit INT8."""
    return trt_major(version) >= STRONGLY_TYPED_FROM


# ----------------------------------------------------------------------------- the one logger

_LOGGER = None
_LOGGER_LOCK = threading.Lock()


def trt_logger():
    """The process's one ``trt.ILogger``: TensorRT's warnings and errors into armscope's log
    (logger ``armscope.gpu.trt_env``), for every builder, parser and runtime.

    TensorRT's C++ API: "multiple instances of IRuntime and/or IBuilder must all use the
    same logger" (nvinfer1::ILogger); the subclassing pattern (call ``trt.ILogger.__init__``
    explicitly) is the Python API's ILogger page
    (docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Logger.html)."""
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:
            trt = require_tensorrt("TensorRT logging")

            class _Logger(trt.ILogger):
                def __init__(self):
                    trt.ILogger.__init__(self)

                def log(self, severity, msg):
                    if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                        log.error("TensorRT: %s", msg)
                    elif severity == trt.ILogger.WARNING:
                        log.warning("TensorRT: %s", msg)
                    else:
                        log.debug("TensorRT: %s", msg)

            _LOGGER = _Logger()
        return _LOGGER


# ----------------------------------------------------------------------------- the GPU

def import_cudart():
    """cuda-python's runtime module, under its current name or (cuda-python < 12.6) its old one."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    return cudart


def gpu_info() -> dict | None:
    """{'name', 'compute_capability'} of GPU 0, or None without one (cuda-python,
    then pycuda, then nvidia-smi)."""
    try:
        cudart = import_cudart()
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count < 1:
            return None
        err, prop = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
            return {"name": name.strip("\x00 "), "compute_capability": f"{prop.major}.{prop.minor}"}
    except Exception:
        pass
    try:
        import pycuda.driver as driver

        driver.init()
        if driver.Device.count() < 1:
            return None
        device = driver.Device(0)
        major, minor = device.compute_capability()
        return {"name": device.name(), "compute_capability": f"{major}.{minor}"}
    except Exception:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            name, cap = [s.strip() for s in out.stdout.strip().splitlines()[0].split(",")]
            return {"name": name, "compute_capability": cap}
    except Exception:
        pass
    return None


def is_jetson(root: Path = Path("/")) -> bool:
    """An NVIDIA Jetson (L4T): ``/etc/nv_tegra_release``, or a Tegra device tree. Where
    ``gpu_info`` finds nothing on one (no cuda-python or pycuda, no nvidia-smi on older
    JetPacks), ``--backend auto`` still warns that it runs on the CPU."""
    if (root / "etc" / "nv_tegra_release").is_file():
        return True
    try:
        return b"nvidia,tegra" in (root / "proc" / "device-tree" / "compatible").read_bytes()
    except OSError:
        return False
