"""One ONNX graph -> one serialised TensorRT engine (``build_engine``), and
what a build reads and writes beside it: the timing cache, the INT8
calibration cache and the entropy calibrator (TensorRT 10 implicit INT8).
``armscope.calibration.trt_build`` decides which graphs to build, with which
precision and where they go; this module only compiles, in the order of
TensorRT's ``build_engine.py`` samples: builder, network from the ONNX
parser, config flags, optimisation profile, timing cache, serialise.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from armscope.core.errors import ArmscopeError
from armscope.gpu.trt_env import strongly_typed_only, trt_logger, trt_major

log = logging.getLogger(__name__)

CALIB_CACHE_HEADER = "TRT-"  # TensorRT calibration caches start "TRT-<version>-EntropyCalibration2"


# ----------------------------------------------------------------------------- caches

def read_timing_cache(path: Path) -> bytes:
    if not path.is_file():
        return b""
    data = path.read_bytes()
    if not data:
        raise ArmscopeError(f"{path}: empty TensorRT timing cache; delete it to start a fresh one")
    return data


def read_calibration_cache(path: Path) -> bytes | None:
    """A TensorRT INT8 calibration cache, checked before TensorRT sees it: a
    header line, then 'tensor: hexscale' lines."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        lines = data.decode("ascii").splitlines()
    except UnicodeDecodeError:
        lines = []
    ok = bool(lines) and lines[0].startswith(CALIB_CACHE_HEADER) and all(
        ":" in line and _is_hex(line.rsplit(":", 1)[1].strip()) for line in lines[1:] if line.strip())
    if not ok or len(lines) < 2:
        raise ArmscopeError(f"{path}: corrupt TensorRT calibration cache (expected a '{CALIB_CACHE_HEADER}...' "
                            f"header and 'tensor: hexscale' lines); delete it and rebuild with --calib")
    return data


def _is_hex(s: str) -> bool:
    try:
        int(s, 16)
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------- calibrator (implicit INT8)

def make_entropy_calibrator(trt, images: np.ndarray, cache_path: Path, batch: int = 1):
    """IInt8EntropyCalibrator2 over the calibration frames (TensorRT 10.x implicit INT8)."""
    from armscope.edge.backends.tensorrt_backend import CudaRuntime

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.cuda = CudaRuntime()
            self.images = np.ascontiguousarray(images, dtype=np.float32)
            self.batch = batch
            self.index = 0
            self.host = self.cuda.pinned((batch, *self.images.shape[1:]), np.float32)
            self.device = self.cuda.device(self.host.nbytes)
            self.stream = self.cuda.stream()

        def get_batch_size(self):
            return self.batch

        def get_batch(self, names):
            if self.index + self.batch > len(self.images):
                return None
            self.host[:] = self.images[self.index : self.index + self.batch]
            self.cuda.htod(self.device, self.host, self.host.nbytes, self.stream)
            self.cuda.synchronize(self.stream)
            self.index += self.batch
            return [self.device]

        def read_calibration_cache(self):
            return read_calibration_cache(cache_path)

        def write_calibration_cache(self, cache):
            cache_path.write_bytes(bytes(cache))

    return EntropyCalibrator()


# ----------------------------------------------------------------------------- building

def fp32_layers(trt, network, prefix: str) -> list[int]:
    """Indices of the layers of ``network`` that belong to the uint8 front (a
    layer named ``prefix...``, or one whose output is): those with float32
    outputs, but not the ``Cast`` from uint8 (its input is uint8, and it is
    exact in any precision) nor layers making shape tensors."""
    found = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        inputs = [t for t in (layer.get_input(j) for j in range(layer.num_inputs)) if t is not None]
        # a layer the parser adds inside a front node (its own name) still reads or writes the front's tensors
        if not (layer.name.startswith(prefix) or any(t.name.startswith(prefix) for t in outputs + inputs)):
            continue
        if layer.type == trt.LayerType.CAST or any(t.dtype != trt.float32 for t in outputs):
            continue
        found.append(i)
    return found


