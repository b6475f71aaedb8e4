"""The CUDA runtime calls the TensorRT backend needs, from cuda-python or pycuda.

TensorRT's own samples (10.14 and later) use NVIDIA's cuda-python
(``cuda.bindings.runtime``; ``cuda.cudart`` in cuda-python < 12.6), which is
maintained with the CUDA toolkit and ships wheels for x86 and aarch64
(Jetson). pycuda is what many JetPack images carry (``python3-pycuda``), so
it is the fallback.

Threads: a CUDA context is current per host thread. ``CudaRuntime()`` makes
the device's primary context current on the thread that creates it (the one
that will infer), and ``make_current()`` does so on another thread (to free
everything from the thread that shuts down):

* cuda-python: ``cudaSetDevice(0)`` on the calling thread; the CUDA runtime
  then uses the device's primary context on that thread (trtexec calls
  ``cudaSetDevice`` at the top of each inference thread,
  samples/common/sampleInference.cpp, ``inferenceExecution``).
* pycuda: the primary context (``Device.retain_primary_context()``, the one
  the CUDA runtime and so TensorRT use too) is ``push()``-ed on each thread
  that uses it and ``pop()``-ed there (cuCtxPushCurrent / cuCtxPopCurrent:
  "pushes the given context onto the CPU thread's stack of current
  contexts"); without it pycuda's copies on the daemon's inference thread
  fail with an invalid-context error.

Everything allocated (pinned and mapped host buffers, device buffers,
streams, events, CUDA graphs) is recorded and freed by ``close()``, newest
first, with the context current.
"""
from __future__ import annotations

import ctypes
import logging
import threading

import numpy as np

from armscope.core.errors import ArmscopeError

