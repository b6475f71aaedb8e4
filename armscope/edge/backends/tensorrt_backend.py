"""TensorRT on an NVIDIA GPU (Jetson or discrete), from the engines that
``armscope build`` stored with the bundle (``armscope.gpu.engines``).

Lifecycle (``InferenceBackend``): construction finds the engine set for this
TensorRT version and GPU (cheap, any thread); ``activate()`` on the thread
that infers makes the CUDA context current there (``CudaRuntime``),
deserializes the engines, creates their execution contexts, streams, events
and buffers, runs each engine once and captures its enqueue as a CUDA graph;
``deactivate()`` destroys all of it (with the context current on the calling
thread). ``infer()`` only runs on the activating thread.

Per frame, with everything allocated once (``max_batch`` frames):

* ``layout="members"`` (default, what ``build`` builds): one engine,
  execution context and CUDA stream per member, all reading one device copy
  of the input (made on the first stream; an event makes the others wait
  for it). Each stream runs its member and copies its outputs into its own
  pinned buffers; the first stream waits on every member's completion event
  and is synchronised once per frame. The members' average is taken on the
  host (a few KB).
* ``layout="merged"``: the ensemble engine (``build --layout merged``), whose
  ``Mean`` nodes average on the device; the same sequence with one member.

On a Jetson (integrated GPU sharing DRAM with the CPU) the input and output
buffers are pinned host memory mapped into the device (zero-copy): the
engines read the frame where the CPU wrote it and write results where the
CPU reads them, so the per-frame copies disappear (``zero_copy``: auto, on,
off; env ``ARMSCOPE_ZERO_COPY``). With ``max_batch`` 1 (the daemon's) each
member's enqueue is replayed as a CUDA graph captured at activation, as
``trtexec --useCudaGraph`` does
(``cuda_graphs``; env ``ARMSCOPE_CUDA_GRAPHS=0`` turns it off); an engine
TensorRT cannot enqueue under capture runs directly and ``describe()`` says so.
``feed="uint8"`` runs the engines ``build --feed uint8`` made, with the
bundle's uint8 front inside them: ``infer`` takes the camera crops (N, C, C, 3)
uint8 BGR, 3 MB a 1024 x 1024 frame instead of 4.9 MB of float32 640 x 640,
and the GPU resizes them; the input buffer is uint8 and everything else the same.
DLA engines (``build --dla N``): ``IRuntime.DLA_core`` is set to the core the
engine was built for before deserializing, and layers DLA cannot run fall
back to the GPU (``gpu_fallback`` in ``describe()``).
"""
from __future__ import annotations

import logging
import os

import numpy as np

from armscope.core import front
from armscope.core.bundle import Bundle
from armscope.core.errors import ArmscopeError
from armscope.edge.backends.base import InferenceBackend, check_graph_io
from armscope.gpu.cuda_runtime import FLAVOURS, CudaRuntime, cuda_flavours  # noqa: F401  (re-exported)
from armscope.gpu.engines import LAYOUTS, EngineSet, find_engines, graphs_for

log = logging.getLogger(__name__)

ZERO_COPY = ("auto", "on", "off")