def keep_front_fp32(trt, network, config, prefix: str) -> int:
    """TensorRT 10 (weakly typed) FP16/INT8 builds: the front's layers run in
    FP32 (``ILayer.precision`` and every output type float32, obeyed with
    ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS``), so the uint8 crop becomes the
    same pixels as on the CPU. Returns how many layers were pinned."""
    pinned = fp32_layers(trt, network, prefix)
    for i in pinned:
        layer = network.get_layer(i)
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
    if pinned:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    return len(pinned)


def build_engine(trt, onnx_path: Path, engine_path: Path, precision: str, *, workspace_mb: int,
                 timing_cache: Path, input_shape: tuple[int, int, int], dla_core: int | None = None,
                 max_batch: int = 1, calibrator=None, explicit_int8: bool = True,
                 front_prefix: str | None = None, tf32: bool = True) -> None:
    """Parse one ONNX graph and serialise an engine (see the module docstring for the flags).
    ``input_shape``: (S, S, 3) from the bundle's manifest (``inputs[0].shape``), or the
    camera crop (C, C, 3) for a graph behind the uint8 front, so the optimisation
    profile fits any input size the bundle was exported for. ``front_prefix``: the
    uint8 front's names in the graph (kept FP32); ``tf32=False`` clears ``BuilderFlag.TF32``."""
    logger = trt_logger()  # the process's one logger (armscope.gpu.trt_env)
    builder = trt.Builder(logger)
    # TensorRT 11 removed weak typing: every network is strongly typed, precision comes from the ONNX
    # (its STRONGLY_TYPED creation flag is kept only as a deprecated no-op, so it is not passed);
    # TensorRT 10 builds weakly typed networks with the FP16/INT8 flags below.
    strongly_typed = strongly_typed_only(trt.__version__)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArmscopeError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors[:500]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)   # on by default: FP32 matrix products with 10-bit operands
    if front_prefix and not strongly_typed and precision in ("fp16", "int8"):
        log.info("%s: %d uint8-front layers kept in FP32", onnx_path.name,
                 keep_front_fp32(trt, network, config, front_prefix))
    if not strongly_typed:
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            if not explicit_int8:
                config.int8_calibrator = calibrator  # deprecated since 10.1, removed in 11
    if dla_core is not None:
        if precision == "fp32":
            raise ArmscopeError("--dla needs --precision fp16 or int8 (DLA has no FP32)")
        if int(dla_core) >= builder.num_DLA_cores:
            none = (f" (TensorRT {trt.__version__} has no DLA support: DLA is in TensorRT 10.x up to 10.7, "
                    "JetPack 6's)" if builder.num_DLA_cores == 0 and trt_major(trt.__version__) >= 11 else "")
            raise ArmscopeError(f"--dla {dla_core}: this device has {builder.num_DLA_cores} DLA core(s){none}")
        # IBuilderConfig: layers go to DLA core N; those DLA cannot run fall back to the GPU
        # (GPU_FALLBACK, recorded as engine.json "gpu_fallback"); the runtime must then set
        # IRuntime.DLA_core to the same core before deserializing (tensorrt_backend).
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    profile = builder.create_optimization_profile()
    profile.set_shape(network.get_input(0).name, (1, *input_shape), (1, *input_shape), (max_batch, *input_shape))
    config.add_optimization_profile(profile)
    if not explicit_int8 and precision == "int8":
        config.set_calibration_profile(profile)
    cache = config.create_timing_cache(read_timing_cache(timing_cache))
    if cache is None:
        raise ArmscopeError(f"{timing_cache}: TensorRT rejected this timing cache; delete it and rebuild")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # made on a device with other CUDA properties, or by another TensorRT (IBuilderConfig::setTimingCache
        # returns false): time afresh, and the cache written below replaces it
        log.warning("%s: timing cache from another device or TensorRT version; timing afresh", timing_cache)
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise ArmscopeError(f"{timing_cache}: TensorRT could not start an empty timing cache")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArmscopeError(f"{onnx_path}: TensorRT could not build an engine (precision {precision}); "
                            "see the TensorRT log above")
    engine_path.write_bytes(bytes(serialized))
    used = config.get_timing_cache()
    if used is not None:
        timing_cache.write_bytes(bytes(used.serialize()))
