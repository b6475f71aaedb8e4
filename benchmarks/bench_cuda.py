"""The TensorRT backend's CUDA work around its engines, per frame, on a real GPU.

Run:  python -m pytest benchmarks/bench_cuda.py --benchmark-only
Marked ``cuda``: needs an NVIDIA GPU and cuda-python (or pycuda), not TensorRT,
so it also measures a machine where TensorRT cannot be installed.

``TensorRTBackend.infer`` (edge/backends/tensorrt_backend.py) does, with the
same ``CudaRuntime`` calls measured here: copy the preprocessed frame
(1 x 640 x 640 x 3 float32, 4.9 MB) from pinned memory to the device on the
first stream, record an event, make every other member's stream wait for it,
run each member's engine, copy each member's outputs (probs, patch_probs, cam)
back on its own stream, make the first stream wait for all of them, and
synchronise once. These benchmarks run that sequence with no engines, so
their medians are the floor the backend adds to the engines' own time:

* ``merged``: one engine (the whole ensemble in one graph), one stream.
* ``members``: 5 engines, one stream each, fanned out by the event.
* ``pageable``: the merged copy from an ordinary numpy array instead of pinned
  memory, for contrast: why the backend allocates pinned buffers.

Each runs with every CUDA flavour installed (cuda-python, pycuda): their
per-call overheads differ, and JetPack images may carry either.
"""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.cuda

MEMBERS = 5
FRAME = (1, 640, 640, 3)
CLASSES = 2
# the output shapes of one tiled member: (batch, classes), (batch, 16 patches, classes), (batch, 20, 20, classes)
OUTPUT_SHAPES = [(1, CLASSES), (1, 16, CLASSES), (1, 20, 20, CLASSES)]


@pytest.fixture(scope="module", params=["cuda-python", "pycuda"])
def cuda(request):
    from edge.backends.tensorrt_backend import CudaRuntime, cuda_flavours

    if request.param not in cuda_flavours():
        pytest.skip(f"{request.param} is not installed")
    runtime = CudaRuntime(request.param)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def frame(real_inputs) -> np.ndarray:
    return np.ascontiguousarray(real_inputs[:1], dtype=np.float32)  # CMU-1 frame 1, preprocessed


def _setup(cuda, frame, members: int, pinned: bool = True):
    host_in = cuda.pinned(FRAME, np.float32) if pinned else np.empty(FRAME, np.float32)
    host_in[...] = frame
    device_in = cuda.device(host_in.nbytes)
    streams = [cuda.stream() for _ in range(members)]
    done = [cuda.event() for _ in range(members)]
    ready = cuda.event()
    outputs = []
    for _ in range(members):
        # device outputs filled from the input's first bytes, so each copy back moves real data
        outputs.append([(device_in, cuda.pinned(shape, np.float32)) for shape in OUTPUT_SHAPES])
    return host_in, device_in, streams, done, ready, outputs


def _one_frame(cuda, host_in, device_in, streams, done, ready, outputs):
    first = streams[0]
    cuda.htod(device_in, host_in, host_in.nbytes, first)
    cuda.record(ready, first)
    for i, stream in enumerate(streams):
        if i:
            cuda.wait(stream, ready)
        for ptr, host in outputs[i]:
            cuda.dtoh(host, ptr, host.nbytes, stream)
        if i:
            cuda.record(done[i], stream)
            cuda.wait(first, done[i])
    cuda.synchronize(first)


@pytest.mark.benchmark(group="cuda-transfers")
@pytest.mark.parametrize("layout", ["merged", "members", "pageable"])
def test_backend_transfers(benchmark, cuda, frame, layout):
    members = MEMBERS if layout == "members" else 1
    parts = _setup(cuda, frame, members, pinned=layout != "pageable")
    benchmark(_one_frame, cuda, *parts)
    # what came back is the frame's first values, on every member's stream
    expected = frame.reshape(-1)
    for member_outputs in parts[-1]:
        for _ptr, host in member_outputs:
            np.testing.assert_array_equal(host.reshape(-1), expected[: host.size])
