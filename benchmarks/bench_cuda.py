"""The TensorRT backend's CUDA work around its engines, per frame, on a real GPU.

Run:  python -m pytest benchmarks/bench_cuda.py --benchmark-only
Marked ``cuda``: needs an NVIDIA GPU and cuda-python (or pycuda), not TensorRT,
so it also measures a machine where TensorRT cannot be installed.

``TensorRTBackend.infer`` (edge/backends/tensorrt_backend.py) runs
``run_members``, measured here with members that have no engine: copy the preprocessed frame
(1 x 640 x 640 x 3 float32, 4.9 MB) from pinned memory to the device on the
first stream, record an event, make every other member's stream wait for it,
run each member's engine, copy each member's outputs (probs, patch_probs, cam)
back on its own stream, make the first stream wait for all of them, and
synchronise once, then average the members' outputs on the host. With no
engines, the medians are the floor the backend adds to the engines' own time:

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

from armscope.edge.backends.base import OUTPUTS

pytestmark = pytest.mark.cuda

MEMBERS = 5
FRAME = (1, 640, 640, 3)
CLASSES = 2
# the output shapes of one tiled member: (batch, classes), (batch, 16 patches, classes), (batch, 20, 20, classes)
OUTPUT_SHAPES = [(1, CLASSES), (1, 16, CLASSES), (1, 20, 20, CLASSES)]


@pytest.fixture(scope="module", params=["cuda-python", "pycuda"])
def cuda(request):
    from armscope.edge.backends.tensorrt_backend import CudaRuntime, cuda_flavours

    if request.param not in cuda_flavours():
        pytest.skip(f"{request.param} is not installed")
    runtime = CudaRuntime(request.param)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def frame(real_inputs) -> np.ndarray:
    return np.ascontiguousarray(real_inputs[:1], dtype=np.float32)  # CMU-1 frame 1, preprocessed


class NoEngine:
    """A member without an engine: ``run_members`` copies its outputs back
    from the device input's first bytes, so every copy moves real data."""

    def __init__(self, cuda, input_ptr: int):
        self.stream, self.done, self.max_batch = cuda.stream(), cuda.event(), 1
        self.outputs = {name: (input_ptr, cuda.pinned(shape, np.float32))
                        for name, shape in zip(OUTPUTS, OUTPUT_SHAPES)}

    def enqueue(self, cuda, shape) -> None:
        pass


@pytest.mark.benchmark(group="cuda-transfers")
@pytest.mark.parametrize("layout", ["merged", "members", "pageable"])
def test_backend_transfers(benchmark, cuda, frame, layout):
    """``run_members``, the backend's own per-frame function, with no engines."""
    from armscope.edge.backends.tensorrt_backend import run_members

    host_input = cuda.pinned(FRAME, np.float32) if layout != "pageable" else np.empty(FRAME, np.float32)
    input_ptr = cuda.device(host_input.nbytes)
    members = [NoEngine(cuda, input_ptr) for _ in range(MEMBERS if layout == "members" else 1)]
    out = benchmark(run_members, cuda, members, host_input, input_ptr, cuda.event(), frame)
    # what came back is the frame's first values, averaged over the members
    for name in OUTPUTS:
        expected = frame.reshape(-1)[: out[name].size].reshape(out[name].shape)
        np.testing.assert_allclose(out[name], expected, rtol=1e-6)
