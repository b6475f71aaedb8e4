"""TensorRT on an NVIDIA GPU (Jetson or discrete), from engines that
``armscope build`` compiled on this device and recorded in the manifest.

CUDA from Python: TensorRT's own samples (10.14 and later) use NVIDIA's
cuda-python (``cuda.bindings.runtime``; ``cuda.cudart`` in cuda-python < 12.6),
which is maintained with the CUDA toolkit, ships wheels for x86 and aarch64
(Jetson) and needs no compiler. pycuda still works and is what many JetPack
images have, so it is the fallback when cuda-python is not installed. Both sit
behind ``CudaRuntime`` below, which exposes the few calls needed: pinned host
buffers, device buffers, streams, events, async copies.

Per frame, with everything allocated once at start-up (``max_batch`` frames):

* ``layout="merged"`` (default): the ensemble engine, whose ``Mean`` nodes
  average the members on the device. One stream: H2D copy, ``execute_async_v3``,
  D2H copies of the averaged outputs, one stream synchronise.
* ``layout="members"``: one engine, execution context and CUDA stream per
  member, all reading one device copy of the input (the copy is made on the
  first stream; an event makes the others wait for it). Each stream runs its
  member and copies its outputs into its own pinned buffers; the first stream
  waits on every member's completion event, and that one stream is synchronised
  once per frame. The average of the members is then taken on the host (a few
  KB of probabilities and CAMs; a device kernel for it would cost more in code
  than it saves in time).

Engines are only valid for the TensorRT version and GPU they were built with;
the manifest's ``engines`` entries record both, and this backend refuses a
mismatch with the command that rebuilds them instead of failing inside TensorRT.
"""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np

from armscope.bundle import Bundle
from armscope.errors import ArmscopeError
from edge.backends.base import InferenceBackend, check_graph_io

log = logging.getLogger(__name__)

LAYOUTS = ("merged", "members")
INPUT = "image"


# ----------------------------------------------------------------------------- CUDA

FLAVOURS = ("cuda-python", "pycuda")


def cuda_flavours() -> list[str]:
    """The CUDA Python APIs installed here, in the order ``CudaRuntime`` prefers them."""
    import importlib.util

    found = []
    try:
        if importlib.util.find_spec("cuda.bindings") or importlib.util.find_spec("cuda.cudart"):
            found.append("cuda-python")
    except ImportError:  # no "cuda" package at all
        pass
    if importlib.util.find_spec("pycuda"):
        found.append("pycuda")
    return found


