"""OpenVINO on the CPU, behind the same interface as ONNX Runtime.

Why a second CPU runtime: OpenVINO's CPU plugin (oneDNN) is the strongest
peer for DenseNet-style convolution stacks on x86, and it is the only one of
the two that runs BF16 on CPUs that have it (AVX512-BF16 or AMX). It reads the
bundle's ONNX graphs directly (FP32, FP16, and the INT8 Q/DQ graphs that
``armscope quantize`` writes, which it runs as INT8 where that is exact, see
``cpu_features``), so no extra export step
exists and the manifest's sha256 checks still cover what runs.

Precision is OpenVINO's ``INFERENCE_PRECISION_HINT``: ``f32``, ``bf16``, or
``auto`` (OpenVINO's default: BF16 where the CPU has it, else FP32). What the
CPU supports is read at run time (``OPTIMIZATION_CAPABILITIES``): CPUs in one
fleet differ, and ``bf16`` on a CPU without it is refused rather than silently
run in FP32. Layouts as for ONNX Runtime: ``members`` compiles each member and
runs them one after another, each with all threads (concurrent requests
with the threads shared out measured slower, BENCHMARKS.md section 4:
OpenVINO parallelises inside a graph better than ONNX Runtime does),
``merged`` compiles the ensemble graph once.

Graphs are compiled for one frame (input reshaped from [N, S, S, 3] to
[1, S, S, 3]), the daemon's batch: a static shape let OpenVINO run a full-size
DenseNet-121 member faster than the bundle's dynamic-batch graph
(BENCHMARKS.md section 4).
Other batch sizes (``armscope accuracy``, ``classify`` of many images) run on
the dynamic graph, compiled the first time one comes.

``feed="uint8"``: the graphs with the bundle's uint8 front composed in front
(``armscope.core.front``); ``infer`` then takes the camera crops as uint8.
"""
from __future__ import annotations


import numpy as np

from armscope.core.bundle import Bundle
from armscope.core.cpus import usable_cpus
from armscope.core.errors import ArmscopeError, require_module
from armscope.edge.backends.base import GraphFiles, InferenceBackend, check_graph_io
from armscope.edge.backends.cpu_features import require_exact_int8

LAYOUTS = ("merged", "members")
PRECISIONS = ("f32", "bf16", "auto")


def cpu_capabilities(core=None) -> list[str]:
    """OpenVINO's list for the CPU, e.g. ['FP32', 'BF16', 'INT8', ...]."""
    if core is None:
        core = require_module("openvino", "openvino", "the OpenVINO backend").Core()
    return list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def compile_graph(core, path, threads: int, precision: str = "f32", batch: int | None = None):
    """One ONNX graph compiled for the CPU as the backend runs it: latency
    mode, one stream, ``threads`` threads, ``precision`` as
    ``INFERENCE_PRECISION_HINT`` (``auto``: OpenVINO's choice), and with
    ``batch`` its input's batch dimension fixed (None: as the graph declares
    it). Checks neither the precision against the CPU nor the graph's I/O (the backend does)."""
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
    if precision != "auto":
        config["INFERENCE_PRECISION_HINT"] = precision
    try:
        model = core.read_model(str(path))
        if batch is not None and len(model.inputs) == 1 and model.input(0).get_partial_shape().rank.is_static:
            shape = model.input(0).get_partial_shape()
            model.reshape({model.input(0).get_any_name(): [batch, *list(shape)[1:]]})
        return core.compile_model(model, "CPU", config)
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long C++ traces
        raise ArmscopeError(f"{path}: OpenVINO could not compile it ({str(exc).splitlines()[0][:300]})") from None


class OpenVinoBackend(InferenceBackend):
    """Graphs are compiled by ``activate()`` (``InferenceBackend``); construction only checks options."""

    name = "openvino"

    def __init__(self, bundle: Bundle, layout: str = "members", threads: int | None = None,
                 precision: str = "f32", allow_inexact_int8: bool = False, feed: str = "float32"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ArmscopeError(f"openvino layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
        if precision not in PRECISIONS:
            raise ArmscopeError(f"openvino precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        require_exact_int8(bundle, "openvino", allow_inexact_int8)
        self.ov = require_module("openvino", "openvino", "--backend openvino")
        self.bundle = bundle
        self.outputs = list(bundle.output_names)  # patch_probs only where the bundle has it
        self.layout = layout
        self.threads = threads or usable_cpus()
        self.requested_precision = precision
        self.core = None
        self.precision = None          # what OpenVINO settled on, once active
        self.capabilities: list[str] = []
        self.graphs = GraphFiles(bundle, layout, feed)
        self.feed = feed
        self.input_name = self.graphs.input_name
        self.compiled: list = []
        self.requests: list = []  # for one frame (static shape)
        self.any_batch: list = []  # for other batch sizes, compiled when the first comes

    def _activate(self) -> None:
        core = self.ov.Core()
        self.capabilities = cpu_capabilities(core)
        if self.requested_precision == "bf16" and "BF16" not in self.capabilities:
            raise ArmscopeError(
                "openvino precision bf16: this CPU has no BF16 support (needs AVX512-BF16 or AMX; OpenVINO "
                f"reports {', '.join(self.capabilities)}); use f32"
            )
        self.core = core
        self.graphs.open()
        for path in self.graphs.paths:
            self.compiled.append(compile_graph(core, path, self.threads, self.requested_precision, batch=1))
        hint = self.compiled[0].get_property("INFERENCE_PRECISION_HINT")  # what OpenVINO settled on
        self.precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self._check_io()
        self.requests = [c.create_infer_request() for c in self.compiled]

    def _release(self) -> None:
        self.requests = []
        self.any_batch = []
        self.compiled = []
        self.core = None
        self.graphs.close()

    def _check_io(self) -> None:
        for compiled in self.compiled:
            inputs = [i.get_any_name() for i in compiled.inputs]
            outputs = {n for o in compiled.outputs for n in o.get_names()}
            check_graph_io(self.bundle.root, inputs, outputs, tuple(self.outputs), self.input_name)

    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.uint8 if self.feed == "uint8" else np.float32)
        requests = self.requests
        if len(images) != 1:
            if not self.any_batch:
                self.any_batch = [compile_graph(self.core, path, self.threads, self.requested_precision)
                                  .create_infer_request() for path in self.graphs.paths]
            requests = self.any_batch
        results = []
        for request in requests:
            request.infer({self.input_name: images}, share_inputs=True)
            results.append([np.array(request.get_tensor(name).data, copy=True) for name in self.outputs])
        if len(results) == 1:
            return dict(zip(self.outputs, results[0]))
        return {name: np.mean([r[i] for r in results], axis=0) for i, name in enumerate(self.outputs)}

    def _details(self) -> dict:
        return {"layout": self.layout, "threads": self.threads,
                "precision": self.precision or self.requested_precision, "requests": len(self.graphs.paths),
                "openvino": self.ov.__version__, "cpu_capabilities": self.capabilities, "feed": self.feed}
