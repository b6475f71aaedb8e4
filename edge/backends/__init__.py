"""Backend selection at run time. Heavy backends are imported only when chosen."""
from __future__ import annotations

import logging

from armscope.bundle import Bundle
from armscope.errors import ArmscopeError
from edge.backends.base import InferenceBackend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt")
CPU_PRECISIONS = ("f32", "bf16", "auto")  # OpenVINO inference precision (edge/backends/openvino_backend.py)


def tensorrt_unavailable_reason(bundle: Bundle, layout: str = "merged") -> str | None:
    """Why ``auto`` cannot pick TensorRT for this bundle here (None: it can): TensorRT
    must import, a GPU must be present, and the manifest must hold engines built for
    this TensorRT version and this GPU."""
    if not bundle.manifest.get("engines"):
        return f"no TensorRT engines in {bundle.root}"
    from edge.trt_build import gpu_info, tensorrt_available

    if not tensorrt_available():
        return "TensorRT is not installed"
    gpu = gpu_info()
    if gpu is None:
        return "no NVIDIA GPU found"
    import tensorrt

    from edge.backends.tensorrt_backend import select_engines

    try:
        select_engines(bundle, tensorrt.__version__, gpu, layout)
    except ArmscopeError as exc:
        return str(exc)
    return None


def cpu_backend_for(bundle: Bundle, openvino_installed: bool, int8_exact_here: bool) -> tuple[str, str]:
    """The CPU runtime ``auto`` picks for ``bundle``, and why.

    ONNX Runtime, except for an INT8 bundle on a CPU that computes INT8
    exactly (VNNI/AMX) when OpenVINO is installed: there ONNX Runtime ran a
    full-size INT8 Q/DQ member *slower* than FP32 (230 vs 122 ms on 16 Xeon
    cores, 257 vs 242 ms on 2) while OpenVINO ran it 1.8x / 2.4x faster than
    FP32 and as exactly (BENCHMARKS.md section 4). Where INT8 is inexact both
    refuse the bundle; ONNX Runtime says so."""
    if bundle.manifest.get("precision") != "int8":
        return "onnxruntime", "the default CPU runtime"
    if not int8_exact_here:
        return "onnxruntime", "INT8 bundle; this CPU's INT8 is inexact, see below"
    if openvino_installed:
        return "openvino", "INT8 bundle on a VNNI/AMX CPU: OpenVINO runs it 1.8-2.4x faster than FP32, ONNX Runtime slower"
    return "onnxruntime", ("INT8 bundle: ONNX Runtime runs INT8 Q/DQ no faster than FP32 on the CPUs measured; "
                           "pip install 'armscope[openvino]' for OpenVINO, 1.8-2.4x faster than FP32 on a VNNI/AMX CPU")


def open_backend(bundle: Bundle, kind: str = "auto", **options) -> InferenceBackend:
    """Open the backend named by ``kind``; ``auto`` picks TensorRT when this machine can
    run the bundle's engines, else a CPU runtime (``cpu_backend_for``: ONNX Runtime,
    or OpenVINO for INT8 bundles where that is faster), and logs why. ``openvino``
    is the other CPU runtime (option ``cpu_precision``: f32, bf16 or auto); the
    ``cpu_precision`` option is ignored by the others, which run the bundle's own precision.
    Option ``layout`` ``auto`` (default) is the faster one for the backend chosen."""
    if kind not in BACKENDS:
        raise ArmscopeError(f"backend {kind!r}: expected one of {', '.join(BACKENDS)}")
    layout = options.get("layout", "auto")
    if kind == "auto":
        reason = tensorrt_unavailable_reason(bundle, "members" if layout == "auto" else layout)
        if reason is None:
            kind = "tensorrt"
            log.info("backend: tensorrt (engines for this TensorRT version and GPU in %s)", bundle.root)
        else:
            import importlib.util

            from edge.backends.cpu_features import int8_exact

            kind, why = cpu_backend_for(bundle, importlib.util.find_spec("openvino") is not None, int8_exact()[0])
            log.info("backend: %s on the CPU (%s; %s)", kind, reason, why)
    if layout == "auto":
        # OpenVINO runs one merged graph fastest (2.36 s vs 3.47 s per-member requests on
        # 2 cores); ONNX Runtime and TensorRT run members concurrently (1.66x), BENCHMARKS.md.
        options["layout"] = "merged" if kind == "openvino" else "members"
    cpu_precision = options.pop("cpu_precision", None) or "f32"
    allow_inexact_int8 = options.pop("allow_inexact_int8", False)  # measurements only (accuracy, bench)
    if kind == "tensorrt":
        from edge.backends.tensorrt_backend import TensorRTBackend

        options.pop("threads", None)
        return TensorRTBackend(bundle, **options)
    options.pop("max_batch", None)
    if kind == "openvino":
        from edge.backends.openvino_backend import OpenVinoBackend

        return OpenVinoBackend(bundle, precision=cpu_precision, allow_inexact_int8=allow_inexact_int8, **options)
    from edge.backends.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(bundle, allow_inexact_int8=allow_inexact_int8, **options)
