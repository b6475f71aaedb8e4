"""``armscope build``: TensorRT engines for a bundle, built on the target device,
stored with the bundle where ``run``/``classify --backend auto`` find them
(``BUNDLE/engines/<key>/``, see ``armscope.gpu.engines`` for the key and layout).

Only the layout that will run is built: one engine per member (the default,
what the backend runs: the members concurrently on their own streams), or,
with ``--layout merged``, one engine for the merged ensemble graph. A timing
cache shared by every build on the device (``BUNDLE/engines/timing.cache``)
makes a rebuild after a bundle update take seconds instead of minutes.
Precision, by installed TensorRT version (``armscope.gpu.trt_env``):

* TensorRT 10.x: FP32 as is; FP16 with ``BuilderFlag.FP16`` (TensorRT picks FP16
  kernels where faster); INT8 *explicit*: the Q/DQ ONNX made by ``armscope
  quantize`` (TensorRT honours its scales; ``BuilderFlag.INT8`` plus FP16 for
  the layers kept in float); INT8 *implicit* (``--int8-mode implicit``,
  TensorRT 10.x only, deprecated by NVIDIA): the FP32 graph with
  ``IInt8EntropyCalibrator2`` fed from ``--calib CALIB.npz`` and a
  calibration cache per graph (``<key>/<graph>.calib``).
* TensorRT >= 11 (weak typing removed): a strongly typed network; the
  precision comes from the ONNX (FP16 graph from ``armscope quantize
  --precision fp16``, Q/DQ graph for INT8), no precision flags.

FP16 and explicit INT8 compile a derived bundle (``BUNDLE-fp16``,
``BUNDLE-int8``, or ``--out``): made here if missing, reused if it was made
from this bundle (so it can be prepared on a workstation and copied to the
device with the bundle), and refused if it failed its accuracy gate. The
engines still go into ``BUNDLE``, keyed by ``BUNDLE``'s hash.

``--feed uint8``: engines that take the camera crop as uint8 (the bundle's
uint8 front, ``armscope front``, composed in front of each graph before
TensorRT parses it; ``run``/``classify --feed uint8`` use them). The front
must make the same pixels as the CPU preprocessing, so its layers are kept in
FP32 in FP16/INT8 builds (layer precision + ``OBEY_PRECISION_CONSTRAINTS`` on
TensorRT 10; a strongly typed TensorRT 11 network keeps the ONNX's FP32), and
TF32 (TensorRT's default for FP32 matrix products) is switched off for the
build unless the front's weights are exact in TF32 (``front.tf32_exact``:
INTER_AREA at 1024 -> 640 is).

Without a GPU (or without TensorRT) the command prepares what can be prepared
here (the FP16 or Q/DQ bundle) and prints the command that builds the engines
on the target.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from armscope.calibration.trt_engine import (  # noqa: F401  (read_calibration_cache re-exported)
    build_engine, make_entropy_calibrator, read_calibration_cache,
)
from armscope.gpu.engines import (
    ENGINE_DIR, FEEDS, LAYOUTS, TIMING_CACHE, build_command, engine_key, graphs_for, new_index, write_index,
)
from armscope.gpu.trt_env import (  # noqa: F401  (re-exported: callers import them from here)
    JETSON_TENSORRT, gpu_info, import_cudart, require_tensorrt, strongly_typed_only, tensorrt_available, trt_logger,
    trt_major,
)

from armscope.core import front
from armscope.core.bundle import Bundle, load_bundle, refuse_cascade, require_deployable, sha256_file, staged_directory
from armscope.core.errors import ArmscopeError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")


def derived_from(candidate: Path, source: Bundle, precision: str) -> Bundle | None:
    """The bundle at ``candidate`` if it is a ``precision`` bundle made from ``source``
    (its manifest's quantization.source.ensemble_sha256), else None."""
    if not (candidate / "manifest.json").is_file():
        return None
    derived = load_bundle(candidate)
    made_from = derived.manifest.get("quantization", {}).get("source", {}).get("ensemble_sha256")
    if derived.manifest["precision"] == precision and made_from == source.manifest["ensemble"]["sha256"]:
        return derived
    return None


def prepare_onnx(bundle: Bundle, precision: str, calib: Path | None, out: Path | None, int8_mode: str,
                 force: bool, holdout: list[Path] | None = None) -> Bundle:
    """The bundle whose graphs TensorRT compiles: this one if it already has the
    precision (or the precision comes from builder flags), else a derived FP16
    or Q/DQ bundle next to it (``<bundle>-<precision>`` or ``out``): reused when
    it was made from this bundle (unless ``force``), else made here."""
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
    target = Path(out) if out else bundle.root.with_name(f"{bundle.root.name}-{precision}")
    existing = None if force else derived_from(target, bundle, precision)
    if existing is not None:
        print(f"using the {precision} bundle {target} made from {bundle.root} earlier (--force remakes it)")
        return existing
    from armscope.calibration.quantize import make_reduced_bundle

    if precision == "int8" and calib is None:
        raise ArmscopeError("--precision int8 needs --calib CALIB.npz to make the Q/DQ graphs "
                            "(or pass a bundle made by 'armscope quantize')")
    block = make_reduced_bundle(bundle.root, target, precision, calib=calib, holdout=holdout, force=force)
    print(f"wrote {precision} bundle {target} (deployable: {block['deployable']})")
    return load_bundle(target)


def build_bundle(bundle_dir: Path, precision: str, calib: Path | None = None, workspace_mb: int = 2048,
                 dla_core: int | None = None, out: Path | None = None, int8_mode: str = "explicit",
                 max_batch: int = 1, force: bool = False, holdout: list[Path] | None = None,
                 layout: str = "members", feed: str = "float32") -> dict:
    """Returns {'bundle': path, 'compiled': path, 'engines': engines/<key> path or None, 'message': str}."""
    if precision not in PRECISIONS:
        raise ArmscopeError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if int8_mode not in ("explicit", "implicit"):
        raise ArmscopeError(f"--int8-mode {int8_mode!r}: expected explicit or implicit")
    if layout not in LAYOUTS:
        raise ArmscopeError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if feed not in FEEDS:
        raise ArmscopeError(f"--feed {feed!r}: expected one of {', '.join(FEEDS)}")
    bundle = load_bundle(bundle_dir)
    refuse_cascade(bundle, "armscope build")
    if feed == "uint8":
        front.require(bundle, feed)
        if precision == "int8" and int8_mode == "implicit":
            raise ArmscopeError("--feed uint8 with --int8-mode implicit: the calibrator feeds float32 frames to "
                                "the graph's 'image' input; use --int8-mode explicit (the Q/DQ bundle)")
    calib_set = None
    if calib is not None:
        from armscope.calibration.calibration_set import load_calibration_set

        calib_set = load_calibration_set(calib, spec=bundle.preprocessing)  # fail early on a bad set
    gpu = gpu_info() if tensorrt_available() else None
    if gpu is None and dla_core is not None:
        raise ArmscopeError("--dla: no NVIDIA GPU/DLA here; DLA engines are built on the Jetson itself")
    target = prepare_onnx(bundle, precision, calib, out, int8_mode, force, holdout)
    implicit = precision == "int8" and int8_mode == "implicit"
    if gpu is None:
        why = "TensorRT is not installed" if not tensorrt_available() else "no NVIDIA GPU was found"
        options = (f" --out {target.root}" if target is not bundle and out else "") + (
            f" --int8-mode implicit --calib {calib}" if implicit else "")
        cmd = build_command(bundle, precision, layout, feed, options)
        return {"bundle": str(bundle.root), "compiled": str(target.root), "engines": None,
                "message": f"{why}: engines are built on the target device (with {bundle.root}"
                           + (f" and {target.root}" if target is not bundle else "") + f") with: {cmd}"}
    if target is not bundle:
        try:
            require_deployable(target)   # engines of a model that failed its gate must never be found by run
        except ArmscopeError as exc:
            raise ArmscopeError(f"{exc}; no engines were built into {bundle.root}") from None

    trt = require_tensorrt("armscope build")
    if implicit and strongly_typed_only(trt.__version__):
        raise ArmscopeError(f"--int8-mode implicit: TensorRT {trt.__version__} has no implicit INT8; make a Q/DQ "
                            "bundle with 'armscope quantize' and build with --int8-mode explicit")
    if strongly_typed_only(trt.__version__) and precision == "fp16" and target.manifest["precision"] != "fp16":
        raise ArmscopeError(f"{target.root}: TensorRT {trt.__version__} builds strongly typed networks; "
                            "FP16 needs the FP16 ONNX bundle (armscope quantize --precision fp16)")
    onnx_of = {"ensemble": target.ensemble_path, **{f"member_{i}": p for i, p in enumerate(target.member_paths)}}
    graphs = graphs_for(target, layout)  # only the layout that will run
    shape = tuple(target.manifest["inputs"][0]["shape"][1:])
    tf32, composed_dir = True, None
    if feed == "uint8":  # each graph behind the bundle's uint8 front, as TensorRT will parse it
        import onnx

        shape = front.crop_shape(bundle.preprocessing)
        tf32, why = front.tf32_exact(onnx.load(str(bundle.root / front.entry(bundle)["file"])))
        print(f"uint8 front: {why}" + ("" if tf32 else "; TF32 off for this build (FP32 layers at full precision)"))
        composed_dir, paths = front.composed(bundle, [onnx_of[g] for g in graphs])
        onnx_of = dict(onnx_of, **dict(zip(graphs, paths)))
    engines_root = bundle.root / ENGINE_DIR
    key = engine_key(bundle.manifest["ensemble"]["sha256"], precision, trt.__version__, gpu, dla_core, feed)
    final = engines_root / key
    index = new_index(bundle, target, precision, trt.__version__, gpu, dla_core=dla_core,
                      int8_mode=int8_mode if precision == "int8" else None, max_batch=max_batch,
                      workspace_mb=workspace_mb, feed=feed, tf32=tf32)
    engines_root.mkdir(exist_ok=True)
    try:
        _build_set(trt, graphs, onnx_of, final, index, engines_root, key, precision, implicit, calib_set,
                   workspace_mb=workspace_mb, dla_core=dla_core, max_batch=max_batch, shape=shape, feed=feed,
                   tf32=tf32)
    finally:
        if composed_dir is not None:
            composed_dir.cleanup()
    built = sorted(index["engines"])
    return {"bundle": str(bundle.root), "compiled": str(target.root), "engines": str(final),
            "message": f"built {len(graphs)} engine(s) into {final} for {gpu['name']} (sm "
                       f"{gpu['compute_capability']}), TensorRT {trt.__version__}, {precision}"
                       + (", feed uint8" if feed == "uint8" else "") + f"; 'armscope run' / 'classify "
                       f"--backend auto{' --feed uint8' if feed == 'uint8' else ''}' with {bundle.root} use them"
                       + (f" (this set also holds {', '.join(g for g in built if g not in graphs)})"
                          if len(built) > len(graphs) else "")}


def _build_set(trt, graphs, onnx_of, final, index, engines_root, key, precision, implicit, calib_set, *,
               workspace_mb, dla_core, max_batch, shape, feed, tf32) -> None:
    """Build ``graphs`` into a staged copy of ``final`` and swap it in (with ``engine.json``)."""
    with staged_directory(final, overwrite=True) as stage:
        old = read_index_or_none(final)
        for graph in graphs:
            calibrator = None
            if implicit:
                calib_cache = stage / f"{graph}.calib"
                if (final / calib_cache.name).is_file():
                    read_calibration_cache(final / calib_cache.name)
                    shutil.copy2(final / calib_cache.name, calib_cache)
                calibrator = make_entropy_calibrator(trt, calib_set.images, calib_cache)
            file = f"{graph}.engine"
            log.info("building %s/%s (%s, %d of %d) ...", key, file, precision, graphs.index(graph) + 1, len(graphs))
            print(f"building {graph} ({precision}) ...", flush=True)
            try:
                build_engine(trt, onnx_of[graph], stage / file, precision, workspace_mb=workspace_mb,
                             timing_cache=engines_root / TIMING_CACHE, dla_core=dla_core, max_batch=max_batch,
                             calibrator=calibrator, explicit_int8=not implicit, input_shape=shape,
                             front_prefix=front.PREFIX if feed == "uint8" else None, tf32=tf32)
            finally:
                if calibrator is not None:
                    calibrator.cuda.close()
            index["engines"][graph] = {"file": file, "sha256": sha256_file(stage / file),
                                       "onnx_sha256": sha256_file(onnx_of[graph])}
        same_settings = old is not None and all(old.get(k) == index[k] for k in (
            "max_batch", "int8_mode", "format", "feed", "front_sha256", "tf32", "compiled_from"))
        if same_settings:
            # engines of the other layout built earlier under this key and with these settings stay usable
            for graph, entry in old["engines"].items():
                if graph not in index["engines"] and (final / entry["file"]).is_file():
                    shutil.copy2(final / entry["file"], stage / entry["file"])
                    index["engines"][graph] = entry
        write_index(stage, index)


def read_index_or_none(directory: Path) -> dict | None:
    from armscope.gpu.engines import read_index

    try:
        return read_index(directory)
    except ArmscopeError:
        return None   # a damaged index is replaced by the new build
