"""ONNX Runtime on the CPU.

Two layouts, both measured in BENCHMARKS.md: ``merged`` runs the bundle's
ensemble graph in one session (the members' averaging is in the graph);
``members`` runs one session per member concurrently in threads and averages
on the host (ONNX Runtime releases the GIL while it computes).

``feed="uint8"`` runs the graphs with the bundle's uint8 front composed in
front (``armscope.core.front``): ``infer`` then takes the camera crops as uint8 and
the resize happens inside the session.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from armscope.core import front
from armscope.core.bundle import Bundle
from armscope.core.cpus import usable_cpus
from armscope.core.errors import ArmscopeError
from armscope.edge.backends.base import GraphFiles, InferenceBackend, check_graph_io
from armscope.edge.backends.cpu_features import require_exact_int8

LAYOUTS = ("merged", "members")


def session_options(threads: int, exact_qdq: bool = False):
    """``exact_qdq``: no graph optimisation, so Q/DQ pairs run as float arithmetic on
    integer values (the exact Q/DQ semantics TensorRT implements) instead of being
    fused into this CPU's INT8 kernels (see ``cpu_features``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if exact_qdq
                                     else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: its graph-clean-up warnings are no use at the eyepiece (failures raise)
    return opts


def open_session(path, threads: int, exact_qdq: bool = False):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), sess_options=session_options(threads, exact_qdq),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ArmscopeError(f"{path}: ONNX Runtime could not load it ({str(exc)[:300]})") from None


class OnnxRuntimeBackend(InferenceBackend):
    """Sessions are opened by ``activate()`` (``InferenceBackend``); construction only checks options."""

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, layout: str = "members", threads: int | None = None,
                 allow_inexact_int8: bool = False, feed: str = "float32"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ArmscopeError(f"onnxruntime layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
        require_exact_int8(bundle, "onnxruntime", allow_inexact_int8)
        self.bundle = bundle
        self.outputs = list(bundle.output_names)  # patch_probs only where the bundle has it
        self.layout = layout
        self.threads = threads or usable_cpus()
        self.graphs = GraphFiles(bundle, layout, feed)
        self.feed = feed
        self.input_name = self.graphs.input_name
        self.sessions: list = []
        self.pool: ThreadPoolExecutor | None = None

    def _activate(self) -> None:
        self.graphs.open()
        if self.layout == "merged":
            self.sessions.append(open_session(self.graphs.paths[0], self.threads))
        else:
            per = max(1, self.threads // len(self.graphs.paths))
            # the member threads first, so a failure below shuts them down with the sessions (_release)
            self.pool = ThreadPoolExecutor(max_workers=len(self.graphs.paths), thread_name_prefix="ort-member")
            for path in self.graphs.paths:
                self.sessions.append(open_session(path, per))
        self._check_io()
        self._warm_up()

    def _release(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        self.sessions = []
        self.graphs.close()

    def _check_io(self) -> None:
        for session in self.sessions:
            names = [o.name for o in session.get_outputs()]
            inputs = session.get_inputs()
            check_graph_io(self.bundle.root, [i.name for i in inputs], names, tuple(self.outputs), self.input_name)
            expected = self._input_shape()
            if list(inputs[0].shape[1:]) != expected:
                raise ArmscopeError(
                    f"{self.bundle.root}: graph input {self.input_name!r} has shape {inputs[0].shape}, "
                    f"manifest inputs.0.shape expects [N, {', '.join(map(str, expected))}]"
                )
            n_classes = len(self.bundle.classes)
            probs_shape = next(o.shape for o in session.get_outputs() if o.name == "probs")
            if isinstance(probs_shape[-1], int) and probs_shape[-1] != n_classes:
                raise ArmscopeError(
                    f"{self.bundle.root}: graph 'probs' has {probs_shape[-1]} classes, manifest task.classes has {n_classes}"
                )
            cam_shape = next(o.shape for o in session.get_outputs() if o.name == "cam")
            if cam_shape and (len(cam_shape) != 4 or (isinstance(cam_shape[1], int) and cam_shape[1] != n_classes)):
                raise ArmscopeError(
                    f"{self.bundle.root}: graph 'cam' has shape {cam_shape}, expected [N, {n_classes}, H, W] "
                    f"(one map per class of manifest task.classes)"
                )

    def _warm_up(self) -> None:
        """Run every graph once on a black frame now.

        Why: some graphs load but cannot run on the installed ONNX Runtime,
        and it only says so at the first run: an INT8 bundle whose MatMul
        weights are quantized per channel (``armscope quantize``'s all-INT8
        variant) runs on onnxruntime 1.32 but fails in 1.30 and 1.31
        (``QLinearMatMul``); on Python 3.10 (JetPack 6) pip's newest is
        1.23.2. The daemon then refuses at start-up, naming the graph, instead
        of on the first camera frame; the run also allocates what the first
        frame needs."""
        import onnxruntime as ort

        frame = np.zeros([1, *self._input_shape()], np.uint8 if self.feed == "uint8" else np.float32)

        def failure(session) -> Exception | None:
            try:
                session.run(self.outputs, {self.input_name: frame})
            except Exception as exc:  # onnxruntime's own Fail/RuntimeException types
                return exc
            return None

        # the members in parallel, as infer() runs them
        failures = list(self.pool.map(failure, self.sessions)) if self.pool else [failure(self.sessions[0])]
        for path, exc in zip(self.graphs.paths, failures):
            if exc is not None:
                detail = str(exc).split("\n")[0][:400]
                hint = ("INT8 MatMul weights quantized per channel need onnxruntime >= 1.32; upgrade it, or "
                        "quantize with the heads and CAM kept in FP32 (armscope quantize --keep-fp32 heads,cam)"
                        if "QLinearMatMul" in detail else "upgrade onnxruntime or use a bundle it can run")
                raise ArmscopeError(f"{path}: onnxruntime {ort.__version__} loads this graph but cannot run it "
                                    f"({detail}); {hint}") from None

    def _input_shape(self) -> list:
        """One frame's input shape: the manifest's, or the front's (the camera crop)."""
        if self.feed == "uint8":
            return front.entry(self.bundle)["input"]["shape"][1:]
        return self.bundle.manifest["inputs"][0]["shape"][1:]

    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.uint8 if self.feed == "uint8" else np.float32)
        feed = {self.input_name: images}
        if len(self.sessions) == 1:
            return dict(zip(self.outputs, self.sessions[0].run(self.outputs, feed)))
        results = list(self.pool.map(lambda s: s.run(self.outputs, feed), self.sessions))
        return {name: np.mean([r[i] for r in results], axis=0) for i, name in enumerate(self.outputs)}

    def _details(self) -> dict:
        import onnxruntime as ort

        return {"layout": self.layout, "threads": self.threads, "sessions": len(self.graphs.paths),
                "onnxruntime": ort.__version__, "feed": self.feed}