class _Member:
    """One engine with its execution context, stream, event, output buffers and CUDA graphs."""

    def __init__(self, cuda: CudaRuntime, engine, max_batch: int, input_ptr: int, wanted: tuple[str, ...],
                 zero_copy: bool, input_name: str = "image", input_dtype=np.float32):
        import tensorrt as trt

        self.engine = engine
        self.input_name = input_name
        self.context = None
        try:
            self.context = engine.create_execution_context()
            if self.context is None:  # TensorRT returns None (and logs why), e.g. out of device memory
                raise ArmscopeError("TensorRT could not create an execution context for this engine "
                                    "(see the TensorRT error logged above; out of device memory?)")
            self.stream = cuda.stream()
            self.done = cuda.event()
            self.mapped = zero_copy           # outputs in mapped host memory: no device-to-host copy
            self.outputs: dict[str, tuple[int, np.ndarray]] = {}
            self.graphs: dict[int, object] = {}   # batch size -> instantiated CUDA graph of the enqueue
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            check_graph_io("engine", inputs, names, wanted, input_name)
            got = np.dtype(trt.nptype(engine.get_tensor_dtype(input_name)))
            if got != np.dtype(input_dtype):
                raise ArmscopeError(f"engine input {input_name} is {got}, expected {np.dtype(input_dtype)}")
            # shapes at the largest batch the engine's profile allows us to use
            profile_max = engine.get_tensor_profile_shape(input_name, 0)[2]
            self.max_batch = min(max_batch, int(profile_max[0]))
            self.shape = (self.max_batch, *profile_max[1:])
            self._set_shape(self.shape)
            self._address(input_name, input_ptr)  # every member reads the one input
            for name in wanted:  # the bundle's outputs (patch_probs only where it has per-patch heads)
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = trt.nptype(engine.get_tensor_dtype(name))
                if dtype != np.float32:
                    raise ArmscopeError(f"engine output {name} is {np.dtype(dtype)}, expected float32 "
                                        "(FP16/INT8 bundles keep float32 I/O)")
                if zero_copy:
                    host, ptr = cuda.mapped(shape, np.float32)
                else:
                    host = cuda.pinned(shape, np.float32)
                    ptr = cuda.device(host.nbytes)
                self.outputs[name] = (ptr, host)
                self._address(name, ptr)
        except BaseException:
            self.context = self.engine = None   # nothing of TensorRT outlives a failed start (tracebacks keep frames)
            raise

    def _set_shape(self, shape: tuple) -> None:
        if not self.context.set_input_shape(self.input_name, shape):
            raise ArmscopeError(f"TensorRT refused input shape {shape} (outside the engine's optimisation profile)")
        self.current = tuple(shape)

    def _address(self, name: str, ptr: int) -> None:
        if not self.context.set_tensor_address(name, ptr):
            raise ArmscopeError(f"TensorRT refused the buffer address of tensor {name!r}")

    def _execute(self, cuda: CudaRuntime) -> bool:
        return bool(self.context.execute_async_v3(cuda.handle(self.stream)))

    def capture(self, cuda: CudaRuntime, shape: tuple) -> str | None:
        """Capture this member's enqueue for ``shape`` as a CUDA graph; None on success,
        else why not. trtexec --useCudaGraph's sequence (TensorRT samples/common/
        sampleInference.cpp, createEnqueueFunction): enqueue once and synchronise first,
        "to avoid capturing initialization calls"; then capture one enqueue; an engine
        with operations not permitted under capture makes that enqueue fail, and it runs
        without a graph. The graph fixes shapes and buffer addresses, which never change
        here after activation."""
        self._set_shape(shape)
        if not self._execute(cuda):
            raise ArmscopeError("TensorRT execute_async_v3 failed on the warm-up run")
        cuda.synchronize(self.stream)
        cuda.begin_capture(self.stream)
        executable = cuda.end_capture(self.stream, self._execute(cuda))
        if executable is None:
            return "TensorRT cannot enqueue this engine under CUDA graph capture"
        self.graphs[shape[0]] = executable
        return None

    def enqueue(self, cuda: CudaRuntime, shape: tuple) -> None:
        """Queue this engine on its stream for a batch of ``shape``: its CUDA graph where one
        was captured for this batch size, else a direct enqueue."""
        shape = tuple(shape)
        if self.current != shape:
            self._set_shape(shape)
        graph = self.graphs.get(shape[0])
        if graph is not None:
            cuda.launch(graph, self.stream)
        elif not self._execute(cuda):
            raise ArmscopeError("TensorRT execute_async_v3 failed")


def run_members(cuda: CudaRuntime, members: list, host_input: np.ndarray, input_ptr: int, input_ready,
                images: np.ndarray, copy_input: bool = True) -> dict[str, np.ndarray]:
    """One batch through every member, the per-frame sequence of both layouts
    (module docstring): the input copied to the device once on the first
    member's stream (not with ``copy_input=False``: ``input_ptr`` maps
    ``host_input``), ``input_ready`` recorded there and waited for by every
    other member's stream, each member enqueued and its outputs copied back on
    its own stream (not where ``member.mapped``), the first stream waiting on
    each member's ``done`` event, one synchronisation; then the members'
    outputs averaged on the host.

    A member is anything with ``stream``, ``done``, ``max_batch``, ``outputs``
    ({name: (device pointer, pinned host array)}) and ``enqueue(cuda, shape)``:
    ``_Member`` runs a TensorRT engine; the ``cuda`` tests pass members whose
    "engine" is stream-ordered copies, to check this sequence where TensorRT
    is not installed. Batches larger than the smallest ``max_batch`` run in chunks.
    The outputs are those of the first member's ``outputs`` (every member has the same)."""
    images = np.ascontiguousarray(images, dtype=host_input.dtype)  # float32 frames, or uint8 crops (feed uint8)
    names = list(members[0].outputs)
    if images.ndim != host_input.ndim or images.shape[1:] != host_input.shape[1:]:
        raise ArmscopeError(f"input batch of shape {images.shape}: expected (N, {', '.join(map(str, host_input.shape[1:]))})")
    max_batch = min(host_input.shape[0], *(m.max_batch for m in members))
    if images.shape[0] > max_batch:
        parts = [run_members(cuda, members, host_input, input_ptr, input_ready, images[i : i + max_batch], copy_input)
                 for i in range(0, len(images), max_batch)]
        return {k: np.concatenate([p[k] for p in parts]) for k in names}
    n = images.shape[0]
    first = members[0]
    host_input[:n] = images
    if copy_input:
        cuda.htod(input_ptr, host_input, images.nbytes, first.stream)
    cuda.record(input_ready, first.stream)
    for member in members:
        if member is not first:
            cuda.wait(member.stream, input_ready)
        member.enqueue(cuda, images.shape)
        if not getattr(member, "mapped", False):
            for name in names:
                ptr, host = member.outputs[name]
                cuda.dtoh(host, ptr, host[:n].nbytes, member.stream)
        if member is not first:
            cuda.record(member.done, member.stream)
            cuda.wait(first.stream, member.done)
    cuda.synchronize(first.stream)  # the one synchronisation per batch
    if len(members) == 1:
        return {name: first.outputs[name][1][:n].copy() for name in names}
    return {name: np.mean([m.outputs[name][1][:n] for m in members], axis=0) for name in names}


