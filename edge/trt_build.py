"""``armscope build``: TensorRT engines for a bundle, built on the target device.

One engine per member and one for the merged ensemble (the backend's two
layouts), with a shared timing cache (``engines/timing.cache``) so rebuilding
after a bundle update takes seconds instead of minutes. Precision, by
installed TensorRT version:

* TensorRT 10.x: FP32 as is; FP16 with ``BuilderFlag.FP16`` (TensorRT picks FP16
  kernels where faster); INT8 *explicit*: the bundle is the Q/DQ ONNX made by
  ``armscope quantize`` and TensorRT honours its scales (``BuilderFlag.INT8``
  plus FP16 for the layers kept in float); INT8 *implicit* (``--int8-mode
  implicit``, JetPack/TensorRT 10.x only, deprecated by NVIDIA): the FP32 graph
  with ``IInt8EntropyCalibrator2`` fed from ``--calib CALIB.npz`` and a
  calibration cache per graph (``engines/<graph>.calib``).
* TensorRT >= 11 (weak typing removed): a strongly typed network; the
  precision comes from the ONNX (FP16 graph from ``armscope quantize
  --precision fp16``, Q/DQ graph for INT8), no precision flags.

Without a GPU (or without TensorRT) the command prepares what can be prepared
here (the FP16 or Q/DQ bundle, via ``calibration.quantize``) and says that the
engines are built on the target with the same command.

The manifest records, per engine, the TensorRT version, GPU name, compute
capability, precision and sha256; the TensorRT backend refuses engines built
for another version or GPU.
"""
from __future__ import annotations

import datetime as dt
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np

from armscope.bundle import Bundle, load_bundle, refuse_cascade, sha256_file, staged_directory, write_manifest
from armscope.errors import ArmscopeError, require_module

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
ENGINE_DIR = "engines"
TIMING_CACHE = "timing.cache"
CALIB_CACHE_HEADER = "TRT-"  # TensorRT calibration caches start "TRT-<version>-EntropyCalibration2"


# JetPack installs TensorRT's Python module system-wide (apt), and pip has no Jetson wheels for it
JETSON_TENSORRT = ("on a Jetson it comes with JetPack (apt package python3-libnvinfer): "
                   "make the venv with --system-site-packages")


def require_tensorrt(purpose: str):
    return require_module("tensorrt", "gpu", purpose, JETSON_TENSORRT)


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # ImportError, or a broken install raising OSError on its .so
        return False
    return True


def import_cudart():
    """cuda-python's runtime module, under its current name or (cuda-python < 12.6) its old one."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    return cudart


def gpu_info() -> dict | None:
    """{'name', 'compute_capability'} of GPU 0, or None without one (cuda-python,
    then pycuda, then nvidia-smi)."""
    try:
        cudart = import_cudart()
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count < 1:
            return None
        err, prop = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
            return {"name": name.strip("\x00 "), "compute_capability": f"{prop.major}.{prop.minor}"}
    except Exception:
        pass
    try:
        import pycuda.driver as driver

        driver.init()
        if driver.Device.count() < 1:
            return None
        device = driver.Device(0)
        major, minor = device.compute_capability()
        return {"name": device.name(), "compute_capability": f"{major}.{minor}"}
    except Exception:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            name, cap = [s.strip() for s in out.stdout.strip().splitlines()[0].split(",")]
            return {"name": name, "compute_capability": cap}
    except Exception:
        pass
    return None


def trt_major(version: str) -> int:
    return int(version.split(".")[0])


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
    from edge.backends.tensorrt_backend import CudaRuntime

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

def build_engine(trt, onnx_path: Path, engine_path: Path, precision: str, *, workspace_mb: int,
                 timing_cache: Path, input_shape: tuple[int, int, int], dla_core: int | None = None,
                 max_batch: int = 1, calibrator=None, explicit_int8: bool = True) -> None:
    """Parse one ONNX graph and serialise an engine (see the module docstring for the flags).
    ``input_shape``: (S, S, 3) from the bundle's manifest (``inputs[0].shape``), so the
    optimisation profile fits any input size the bundle was exported for."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = trt_major(trt.__version__)
    # TensorRT 11 removed weak typing: every network is strongly typed, precision comes from the ONNX
    # (its STRONGLY_TYPED creation flag is kept only as a deprecated no-op, so it is not passed);
    # TensorRT 10 builds weakly typed networks with the FP16/INT8 flags below.
    strongly_typed = major >= 11
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArmscopeError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors[:500]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
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
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArmscopeError(f"{onnx_path}: TensorRT could not build an engine (precision {precision}); "
                            "see the TensorRT log above")
    engine_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))