class CudaRuntime:
    """The handful of CUDA runtime calls the backend needs, from cuda-python or pycuda.

    ``flavour`` picks one; by default cuda-python (what TensorRT's own samples use
    since 10.14), else pycuda (what older JetPack images carry). Errors from either
    are raised as ``ArmscopeError`` naming the CUDA error."""

    def __init__(self, flavour: str | None = None):
        if flavour not in (None, *FLAVOURS):
            raise ArmscopeError(f"CUDA flavour {flavour!r}: expected one of {', '.join(FLAVOURS)}")
        installed = cuda_flavours()
        if flavour is None and not installed:
            raise ArmscopeError("the TensorRT backend needs cuda-python (pip install 'armscope[gpu]') or pycuda "
                                "(on a Jetson, JetPack's python3-pycuda also works)")
        if flavour is not None and flavour not in installed:
            raise ArmscopeError(f"CUDA flavour {flavour!r} is not installed here (installed: {installed or 'none'})")
        self._allocations = []
        failed = []
        for candidate in [flavour] if flavour else installed:  # by default, the next one if an import fails
            try:
                self._open(candidate)
                break
            except ImportError as e:
                failed.append(f"{candidate}: {e}")
        else:
            raise ArmscopeError(f"no CUDA Python API could be imported ({'; '.join(failed)})")

    def _open(self, flavour: str) -> None:
        if flavour == "cuda-python":
            from edge.trt_build import import_cudart

            cudart = import_cudart()
            self.flavour, self.cudart = flavour, cudart
            self._check(cudart.cudaSetDevice(0))
        else:
            import pycuda.driver as driver

            self.flavour, self.driver = flavour, driver
            self._pycuda(driver.init)
            self.context = self._pycuda(lambda: driver.Device(0).retain_primary_context())
            self.context.push()

    def _pycuda(self, call, *args):
        """Run a pycuda call, raising its driver errors as ``ArmscopeError``."""
        try:
            return call(*args)
        except self.driver.Error as e:
            raise ArmscopeError(f"CUDA error ({type(e).__name__}): {e}") from None

    # cuda-python calls return (cudaError_t, *values)
    def _check(self, result):
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            name = self.cudart.cudaGetErrorName(err)[1]
            raise ArmscopeError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
        return values[0] if len(values) == 1 else values

    def pinned(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        size = int(np.prod(shape))
        if self.flavour == "pycuda":
            return self._pycuda(self.driver.pagelocked_empty, shape, dtype)
        ptr = self._check(self.cudart.cudaMallocHost(size * dtype.itemsize))
        self._allocations.append(("host", ptr))
        array = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(np.ctypeslib.as_ctypes_type(dtype))), (size,))
        return array.reshape(shape)

    def device(self, nbytes: int) -> int:
        if self.flavour == "pycuda":
            allocation = self._pycuda(self.driver.mem_alloc, nbytes)
            self._allocations.append(("pycuda", allocation))
            return int(allocation)
        ptr = self._check(self.cudart.cudaMalloc(nbytes))
        self._allocations.append(("device", ptr))
        return int(ptr)

    def stream(self):
        if self.flavour == "pycuda":
            return self.driver.Stream()
        return self._check(self.cudart.cudaStreamCreateWithFlags(self.cudart.cudaStreamNonBlocking))

    def handle(self, stream) -> int:
        return int(stream.handle) if self.flavour == "pycuda" else int(stream)

    def event(self):
        if self.flavour == "pycuda":
            return self.driver.Event()
        return self._check(self.cudart.cudaEventCreateWithFlags(self.cudart.cudaEventDisableTiming))

    def record(self, event, stream):
        if self.flavour == "pycuda":
            event.record(stream)
        else:
            self._check(self.cudart.cudaEventRecord(event, stream))

    def wait(self, stream, event):
        if self.flavour == "pycuda":
            stream.wait_for_event(event)
        else:
            self._check(self.cudart.cudaStreamWaitEvent(stream, event, 0))

    def htod(self, dst: int, src: np.ndarray, nbytes: int, stream):
        if self.flavour == "pycuda":
            self._pycuda(self.driver.memcpy_htod_async, dst, src.reshape(-1)[: nbytes // src.itemsize], stream)
        else:
            self._check(self.cudart.cudaMemcpyAsync(dst, src.ctypes.data, nbytes,
                                                    self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def dtoh(self, dst: np.ndarray, src: int, nbytes: int, stream):
        if self.flavour == "pycuda":
            self._pycuda(self.driver.memcpy_dtoh_async, dst.reshape(-1)[: nbytes // dst.itemsize], src, stream)
        else:
            self._check(self.cudart.cudaMemcpyAsync(dst.ctypes.data, src, nbytes,
                                                    self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def synchronize(self, stream):
        if self.flavour == "pycuda":
            self._pycuda(stream.synchronize)
        else:
            self._check(self.cudart.cudaStreamSynchronize(stream))

    def close(self):
        for kind, ptr in reversed(self._allocations):
            if kind == "host":
                self.cudart.cudaFreeHost(ptr)
            elif kind == "device":
                self.cudart.cudaFree(ptr)
            else:
                ptr.free()
        self._allocations = []
        if self.flavour == "pycuda":
            self.context.pop()


# ----------------------------------------------------------------------------- compatibility

def engine_mismatch(entry: dict, trt_version: str, gpu: dict) -> str | None:
    """Why an engine entry cannot run here (None when it can). Engines are tied to the
    TensorRT version (exactly) and to the GPU's compute capability and model."""
    if entry["tensorrt"] != trt_version:
        return f"built with TensorRT {entry['tensorrt']}, this device has TensorRT {trt_version}"
    if entry["compute_capability"] != gpu["compute_capability"]:
        return (f"built for compute capability {entry['compute_capability']} ({entry['gpu']}), this GPU is "
                f"{gpu['compute_capability']} ({gpu['name']})")
    if entry["gpu"] != gpu["name"]:
        return f"built on {entry['gpu']}, this GPU is {gpu['name']}"
    return None


def select_engines(bundle: Bundle, trt_version: str, gpu: dict, layout: str = "merged") -> list[dict]:
    """The manifest's engine entries for ``layout`` that run here, or an error that says how to rebuild."""
    engines = bundle.manifest.get("engines", [])
    wanted = ["ensemble"] if layout == "merged" else [f"member_{i}" for i in range(len(bundle.member_paths))]
    rebuild = f"rebuild on this device: armscope build {bundle.root} --precision {bundle.manifest['precision']}"
    if not engines:
        raise ArmscopeError(f"{bundle.root}: field engines: none built; {rebuild}")
    chosen = []
    for graph in wanted:
        candidates = [e for e in engines if e["graph"] == graph]
        if not candidates:
            raise ArmscopeError(f"{bundle.root}: field engines: no engine for {graph}; {rebuild}")
        reasons = [engine_mismatch(e, trt_version, gpu) for e in candidates]
        usable = [e for e, r in zip(candidates, reasons) if r is None]
        if not usable:
            raise ArmscopeError(f"{bundle.root / candidates[0]['file']}: {reasons[0]}; {rebuild}")
        chosen.append(usable[0])
    return chosen


# ----------------------------------------------------------------------------- backend

class _Member:
    """One engine with its context, stream, device buffers and pinned outputs."""

    def __init__(self, cuda: CudaRuntime, engine, max_batch: int, input_ptr: int, wanted: tuple[str, ...]):
        import tensorrt as trt

        self.engine = engine
        self.context = engine.create_execution_context()
        self.stream = cuda.stream()
        self.done = cuda.event()
        self.outputs: dict[str, tuple[int, np.ndarray]] = {}
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        check_graph_io("engine", inputs, names, wanted)
        # shapes at the largest batch the engine's profile allows us to use
        profile_max = engine.get_tensor_profile_shape(INPUT, 0)[2]
        self.max_batch = min(max_batch, int(profile_max[0]))
        self.context.set_input_shape(INPUT, (self.max_batch, *profile_max[1:]))
        self.context.set_tensor_address(INPUT, input_ptr)  # every member reads the one device input
        for name in wanted:  # the bundle's outputs (patch_probs only where it has per-patch heads)
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = trt.nptype(engine.get_tensor_dtype(name))
            if dtype != np.float32:
                raise ArmscopeError(f"engine output {name} is {np.dtype(dtype)}, expected float32 "
                                    "(FP16/INT8 bundles keep float32 I/O)")
            host = cuda.pinned(shape, np.float32)
            self.outputs[name] = (cuda.device(host.nbytes), host)
            self.context.set_tensor_address(name, self.outputs[name][0])

    def enqueue(self, cuda: CudaRuntime, shape: tuple) -> None:
        """Queue this engine on its stream for a batch of ``shape``."""
        self.context.set_input_shape(INPUT, shape)
        if not self.context.execute_async_v3(cuda.handle(self.stream)):
            raise ArmscopeError("TensorRT execute_async_v3 failed")


def run_members(cuda: CudaRuntime, members: list, host_input: np.ndarray, input_ptr: int, input_ready,
                images: np.ndarray) -> dict[str, np.ndarray]:
    """One batch through every member, the per-frame sequence of both layouts
    (module docstring): the input copied to the device once on the first
    member's stream, ``input_ready`` recorded there and waited for by every
    other member's stream, each member enqueued and its outputs copied back on
    its own stream, the first stream waiting on each member's ``done`` event,
    one synchronisation; then the members' outputs averaged on the host.

    A member is anything with ``stream``, ``done``, ``max_batch``, ``outputs``
    ({name: (device pointer, pinned host array)}) and ``enqueue(cuda, shape)``:
    ``_Member`` runs a TensorRT engine; the ``cuda`` tests pass members whose
    "engine" is stream-ordered copies, to check this sequence where TensorRT
    is not installed. Batches larger than the smallest ``max_batch`` run in chunks.
    The outputs are those of the first member's ``outputs`` (every member has the same)."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    names = list(members[0].outputs)
    if images.ndim != host_input.ndim or images.shape[1:] != host_input.shape[1:]:
        raise ArmscopeError(f"input batch of shape {images.shape}: expected (N, {', '.join(map(str, host_input.shape[1:]))})")
    max_batch = min(host_input.shape[0], *(m.max_batch for m in members))
    if images.shape[0] > max_batch:
        parts = [run_members(cuda, members, host_input, input_ptr, input_ready, images[i : i + max_batch])
                 for i in range(0, len(images), max_batch)]
        return {k: np.concatenate([p[k] for p in parts]) for k in names}
    n = images.shape[0]
    first = members[0]
    host_input[:n] = images
    cuda.htod(input_ptr, host_input, images.nbytes, first.stream)
    cuda.record(input_ready, first.stream)
    for member in members:
        if member is not first:
            cuda.wait(member.stream, input_ready)
        member.enqueue(cuda, images.shape)
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


class TensorRTBackend(InferenceBackend):
    name = "tensorrt"

    def __init__(self, bundle: Bundle, layout: str = "merged", max_batch: int = 1, **_ignored):
        from edge.trt_build import gpu_info, require_tensorrt

        if layout not in LAYOUTS:
            raise ArmscopeError(f"tensorrt layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
        trt = require_tensorrt("the TensorRT backend")
        self.bundle, self.layout = bundle, layout
        gpu = gpu_info()
        if gpu is None:
            raise ArmscopeError("the TensorRT backend needs an NVIDIA GPU; none was found (use --backend onnxruntime)")
        self.entries = select_engines(bundle, trt.__version__, gpu, layout)
        self.cuda = CudaRuntime()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.members: list[_Member] = []
        shape = bundle.manifest["inputs"][0]["shape"][1:]
        self.host_input = self.cuda.pinned((max_batch, *shape), np.float32)
        self.input_ptr = self.cuda.device(self.host_input.nbytes)
        self.input_ready = self.cuda.event()
        for entry in self.entries:
            path = bundle.root / entry["file"]
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise ArmscopeError(f"{path}: TensorRT {trt.__version__} could not deserialize this engine; "
                                    f"rebuild it: armscope build {bundle.root} --precision {entry['precision']}")
            self.members.append(_Member(self.cuda, engine, max_batch, self.input_ptr, bundle.output_names))
        self.max_batch = min(m.max_batch for m in self.members)
        self.gpu, self.trt_version = gpu, trt.__version__

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        try:
            return run_members(self.cuda, self.members, self.host_input, self.input_ptr, self.input_ready, images)
        except ArmscopeError as e:
            raise ArmscopeError(f"{self.bundle.root}: {e}") from None

    def describe(self) -> dict:
        return {"backend": self.name, "layout": self.layout, "tensorrt": self.trt_version, "gpu": self.gpu["name"],
                "compute_capability": self.gpu["compute_capability"], "engines": [e["file"] for e in self.entries],
                "precision": self.entries[0]["precision"], "cuda": self.cuda.flavour, "max_batch": self.max_batch}

    def close(self) -> None:
        for member in self.members:
            member.context = None
            member.engine = None
        self.members = []
        if getattr(self, "cuda", None) is not None:
            self.cuda.close()
            self.cuda = None


def engine_path(bundle: Bundle, entry: dict) -> Path:
    return bundle.root / entry["file"]