def _env_switch(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


class TensorRTBackend(InferenceBackend):
    name = "tensorrt"
    thread_bound = True

    def __init__(self, bundle: Bundle, layout: str = "members", max_batch: int = 1, *,
                 engines: EngineSet | None = None, cuda_graphs: bool | None = None, zero_copy: str | None = None,
                 flavour: str | None = None, dla_core: int | None = None, feed: str = "float32", **_ignored):
        from armscope.gpu.trt_env import gpu_info, require_tensorrt

        super().__init__()
        if layout not in LAYOUTS:
            raise ArmscopeError(f"tensorrt layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
        zero_copy = zero_copy or _env_switch("ARMSCOPE_ZERO_COPY", "auto")
        if zero_copy not in ZERO_COPY:
            raise ArmscopeError(f"zero_copy (ARMSCOPE_ZERO_COPY) {zero_copy!r}: expected one of {', '.join(ZERO_COPY)}")
        trt = require_tensorrt("the TensorRT backend")
        gpu = gpu_info()
        if gpu is None:
            raise ArmscopeError("the TensorRT backend needs an NVIDIA GPU; none was found (use --backend onnxruntime)")
        front.require(bundle, feed)
        self.bundle, self.layout, self.gpu, self.trt_version = bundle, layout, gpu, trt.__version__
        self.feed = feed
        self.engine_set = engines or find_engines(bundle, trt.__version__, gpu, layout, dla_core, feed)
        if self.engine_set.feed != feed:
            raise ArmscopeError(f"{self.engine_set.root}: built for feed {self.engine_set.feed}, feed {feed} was "
                                "asked for")
        self.graph_names = graphs_for(bundle, layout)
        self.requested_batch = max_batch
        self.want_graphs = (cuda_graphs if cuda_graphs is not None
                            else _env_switch("ARMSCOPE_CUDA_GRAPHS", "1") not in ("0", "off", "false", "no"))
        self.want_zero_copy, self.flavour = zero_copy, flavour
        self.cuda: CudaRuntime | None = None
        self.runtime = None
        self.members: list[_Member] = []
        self.max_batch = max_batch
        self.zero_copy, self.zero_copy_why = False, "not active"
        self.graphs_state = "not active"

    # ------------------------------------------------------------ lifecycle

    def _activate(self) -> None:
        from armscope.gpu.trt_env import require_tensorrt, trt_logger

        trt = require_tensorrt("the TensorRT backend")
        self.cuda = CudaRuntime(self.flavour)  # the context is current on this (the inferring) thread from here
        self.runtime = trt.Runtime(trt_logger())
        dla = self.engine_set.dla_core
        if dla is not None:
            if dla >= self.runtime.num_DLA_cores:
                raise ArmscopeError(f"{self.engine_set.root}: built for DLA core {dla}; this device has "
                                    f"{self.runtime.num_DLA_cores} DLA core(s)")
            # IRuntime::setDLACore, "the DLA core that the deserialized engine must execute on":
            # set before deserialize_cuda_engine (TensorRT API, nvinfer1::IRuntime; Python: Runtime.DLA_core)
            self.runtime.DLA_core = int(dla)
        self.zero_copy, self.zero_copy_why = self._zero_copy_decision()
        shape, dtype, input_name = self._input()
        if self.zero_copy:
            self.host_input, self.input_ptr = self.cuda.mapped(shape, dtype)
        else:
            self.host_input = self.cuda.pinned(shape, dtype)
            self.input_ptr = self.cuda.device(self.host_input.nbytes)
        self.input_ready = self.cuda.event()
        for graph in self.graph_names:
            path = self.engine_set.path(graph)
            engine = None
            try:
                engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
                if engine is None:
                    raise ArmscopeError(f"{path}: TensorRT {self.trt_version} could not deserialize this engine "
                                        "(see the TensorRT error logged above); rebuild it: "
                                        f"armscope build {self.bundle.root} --precision {self.engine_set.precision}")
                self.members.append(_Member(self.cuda, engine, self.requested_batch, self.input_ptr,
                                            self.bundle.output_names, self.zero_copy, input_name, dtype))
            finally:
                engine = None  # the member holds it; after a failure nothing may (a traceback keeps this frame)
        self.max_batch = min(m.max_batch for m in self.members)
        self.graphs_state = self._capture_graphs()

    def _input(self) -> tuple[tuple, type, str]:
        """(shape at the requested batch, dtype, tensor name) of the engines' input: the
        preprocessed frame, or with feed uint8 the camera crop the front takes."""
        if self.feed == "uint8":
            return (self.requested_batch, *front.crop_shape(self.bundle.preprocessing)), np.uint8, front.INPUT
        return (self.requested_batch, *self.bundle.manifest["inputs"][0]["shape"][1:]), np.float32, "image"

    def _zero_copy_decision(self) -> tuple[bool, str]:
        if self.want_zero_copy == "off":
            return False, "off (zero_copy=off)"
        supported, why = self.cuda.zero_copy_supported()
        if self.want_zero_copy == "on" and not supported:
            raise ArmscopeError(f"zero_copy=on: not possible on this GPU ({why}); use auto or off")
        return supported, why

    def _capture_graphs(self) -> str:
        """Each member's enqueue at batch 1 (the daemon's) as a CUDA graph; what happened, for describe()."""
        if not self.want_graphs:
            return "off (ARMSCOPE_CUDA_GRAPHS=0 or cuda_graphs=False)"
        if not self.cuda.graphs_supported:
            return f"not used with {self.cuda.flavour} (stream capture is driven through cuda-python)"
        if self.max_batch > 1:
            # a graph replays the kernels of the shapes it was captured with; after a direct run at another
            # batch size the execution context is no longer in that state (trtexec captures only final shapes)
            return f"off (max_batch {self.max_batch}: a graph fixes the batch it was captured with)"
        shape = (1, *self.host_input.shape[1:])
        failed = [why for m in self.members if (why := m.capture(self.cuda, shape)) is not None]
        if failed:
            log.warning("CUDA graphs: %d of %d engines run without one (%s)", len(failed), len(self.members), failed[0])
            return f"partly: {len(self.members) - len(failed)} of {len(self.members)} engines ({failed[0]})"
        return "on (batch 1)"

    def _release(self) -> None:
        """Destroy in dependency order (execution contexts, engines, runtime, then streams,
        events, graphs and memory), with the CUDA context current on this thread."""
        if self.cuda is not None:
            try:
                self.cuda.make_current()
            except ArmscopeError:
                pass
            self.cuda.destroy_graphs()   # they hold the contexts' kernels and scratch memory: first
        for member in self.members:
            member.graphs = {}
            member.context = None
            member.engine = None
        self.members = []
        self.runtime = None
        self.host_input = self.input_ptr = self.input_ready = None
        if self.cuda is not None:
            self.cuda.close()
            self.cuda = None

    # ------------------------------------------------------------ inference

    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        try:
            return run_members(self.cuda, self.members, self.host_input, self.input_ptr, self.input_ready, images,
                               copy_input=not self.zero_copy)
        except ArmscopeError as e:
            raise ArmscopeError(f"{self.bundle.root}: {e}") from None

    def _details(self) -> dict:
        index = self.engine_set.index
        return {"layout": self.layout, "tensorrt": self.trt_version, "gpu": self.gpu["name"],
                "compute_capability": self.gpu["compute_capability"], "engines": str(self.engine_set.root),
                "precision": self.engine_set.precision, "dla_core": index.get("dla_core"),
                "gpu_fallback": bool(index.get("gpu_fallback")),
                "cuda": self.cuda.flavour if self.cuda is not None else None, "max_batch": self.max_batch,
                "cuda_graphs": self.graphs_state, "zero_copy": self.zero_copy, "zero_copy_why": self.zero_copy_why,
                "feed": self.feed, "tf32": index.get("tf32", True)}
