"""Backend selection at run time. Heavy backends are imported only when chosen."""
from __future__ import annotations

import logging

from armscope.bundle import Bundle
from armscope.errors import ArmscopeError
from edge.backends.base import InferenceBackend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime")


def open_backend(bundle: Bundle, kind: str = "auto", **options) -> InferenceBackend:
    """Open the backend named by ``kind``; ``auto`` picks the best one this machine can run
    and logs why. TensorRT joins here once engines are built for the device."""
    if kind not in BACKENDS:
        raise ArmscopeError(f"backend {kind!r}: expected one of {', '.join(BACKENDS)}")
    if kind == "auto":
        log.info("backend: onnxruntime on the CPU (no TensorRT engines in %s)", bundle.root)
    from edge.backends.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(bundle, **options)
