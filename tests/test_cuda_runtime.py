"""``CudaRuntime``, the CUDA calls of the TensorRT backend
(edge/backends/tensorrt_backend.py), and ``run_members``, its per-batch
sequence, on a real GPU: pinned and device buffers, one stream per ensemble
member, the event that makes every member's stream wait for the one input
copy, async copies both ways, chunking and averaging, errors named, memory
given back. Marked ``cuda``: needs an NVIDIA GPU and cuda-python (or
pycuda) but not TensorRT, so it also runs where TensorRT cannot be installed.
Each test runs once per CUDA flavour installed (cuda-python, pycuda), since
JetPack images may carry either. The backend's engine calls are covered by
the ``gpu`` tests."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from armscope.core.errors import ArmscopeError
from armscope.edge.backends.tensorrt_backend import FLAVOURS, CudaRuntime, cuda_flavours
from armscope.calibration.trt_build import gpu_info

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


class CopyEngine:
    """Stands in for a TensorRT engine in ``run_members``, where TensorRT is not
    installed: on the member's own stream it reads the first two values of each
    image back from the device copy of the input (so it sees this batch only if
    its stream waited for the upload) and writes them to ``probs``, and writes
    the member's own constant (index + 1) to ``patch_probs`` and ``cam``. All of
    it is stream-ordered copies through pinned memory, nothing on the host."""

    def __init__(self, cuda: CudaRuntime, index: int, max_batch: int, input_ptr: int, image_shape: tuple):
        self.stream, self.done, self.max_batch = cuda.stream(), cuda.event(), max_batch
        self.input_ptr, self.image_bytes = input_ptr, int(np.prod(image_shape)) * 4
        shapes = {"probs": (max_batch, 2), "patch_probs": (max_batch, 16, 2), "cam": (max_batch, 20, 20, 2)}
        self.outputs, self.constants = {}, {}
        for name, shape in shapes.items():
            host = cuda.pinned(shape, np.float32)
            host[...] = np.nan
            self.outputs[name] = (cuda.device(host.nbytes), host)
            self.constants[name] = cuda.pinned(shape, np.float32)
            self.constants[name][...] = index + 1
        self.scratch = cuda.pinned((max_batch, 2), np.float32)

    def enqueue(self, cuda: CudaRuntime, shape: tuple) -> None:
        n = shape[0]
        for row in range(n):
            cuda.dtoh(self.scratch[row], self.input_ptr + row * self.image_bytes, 8, self.stream)
        cuda.htod(self.outputs["probs"][0], self.scratch, self.scratch[:n].nbytes, self.stream)
        for name in ("patch_probs", "cam"):
            const = self.constants[name]
            cuda.htod(self.outputs[name][0], const, const[:n].nbytes, self.stream)


@pytest.mark.parametrize("members", [1, MEMBERS])
def test_run_members_sequence_on_the_gpu(cuda, real_inputs, members):
    """The TensorRT backend's per-batch sequence (``run_members``, both layouts:
    one member = merged, five = members) with copy engines: every member sees
    the batch just uploaded, batches over ``max_batch`` run in chunks, and the
    outputs are the members' mean. Different images on every call, so a member
    stream that did not wait for the upload would read the previous batch."""
    from armscope.edge.backends.tensorrt_backend import run_members

    max_batch, shape = 2, real_inputs.shape[1:]
    host_input = cuda.pinned((max_batch, *shape), np.float32)
    input_ptr = cuda.device(host_input.nbytes)
    engines = [CopyEngine(cuda, i, max_batch, input_ptr, shape) for i in range(members)]
    assert len({cuda.handle(e.stream) for e in engines}) == members  # one stream each
    ready = cuda.event()
    rng = np.random.default_rng(0)
    for batch in (1, 2, 5):  # 5 runs as chunks of 2, 2, 1
        images = real_inputs[rng.choice(len(real_inputs), batch)] + rng.normal(0, 1, (batch, 1, 1, 1)).astype(np.float32)
        out = run_members(cuda, engines, host_input, input_ptr, ready, images)
        # the mean of identical float32 values, rounded: equal within float32's precision
        np.testing.assert_allclose(out["probs"], images.reshape(batch, -1)[:, :2], rtol=1e-6)
        expected = (members + 1) / 2  # mean of the members' constants 1..members
        assert out["patch_probs"].shape == (batch, 16, 2) and out["cam"].shape == (batch, 20, 20, 2)
        np.testing.assert_allclose(out["patch_probs"], expected)
        np.testing.assert_allclose(out["cam"], expected)
    with pytest.raises(ArmscopeError, match=r"input batch of shape \(1, 320, 320, 3\): expected \(N, 640, 640, 3\)"):
        run_members(cuda, engines, host_input, input_ptr, ready, np.zeros((1, 320, 320, 3), np.float32))


def test_a_captured_copy_replays_and_its_graph_goes_first(cuda):
    """The CUDA-graph calls the TensorRT backend makes around ``execute_async_v3``
    (cuda-python only; pycuda reports them unsupported): a stream-ordered copy is
    captured, the graph replays it on new data, ``destroy_graphs`` frees the graph
    before the buffers it references, and ``close`` still frees the rest."""
    if not cuda.graphs_supported:
        assert cuda.flavour == "pycuda"
        pytest.skip("stream capture is driven through cuda-python only")
    src, dst = cuda.pinned((256,), np.uint8), cuda.pinned((256,), np.uint8)
    device = cuda.device(256)
    stream = cuda.stream()
    cuda.begin_capture(stream)
    cuda.htod(device, src, 256, stream)
    cuda.dtoh(dst, device, 256, stream)
    graph = cuda.end_capture(stream, True)
    assert graph is not None
    for value in (7, 201):   # replays read the pinned source as it is now
        src[:] = value
        cuda.launch(graph, stream)
        cuda.synchronize(stream)
        assert (dst == value).all()
    cuda.destroy_graphs()
    assert not any(kind.startswith("graph") for kind, _ in cuda._allocations)
    assert any(kind == "device" for kind, _ in cuda._allocations)


def test_run_members_takes_uint8_crops(cuda):
    """feed uint8: the input buffer is uint8 and ``run_members`` uploads the crops as
    they are (no float32 conversion), 3 bytes a pixel."""
    from armscope.edge.backends.tensorrt_backend import run_members

    shape = (1, 64, 64, 3)
    host_input = cuda.pinned(shape, np.uint8)
    input_ptr = cuda.device(host_input.nbytes)
    engine = CopyEngine(cuda, 0, 1, input_ptr, (16, 16, 3))   # reads the first 8 bytes of the upload back
    crop = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = run_members(cuda, [engine], host_input, input_ptr, cuda.event(), crop)
    np.testing.assert_array_equal(out["probs"][0].view(np.uint8), crop.reshape(-1)[:8])
