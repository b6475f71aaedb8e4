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


def open_backend(bundle: Bundle, kind: str = "auto", **options) -> InferenceBackend:
    """Open the backend named by ``kind``; ``auto`` picks TensorRT when this machine can
    run the bundle's engines, else ONNX Runtime on the CPU, and logs why. ``openvino``
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
            log.info("backend: onnxruntime on the CPU (%s)", reason)
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
