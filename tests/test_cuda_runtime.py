"""``CudaRuntime``, the CUDA calls of the TensorRT backend
(edge/backends/tensorrt_backend.py), on a real GPU: pinned and device
buffers, one stream per ensemble member, the event that makes every member's
stream wait for the one input copy, async copies both ways, errors named,
memory given back. Marked ``cuda``: needs an NVIDIA GPU and cuda-python (or
pycuda) but not TensorRT, so it also runs where TensorRT cannot be installed.
Each test runs once per CUDA flavour installed (cuda-python, pycuda), since
JetPack images may carry either. The backend's engine calls are covered by
the ``gpu`` tests."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from armscope.errors import ArmscopeError
from edge.backends.tensorrt_backend import FLAVOURS, CudaRuntime, cuda_flavours
from edge.trt_build import gpu_info

pytestmark = pytest.mark.cuda

MEMBERS = 5  # the published ensemble: one stream per member in the "members" layout


@pytest.fixture(params=FLAVOURS)
def flavour(request) -> str:
    if request.param not in cuda_flavours():
        pytest.skip(f"{request.param} is not installed")
    return request.param


@pytest.fixture
def cuda(flavour):
    runtime = CudaRuntime(flavour)
    assert runtime.flavour == flavour
    yield runtime
    runtime.close()


def _free_bytes(runtime: CudaRuntime) -> int:
    if runtime.flavour == "pycuda":
        return runtime.driver.mem_get_info()[0]
    free, _total = runtime._check(runtime.cudart.cudaMemGetInfo())
    return int(free)


def test_gpu_info_names_the_gpu_as_nvidia_smi_does():
    """Engines are refused when the GPU they were built on is not this one,
    by this name and compute capability: it must read the same whichever
    source answers (cuda-python here, nvidia-smi where it is missing)."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30, check=True)
    name, cap = (s.strip() for s in out.stdout.splitlines()[0].split(","))
    assert gpu_info() == {"name": name, "compute_capability": cap}


def test_members_read_one_input_copy_through_an_event(cuda, real_inputs):
    """The "members" layout: the input is copied to the device once, on the
    first stream; an event makes each member's stream wait for that copy;
    each stream copies back on its own, records its completion, and the first
    stream waits for all of them, so one synchronise covers the frame."""
    frames = np.ascontiguousarray(real_inputs[:2], dtype=np.float32)  # real H&E, (2, 640, 640, 3)
    host_in = cuda.pinned(frames.shape, np.float32)
    host_in[...] = frames
    device_in = cuda.device(host_in.nbytes)
    streams = [cuda.stream() for _ in range(MEMBERS)]
    copied = cuda.event()
    cuda.htod(device_in, host_in, host_in.nbytes, streams[0])
    cuda.record(copied, streams[0])
    outputs = []
    for stream in streams:
        cuda.wait(stream, copied)
        out = cuda.pinned(frames.shape, np.float32)
        out[...] = -1.0
        cuda.dtoh(out, device_in, out.nbytes, stream)
        outputs.append(out)
    for stream in streams[1:]:
        done = cuda.event()
        cuda.record(done, stream)
        cuda.wait(streams[0], done)
    cuda.synchronize(streams[0])
    assert len({cuda.handle(s) for s in streams}) == MEMBERS
    for out in outputs:
        np.testing.assert_array_equal(out, frames)


def test_a_cuda_failure_is_named(cuda):
    # cuda-python names the runtime error, pycuda the driver call and its error
    with pytest.raises(ArmscopeError, match=r"CUDA error (cudaErrorMemoryAllocation|\(MemoryError\): .*out of memory)"):
        cuda.device(1 << 52)  # 4 PiB


def test_close_gives_the_memory_back(flavour):
    runtime = CudaRuntime(flavour)
    before = _free_bytes(runtime)
    runtime.device(1 << 30)
    runtime.pinned((1 << 20,), np.float32)
    assert _free_bytes(runtime) <= before - (1 << 30)
    runtime.close()
    after = CudaRuntime(flavour)
    try:
        assert _free_bytes(after) >= before - (64 << 20)  # allocator slack, not the 1 GiB
    finally:
        after.close()
