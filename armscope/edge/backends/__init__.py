"""Backend selection at run time. Heavy backends are imported only when chosen."""
from __future__ import annotations

import logging

from armscope.core import front
from armscope.core.bundle import Bundle
from armscope.core.errors import ArmscopeError
from armscope.edge.backends.base import InferenceBackend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt")
CPU_PRECISIONS = ("f32", "bf16", "auto")  # OpenVINO inference precision (armscope/edge/backends/openvino_backend.py)


def gpu_choice(bundle: Bundle, layout: str = "members", feed: str = "float32"):
    """What ``auto`` does about the GPU: (engine set, why) to run TensorRT; or (None,
    why not, loud) to run on the CPU, ``loud`` (a WARNING) wherever a GPU run was to be
    expected: a GPU or a Jetson without TensorRT, TensorRT without a GPU, or engines in
    the bundle that cannot run. On a machine with a GPU and TensorRT but no engines for
    it, this raises, naming the ``armscope build`` command: such a box never silently
    runs on its CPU (``--backend onnxruntime`` asks for the CPU explicitly)."""
    from armscope.gpu.engines import engine_sets, find_engines
    from armscope.gpu.trt_env import gpu_info, is_jetson, tensorrt_available

    trt_ok, gpu = tensorrt_available(), gpu_info()
    if trt_ok and gpu is not None:
        import tensorrt

        engines = find_engines(bundle, tensorrt.__version__, gpu, layout, feed=feed)  # or the error naming the build
        return engines, f"engines {engines.root.name} for this GPU and TensorRT", False
    stored = engine_sets(bundle)
    if gpu is not None:
        why = f"NVIDIA GPU {gpu['name']} found but TensorRT is not installed (pip install 'armscope[gpu]'; " \
              "on a Jetson it comes with JetPack: python3-libnvinfer, venv with --system-site-packages)"
    elif trt_ok:
        why = "TensorRT is installed but no NVIDIA GPU is reachable (driver, cuda-python or pycuda missing?)"
    elif is_jetson():
        why = "this is a Jetson, but neither TensorRT nor a CUDA device is reachable from Python"
    elif stored:
        why = f"{bundle.root} has TensorRT engines ({stored[0].root.name}), but this machine has no NVIDIA GPU"
    else:
        return None, "no NVIDIA GPU or TensorRT here", False
    return None, why, True


def open_backend(bundle: Bundle, kind: str = "auto", **options) -> InferenceBackend:
    """Open the backend named by ``kind``; ``auto`` picks TensorRT when this machine can
    run the bundle's engines, else the fastest faithful CPU path (``armscope.edge.backends.select``:
    OpenVINO BF16 or INT8 where this CPU and the bundle allow it, else ONNX Runtime), and
    logs why. ``openvino``
    is the other CPU runtime (option ``cpu_precision``: f32, bf16 or auto); the
    ``cpu_precision`` option is ignored by the others, which run the bundle's own precision,
    and by ``auto``, which chooses it.
    Option ``layout`` ``auto`` (default) is the faster one for the backend chosen.
    Option ``feed``: ``float32`` (default) or ``uint8``, the camera crop through the
    bundle's uint8 front (``armscope.core.front``; TensorRT runs the engines that
    ``armscope build --feed uint8`` made)."""
    if kind not in BACKENDS:
        raise ArmscopeError(f"backend {kind!r}: expected one of {', '.join(BACKENDS)}")
    front.require(bundle, options.get("feed", "float32"))  # before any engine lookup: the missing front is the cause
    layout = options.get("layout", "auto")
    if kind == "auto":
        engines, why, loud = gpu_choice(bundle, "members" if layout == "auto" else layout,
                                        options.get("feed", "float32"))
        if engines is not None:
            from armscope.edge.backends.tensorrt_backend import TensorRTBackend

            log.info("backend: tensorrt (%s in %s)", why, bundle.root)
            options = {k: v for k, v in options.items()
                       if k not in ("threads", "cpu_precision", "allow_inexact_int8")}
            backend = TensorRTBackend(bundle, **dict(options, layout="members" if layout == "auto" else layout),
                                      engines=engines)
            backend.selection = {"requested": "auto", "why": why}
            return backend
        from armscope.edge.backends.select import open_auto_cpu

        # the fastest CPU path that stays faithful here (BF16 only after a recorded agreement gate);
        # a WARNING where a GPU run was to be expected (gpu_choice)
        return open_auto_cpu(bundle, why, options, level=logging.WARNING if loud else logging.INFO)
    if layout == "auto":
        # As measured (BENCHMARKS.md sections 1 and 4): OpenVINO runs one merged graph fastest,
        # ONNX Runtime (and TensorRT, one stream each) concurrent members.
        options["layout"] = "merged" if kind == "openvino" else "members"
    cpu_precision = options.pop("cpu_precision", None) or "f32"
    allow_inexact_int8 = options.pop("allow_inexact_int8", False)  # measurements only (accuracy, bench)
    if kind == "tensorrt":
        from armscope.edge.backends.tensorrt_backend import TensorRTBackend

        options.pop("threads", None)
        return TensorRTBackend(bundle, **options)
    options.pop("max_batch", None)
    if kind == "openvino":
        from armscope.edge.backends.openvino_backend import OpenVinoBackend

        return OpenVinoBackend(bundle, precision=cpu_precision, allow_inexact_int8=allow_inexact_int8, **options)
    from armscope.edge.backends.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(bundle, allow_inexact_int8=allow_inexact_int8, **options)