log = logging.getLogger(__name__)

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
    """``flavour`` picks one API; by default cuda-python, else pycuda. Errors from
    either are raised as ``ArmscopeError`` naming the CUDA error."""

    def __init__(self, flavour: str | None = None):
        if flavour not in (None, *FLAVOURS):
            raise ArmscopeError(f"CUDA flavour {flavour!r}: expected one of {', '.join(FLAVOURS)}")
        installed = cuda_flavours()
        if flavour is None and not installed:
            raise ArmscopeError("the TensorRT backend needs cuda-python (pip install 'armscope[gpu]') or pycuda "
                                "(on a Jetson, JetPack's python3-pycuda also works)")
        if flavour is not None and flavour not in installed:
            raise ArmscopeError(f"CUDA flavour {flavour!r} is not installed here (installed: {installed or 'none'})")
        self._allocations: list[tuple[str, object]] = []
        self._pushed: set[int] = set()  # threads where the pycuda context is pushed by us
        self._creator = threading.get_ident()  # pycuda detaches a context only on the thread that made it
        self.context = None
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
            from armscope.gpu.trt_env import import_cudart

            cudart = import_cudart()
            self.flavour, self.cudart = flavour, cudart
            self._check(cudart.cudaSetDevice(0))
        else:
            import pycuda.driver as driver

            self.flavour, self.driver = flavour, driver
            self._pycuda(driver.init)
            self.context = self._pycuda(lambda: driver.Device(0).retain_primary_context())
            self.make_current()

    # ------------------------------------------------------------ threads

    def make_current(self) -> None:
        """Make the context current on the calling thread (idempotent per thread)."""
        if self.flavour == "cuda-python":
            self._check(self.cudart.cudaSetDevice(0))
        elif threading.get_ident() not in self._pushed:
            self._pycuda(self.context.push)
            self._pushed.add(threading.get_ident())

    def _release_current(self) -> None:
        if self.flavour == "pycuda" and threading.get_ident() in self._pushed:
            self._pushed.discard(threading.get_ident())
            try:
                self.context.pop()
            except self.driver.Error:
                pass

    # ------------------------------------------------------------ errors

    def _pycuda(self, call, *args, **kwargs):
        """Run a pycuda call, raising its driver errors as ``ArmscopeError``."""
        try:
            return call(*args, **kwargs)
        except self.driver.Error as e:
            raise ArmscopeError(f"CUDA error ({type(e).__name__}): {e}") from None

    def _check(self, result):
        """cuda-python calls return (cudaError_t, *values)."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            name = self.cudart.cudaGetErrorName(err)[1]
            raise ArmscopeError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
        return values[0] if len(values) == 1 else (values or None)

    # ------------------------------------------------------------ memory

    def _host_array(self, ptr: int, shape, dtype) -> np.ndarray:
        size = int(np.prod(shape))
        ctype = ctypes.POINTER(np.ctypeslib.as_ctypes_type(dtype))
        return np.ctypeslib.as_array(ctypes.cast(int(ptr), ctype), (size,)).reshape(shape)

    def pinned(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        if self.flavour == "pycuda":
            array = self._pycuda(self.driver.pagelocked_empty, shape, dtype)
            self._allocations.append(("pycuda", array.base))
            return array
        ptr = self._check(self.cudart.cudaMallocHost(int(np.prod(shape)) * dtype.itemsize))
        self._allocations.append(("host", ptr))
        return self._host_array(ptr, shape, dtype)

    def zero_copy_supported(self) -> tuple[bool, str]:
        """Whether mapped pinned host memory is worth it and possible here: an integrated
        GPU (Jetson: CPU and GPU share DRAM, so a copy is pure overhead) that can map host
        memory (cudaDeviceProp.integrated, .canMapHostMemory)."""
        if self.flavour == "pycuda":
            attr = self.driver.device_attribute
            device = self.driver.Device(0)
            integrated = bool(device.get_attribute(attr.INTEGRATED))
            can_map = bool(device.get_attribute(attr.CAN_MAP_HOST_MEMORY))
        else:
            prop = self._check(self.cudart.cudaGetDeviceProperties(0))
            integrated, can_map = bool(prop.integrated), bool(prop.canMapHostMemory)
        if not integrated:
            return False, "a discrete GPU (its own memory): copies over PCIe are faster than mapped reads"
        if not can_map:
            return False, "this integrated GPU cannot map host memory"
        return True, "integrated GPU that maps host memory"

    def mapped(self, shape, dtype) -> tuple[np.ndarray, int]:
        """Pinned host memory mapped into the device's address space (zero-copy):
        (host array, device pointer to the same memory). cudaHostAlloc with
        cudaHostAllocMapped, then cudaHostGetDevicePointer (CUDA runtime API, memory
        management); pycuda: pagelocked_empty(mem_flags=host_alloc_flags.DEVICEMAP) and
        HostAllocation.get_device_pointer()."""
        dtype = np.dtype(dtype)
        if self.flavour == "pycuda":
            array = self._pycuda(self.driver.pagelocked_empty, shape, dtype,
                                 mem_flags=self.driver.host_alloc_flags.DEVICEMAP)
            self._allocations.append(("pycuda", array.base))
            return array, int(self._pycuda(array.base.get_device_pointer))
        ptr = self._check(self.cudart.cudaHostAlloc(int(np.prod(shape)) * dtype.itemsize,
                                                    self.cudart.cudaHostAllocMapped))
        self._allocations.append(("host", ptr))
        device_ptr = self._check(self.cudart.cudaHostGetDevicePointer(ptr, 0))
        return self._host_array(ptr, shape, dtype), int(device_ptr)

    def device(self, nbytes: int) -> int:
        if self.flavour == "pycuda":
            allocation = self._pycuda(self.driver.mem_alloc, nbytes)
            self._allocations.append(("pycuda", allocation))
            return int(allocation)
        ptr = self._check(self.cudart.cudaMalloc(nbytes))
        self._allocations.append(("device", ptr))
        return int(ptr)

    # ------------------------------------------------------------ streams and events

    def stream(self):
        if self.flavour == "pycuda":
            stream = self._pycuda(self.driver.Stream)
            self._allocations.append(("object", stream))
            return stream
        stream = self._check(self.cudart.cudaStreamCreateWithFlags(self.cudart.cudaStreamNonBlocking))
        self._allocations.append(("stream", stream))
        return stream

    def handle(self, stream) -> int:
        return int(stream.handle) if self.flavour == "pycuda" else int(stream)

    def event(self):
        if self.flavour == "pycuda":
            event = self._pycuda(self.driver.Event)
            self._allocations.append(("object", event))
            return event
        event = self._check(self.cudart.cudaEventCreateWithFlags(self.cudart.cudaEventDisableTiming))
        self._allocations.append(("event", event))
        return event

    def record(self, event, stream):
        if self.flavour == "pycuda":
            self._pycuda(event.record, stream)
        else:
            self._check(self.cudart.cudaEventRecord(event, stream))

    def wait(self, stream, event):
        if self.flavour == "pycuda":
            self._pycuda(stream.wait_for_event, event)
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

    def dtod(self, dst: int, src: int, nbytes: int, stream):
        """Device-to-device copy (the benchmark suite's memory-bandwidth measurement)."""
        if self.flavour == "pycuda":
            self._pycuda(self.driver.memcpy_dtod_async, dst, src, nbytes, stream)
        else:
            self._check(self.cudart.cudaMemcpyAsync(dst, src, nbytes,
                                                    self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream))

    def synchronize(self, stream):
        if self.flavour == "pycuda":
            self._pycuda(stream.synchronize)
        else:
            self._check(self.cudart.cudaStreamSynchronize(stream))

    # ------------------------------------------------------------ CUDA graphs (cuda-python)

    @property
    def graphs_supported(self) -> bool:
        """Stream capture is driven through cuda-python's runtime API only."""
        return self.flavour == "cuda-python"

    def begin_capture(self, stream) -> None:
        # thread-local mode: only this thread's unsafe calls invalidate the capture (CUDA runtime API,
        # cudaStreamBeginCapture / cudaThreadExchangeStreamCaptureMode)
        self._check(self.cudart.cudaStreamBeginCapture(
            stream, self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))

    def end_capture(self, stream, ok: bool):
        """End the capture begun on ``stream``; the instantiated graph, or None when the
        capture failed (``ok`` False: the work enqueued could not be captured), with the
        CUDA error state cleared (trtexec's endCaptureOnError + cudaGetLastError)."""
        err, graph = self.cudart.cudaStreamEndCapture(stream)
        if not ok or int(err) != 0:
            if graph is not None and int(err) == 0:
                self.cudart.cudaGraphDestroy(graph)
            self.cudart.cudaGetLastError()
            return None
        self._allocations.append(("graph", graph))
        executable = self._check(self.cudart.cudaGraphInstantiate(graph, 0))
        self._allocations.append(("graph_exec", executable))
        return executable

    def launch(self, executable, stream) -> None:
        self._check(self.cudart.cudaGraphLaunch(executable, stream))

    def destroy_graphs(self) -> None:
        """Destroy the CUDA graphs now, newest first, before what they reference goes
        (TensorRT's execution contexts: their kernels and scratch memory); the rest
        stays for ``close``."""
        if self.flavour != "cuda-python":
            return
        keep = []
        for kind, item in reversed(self._allocations):
            if kind == "graph_exec":
                self.cudart.cudaGraphExecDestroy(item)
            elif kind == "graph":
                self.cudart.cudaGraphDestroy(item)
            else:
                keep.append((kind, item))
        self._allocations = keep[::-1]

    # ------------------------------------------------------------ teardown

    def close(self) -> None:
        """Free everything, newest first, with the context current on this thread; then
        release the context (pycuda: pop it here and drop the primary-context retain)."""
        if self.flavour == "pycuda" and self.context is None:
            return
        try:
            self.make_current()
        except ArmscopeError:
            pass  # the device is gone: free what can be freed
        free = {} if self.flavour == "pycuda" else {
            "host": self.cudart.cudaFreeHost, "device": self.cudart.cudaFree,
            "stream": self.cudart.cudaStreamDestroy, "event": self.cudart.cudaEventDestroy,
            "graph": self.cudart.cudaGraphDestroy, "graph_exec": self.cudart.cudaGraphExecDestroy}
        allocations, self._allocations = self._allocations, []
        for kind, item in reversed(allocations):
            if kind in free:
                free[kind](item)
            elif kind == "pycuda" and hasattr(item, "free"):
                item.free()
        del allocations  # pycuda streams/events are freed as their last reference goes, context current
        if self.flavour == "pycuda":
            self._release_current()
            if threading.get_ident() != self._creator:
                log.warning("CUDA (pycuda): closed on another thread than the one that opened it; pycuda cannot "
                            "release the context from here (it stays retained until the process exits)")
            try:
                self.context.detach()   # the retain_primary_context reference
            except self.driver.Error:
                pass
            self.context = None