def prepare_onnx(bundle: Bundle, precision: str, calib: Path | None, out: Path | None, int8_mode: str,
                 force: bool, holdout: list[Path] | None = None) -> Bundle:
    """The bundle whose graphs TensorRT compiles: this one if it already has the
    precision (or the precision comes from builder flags), else a derived FP16
    or Q/DQ bundle written next to it (``<bundle>-<precision>``)."""
    have = bundle.manifest["precision"]
    if precision == have or precision == "fp32":
        if precision != have:
            raise ArmscopeError(f"{bundle.root}: field precision: bundle is {have}; --precision fp32 needs the "
                                "FP32 bundle")
        return bundle
    if have != "fp32":
        raise ArmscopeError(f"{bundle.root}: field precision: bundle is {have}, cannot make {precision} from it; "
                            f"use the FP32 bundle")
    if precision == "int8" and int8_mode == "implicit":
        if calib is None:
            raise ArmscopeError("--int8-mode implicit needs --calib CALIB.npz")
        return bundle  # TensorRT calibrates the FP32 graph itself
    from calibration.quantize import make_reduced_bundle

    target = out or bundle.root.with_name(f"{bundle.root.name}-{precision}")
    if precision == "int8" and calib is None:
        raise ArmscopeError("--precision int8 needs --calib CALIB.npz to make the Q/DQ graphs "
                            "(or pass a bundle made by 'armscope quantize')")
    block = make_reduced_bundle(bundle.root, target, precision, calib=calib, holdout=holdout, force=force)
    print(f"wrote {precision} bundle {target} (deployable: {block['deployable']})")
    return load_bundle(target)


def build_bundle(bundle_dir: Path, precision: str, calib: Path | None = None, workspace_mb: int = 2048,
                 dla_core: int | None = None, out: Path | None = None, int8_mode: str = "explicit",
                 max_batch: int = 1, force: bool = False, holdout: list[Path] | None = None) -> dict:
    """Returns {'bundle': path, 'engines': [...] or None, 'message': str}."""
    if precision not in PRECISIONS:
        raise ArmscopeError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if int8_mode not in ("explicit", "implicit"):
        raise ArmscopeError(f"--int8-mode {int8_mode!r}: expected explicit or implicit")
    bundle = load_bundle(bundle_dir)
    refuse_cascade(bundle, "armscope build")
    calib_set = None
    if calib is not None:
        from calibration.calibration_set import load_calibration_set

        calib_set = load_calibration_set(calib, spec=bundle.preprocessing)  # fail early on a bad set
    gpu = gpu_info() if tensorrt_available() else None
    if gpu is None and dla_core is not None:
        raise ArmscopeError("--dla: no NVIDIA GPU/DLA here; DLA engines are built on the Jetson itself")
    target = prepare_onnx(bundle, precision, calib, out, int8_mode, force, holdout)
    if gpu is None:
        why = "TensorRT is not installed" if not tensorrt_available() else "no NVIDIA GPU was found"
        cmd = f"armscope build {target.root} --precision {precision}"
        if precision == "int8" and int8_mode == "implicit":
            cmd += f" --int8-mode implicit --calib {calib}"
        return {"bundle": str(target.root), "engines": None,
                "message": f"{why}: engines are built on the target device with: {cmd}"}

    trt = require_tensorrt("armscope build")
    major = trt_major(trt.__version__)
    implicit = precision == "int8" and int8_mode == "implicit"
    if implicit and major >= 11:
        raise ArmscopeError(f"--int8-mode implicit: TensorRT {trt.__version__} has no implicit INT8; make a Q/DQ "
                            "bundle with 'armscope quantize' and build with --int8-mode explicit")
    if major >= 11 and precision == "fp16" and target.manifest["precision"] != "fp16":
        raise ArmscopeError(f"{target.root}: TensorRT {trt.__version__} builds strongly typed networks; "
                            "FP16 needs the FP16 ONNX bundle (armscope quantize --precision fp16)")
    graphs = [("ensemble", target.ensemble_path)] + [
        (f"member_{i}", p) for i, p in enumerate(target.member_paths)]
    built = []
    shape = tuple(target.manifest["inputs"][0]["shape"][1:])
    with staged_directory(target.root, overwrite=True) as stage:
        for item in target.root.iterdir():  # copy the bundle, then add engines to the copy
            if item.name == ENGINE_DIR:
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, stage / item.name)
        engines = stage / ENGINE_DIR
        engines.mkdir()
        old_cache = target.root / ENGINE_DIR / TIMING_CACHE
        if old_cache.is_file():
            shutil.copy2(old_cache, engines / TIMING_CACHE)
        for graph, onnx_path in graphs:
            calibrator = None
            if implicit:
                calib_cache = engines / f"{graph}.calib"
                old = target.root / ENGINE_DIR / calib_cache.name
                if old.is_file():
                    read_calibration_cache(old)
                    shutil.copy2(old, calib_cache)
                calibrator = make_entropy_calibrator(trt, calib_set.images, calib_cache)
            file = f"{ENGINE_DIR}/{graph}.{precision}.engine"
            log.info("building %s (%s) ...", file, precision)
            build_engine(trt, stage / onnx_path.relative_to(target.root), stage / file, precision,
                         workspace_mb=workspace_mb, timing_cache=engines / TIMING_CACHE, dla_core=dla_core,
                         max_batch=max_batch, calibrator=calibrator, explicit_int8=not implicit, input_shape=shape)
            built.append({
                "file": file, "sha256": sha256_file(stage / file), "graph": graph, "precision": precision,
                "tensorrt": trt.__version__, "gpu": gpu["name"], "compute_capability": gpu["compute_capability"],
                "int8_mode": int8_mode if precision == "int8" else None, "dla_core": dla_core,
                "max_batch": max_batch, "workspace_mb": workspace_mb,
                "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            })
        manifest = dict(target.manifest)
        manifest["engines"] = built  # engines for another device/version are replaced, not kept
        write_manifest(stage, manifest)
        load_bundle(stage)
    return {"bundle": str(target.root), "engines": built,
            "message": f"built {len(built)} engine(s) for {gpu['name']} (sm {gpu['compute_capability']}), "
                       f"TensorRT {trt.__version__}, {precision}"}
