"""INT8 (explicit Q/DQ) and FP16 bundles from an FP32 bundle.

INT8: per member, ``onnxruntime.quantization.shape_inference.quant_pre_process``
then ``quantize_static`` (QuantFormat.QDQ, per-channel INT8 weights, a
selectable calibration method: MinMax, Entropy or Percentile) on the
calibration set; the quantized members are merged again with ``armscope.export.merge``
so the ensemble graph is exactly the members plus ``Mean``. Quantization is
symmetric (zero points 0) and biases stay FP32, which is what TensorRT's
explicit-quantization path accepts, so the same Q/DQ ONNX runs on ONNX Runtime
here and is compiled by ``armscope build --precision int8`` on the target. With
``--tool modelopt`` (NVIDIA ModelOpt, if installed) the members are quantized by
``modelopt.onnx.quantization.quantize`` instead (TensorRT's own Q/DQ placement rules).

Sensitive nodes (``armscope.calibration.graph``: the stem convs, the heads, the Grad-CAM
subgraph) can be kept in FP32. ``--keep-fp32 auto`` (default) quantizes both
ways, measures both against the FP32 bundle on the evaluation frames and keeps
the better one (fewer positive->negative flips, then higher top-1 agreement,
then lower max |delta p|; all-INT8 on a tie, being faster); both measurements
are recorded in the manifest's ``quantization.variants``.

Deployability: the bundle is marked ``quantization.deployable: true`` only if,
on a hold-out set (``--holdout``, disjoint from the calibration sources), top-1
agreement with FP32 is >= 99%, no decision flips from positive to negative
at the clinical threshold, and the Grad-CAMs match FP32's (mean Pearson r >=
0.95: the heat map is what the pathologist sees). Otherwise it is written with ``deployable: false``
and the reasons, unless ``--force-deployable`` (recorded as ``forced: true``).
"""
from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from armscope.core.bundle import check_out_apart, load_bundle, refuse_cascade, staged_directory, write_manifest
from armscope.core.errors import ArmscopeError, require_module
from armscope.calibration import accuracy
from armscope.calibration.calibration_set import load_calibration_set
from armscope.calibration.derive import derived_manifest, move_graphs, refuse_derived_source, write_graphs
from armscope.calibration.graph import GROUPS, name_nodes, sensitive_nodes

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
TOOLS = ("ort", "modelopt")
DEFAULT_OP_TYPES = ("Conv", "MatMul", "Gemm")


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over the calibration frames, one at a time."""

    def __init__(self, images: np.ndarray):
        self.images = images
        self.i = 0

    def get_next(self):
        if self.i >= len(self.images):
            return None
        self.i += 1
        return {"image": self.images[self.i - 1 : self.i]}

    def rewind(self):
        self.i = 0


# What ORT's symbolic shape inference leaves in the current directory when it
# fails: its partial model and that model's weights under a uuid1 name.
_ORT_LEFTOVERS = re.compile(r"sym_shape_infer_temp\.onnx|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.data")


@contextlib.contextmanager
def _no_leftovers_in_cwd():
    """Remove the files ORT's symbolic shape inference writes into the current
    directory when it fails (``sym_shape_infer_temp.onnx`` and a uuid-named
    ``.data``, ~0.8 MB per demo member): on every ``armscope quantize`` of a
    tf2onnx graph they were left wherever the user ran it. Only files of those
    names that appeared or changed during the call are removed."""
    cwd = Path.cwd()

    def leftovers() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in cwd.iterdir() if _ORT_LEFTOVERS.fullmatch(p.name)}

    before = leftovers()
    try:
        yield
    finally:
        for name, mtime in leftovers().items():
            if before.get(name) != mtime:
                (cwd / name).unlink(missing_ok=True)


def preprocess_member(src: Path, dst: Path) -> dict:
    """quant_pre_process (symbolic shape inference, ONNX shape inference, ORT
    graph optimisation). tf2onnx graphs with a dynamic batch sometimes defeat
    the symbolic pass; then it runs without it, and that is recorded."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _no_leftovers_in_cwd():
            quant_pre_process(str(src), str(dst))
        info = {"symbolic_shape_inference": True}
    except Exception as exc:  # ORT raises a bare Exception("Incomplete symbolic shape inference")
        log.info("%s: symbolic shape inference failed (%s); pre-processing without it", src, exc)
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        info = {"symbolic_shape_inference": False}
    model = name_nodes(onnx.load(str(dst)))
    onnx.save(model, str(dst))
    return info


# Entropy calibration as TensorRT's IInt8EntropyCalibrator2 does it: a 2048-bin
# histogram, the KL-optimal threshold over 128 quantized bins. quantize_static
# passes no bin counts to its calibrator, whose defaults (128 bins, 128
# quantized bins) leave a single candidate threshold, the full range, i.e.
# MinMax; so the ranges are computed here and handed over as a calibration cache.
ENTROPY_BINS = 2048
ENTROPY_QUANTIZED_BINS = 128


def _entropy_ranges(pre: Path, images: np.ndarray, op_types: list[str], cache: Path) -> None:
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    with tempfile.TemporaryDirectory(prefix=".calib.", dir=cache.parent) as tmp:
        calibrator = create_calibrator(pre, list(op_types), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.Entropy,
                                       extra_options={"symmetric": True, "num_bins": ENTROPY_BINS,
                                                      "num_quantized_bins": ENTROPY_QUANTIZED_BINS})
        calibrator.collect_data(_Reader(images))
        save_tensors_data(calibrator.compute_data(), cache)


def _has_calibration_caches() -> bool:
    """quantize_static(calibration_cache_path=...): onnxruntime 1.32 and newer."""
    import inspect

    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def _require_calibration_caches() -> None:
    """--method entropy hands its ranges to quantize_static as a calibration
    cache (older onnxruntime: no way in, and its own entropy calibrator would
    silently use the full range, see above)."""
    from onnxruntime import __version__ as ort_version

    if not _has_calibration_caches():
        raise ArmscopeError(f"--method entropy needs onnxruntime 1.32 or newer (this is {ort_version}: its "
                            "quantize_static takes no calibration cache); use --method minmax or percentile, "
                            "or upgrade onnxruntime")


def _quantize_ort(pre: Path, dst: Path, images: np.ndarray, method: str, exclude: list[str],
                  op_types: list[str], per_channel: bool) -> None:
    """Quantize one pre-processed member. The activation ranges are computed once
    per member and method and kept next to ``pre`` (a calibration cache), so the
    variants of ``--keep-fp32 auto`` do not calibrate again: calibration is most
    of the time (about 6 minutes a full-size member here, entropy far more)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    extra = {
        "ActivationSymmetric": True,  # TensorRT: INT8 Q/DQ with zero point 0 only
        "WeightSymmetric": True,
        "QuantizeBias": False,  # TensorRT fuses FP32 bias itself
        # not CalibMaxIntermediateOutputs: onnxruntime 1.32's MinMax calibrater discards the
        # collected batches when that limit is hit instead of folding them into the ranges
    }
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    cache_kw = {}
    if _has_calibration_caches():
        cache = pre.with_suffix(f".{method}.ranges.json")  # quantize_static writes it on a miss
        if method == "entropy" and not cache.is_file():
            _entropy_ranges(pre, images, op_types, cache)
        cache_kw["calibration_cache_path"] = cache
    elif method == "entropy":
        _require_calibration_caches()
    quantize_static(str(pre), str(dst), _Reader(images), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(op_types), per_channel=per_channel,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=list(exclude), calibrate_method=calibrate, extra_options=extra, **cache_kw)


def _quantize_modelopt(pre: Path, dst: Path, images: np.ndarray, method: str, exclude: list[str],
                       op_types: list[str]) -> None:
    mq = require_module("modelopt.onnx.quantization", "modelopt", "INT8 quantization with --tool modelopt")
    if method == "percentile":
        raise ArmscopeError("--method percentile: ModelOpt calibrates with 'minmax' (max) or 'entropy'")
    mq.quantize(onnx_path=str(pre), quantize_mode="int8", calibration_data={"image": images},
                calibration_method={"minmax": "max", "entropy": "entropy"}[method],
                calibration_eps=["cpu"], op_types_to_quantize=list(op_types),
                nodes_to_exclude=list(exclude) or None, output_path=str(dst),
                # ModelOpt's default casts everything outside Q/DQ to FP16; keep FP32 there, as the
                # onnxruntime tool does, so one bundle means one thing on every runtime
                high_precision_dtype="fp32")


def _choose(variants: dict[str, dict]) -> str:
    def key(item):
        name, v = item
        s = v["summary"]
        return (s["positive_to_negative_flips"], -s["top1_agreement"], round(s["max_abs_delta_p"], 4),
                len(v["keep_fp32"]))
    return min(variants.items(), key=key)[0]


def _holdout_overlap(calib_manifest: dict, holdout_paths: list[Path]) -> list[str]:
    sources = {str(Path(f["source"]).resolve()) for f in calib_manifest["frames"]}
    return [str(p) for p in holdout_paths if str(p.resolve()) in sources]


def make_reduced_bundle(
    bundle_dir: Path,
    out: Path,
    precision: str = "int8",
    calib: Path | None = None,
    method: str = "minmax",
    keep_fp32: str = "auto",
    holdout: list[Path] | None = None,
    labels_csv: Path | None = None,
    tool: str = "ort",
    op_types: list[str] | None = None,
    per_channel: bool = True,
    force: bool = False,
    force_deployable: bool = False,
) -> dict:
    """Write an INT8 Q/DQ or FP16 bundle at ``out``. Returns the manifest's quantization block."""
    check_out_apart(out, [bundle_dir, calib, labels_csv, *(holdout or [])])  # --force would replace an input
    if precision not in ("int8", "fp16"):
        raise ArmscopeError(f"--precision {precision!r}: expected int8 or fp16")
    if method not in METHODS:
        raise ArmscopeError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if tool not in TOOLS:
        raise ArmscopeError(f"--tool {tool!r}: expected one of {', '.join(TOOLS)}")
    if precision == "int8" and method == "entropy" and tool == "ort":
        _require_calibration_caches()  # before minutes of pre-processing, not after
    source = load_bundle(bundle_dir)
    refuse_cascade(source, "armscope quantize")
    refuse_derived_source(source, f"--precision {precision}")
    if op_types and precision == "int8":  # a misspelt op type would quantize nothing and still write an "int8" bundle
        present = {node.op_type for node in onnx.load(str(source.member_paths[0]), load_external_data=False).graph.node}
        unknown = [t for t in op_types if t not in present]
        if unknown:
            raise ArmscopeError(f"--op-types: {', '.join(map(repr, unknown))} not in the member graphs "
                                f"(they have {', '.join(sorted(present))})")
    op_types = list(op_types or DEFAULT_OP_TYPES)

    calib_set = None
    if precision == "int8":
        if calib is None:
            raise ArmscopeError("--precision int8 needs --calib CALIB.npz (make one with 'armscope calibration-set')")
        calib_set = load_calibration_set(calib, spec=source.preprocessing)
    elif calib is not None:
        calib_set = load_calibration_set(calib, spec=source.preprocessing)

    # evaluation frames: the hold-out (must not share files with the calibration set)
    if holdout:
        names, eval_images, labels = accuracy.load_eval_set(holdout, source.preprocessing, source.classes, labels_csv)
        if calib_set is not None:
            shared = _holdout_overlap(calib_set.manifest, [Path(n) for n in names])
            if shared:
                raise ArmscopeError(f"--holdout: {len(shared)} image(s) are calibration sources too "
                                    f"({', '.join(shared[:3])}); the hold-out must be disjoint from {calib}")
        evaluated_on = "holdout"
    elif calib_set is not None:
        names = [f"{f['source']}#{i}" for i, f in enumerate(calib_set.manifest["frames"])]
        eval_images, labels, evaluated_on = calib_set.images, None, "calibration set (no --holdout given)"
    else:
        raise ArmscopeError("--precision fp16 needs --holdout DIR (or --calib) to measure the bundle against FP32")

    ref_out = accuracy.run_bundle(source, eval_images)

    with staged_directory(Path(out), overwrite=force) as stage:
        work = Path(tempfile.mkdtemp(prefix=".work.", dir=stage))
        variants: dict[str, dict] = {}
        if precision == "fp16":
            from armscope.calibration import fp16

            folder = work / "fp16"
            _, ensemble = write_graphs(source, folder, lambda s, d, i: fp16.convert_member(s, d))
            result = accuracy.compare_outputs(ref_out, accuracy.run_graph(ensemble, eval_images),
                                              source.task, names, labels)
            variants["fp16"] = {"keep_fp32": [], "folder": folder, "summary": result["summary"]}
            block = {"method": "onnxconverter-common float16.convert_float_to_float16 (keep_io_types=True)",
                     "tool": "onnxconverter-common", "fp32_op_types": fp16.DEFAULT_OP_BLOCK}
        else:
            if keep_fp32 == "auto":
                plans = {"all-int8": [], "keep-fp32:" + ",".join(GROUPS): list(GROUPS)}
            elif keep_fp32 == "none":
                plans = {"all-int8": []}
            else:
                groups = [g.strip() for g in keep_fp32.split(",") if g.strip()]
                bad = [g for g in groups if g not in GROUPS]
                if bad:
                    raise ArmscopeError(f"--keep-fp32 {keep_fp32!r}: unknown group(s) {bad}; expected auto, none "
                                        f"or a comma list of {', '.join(GROUPS)}")
                plans = {"keep-fp32:" + ",".join(groups): groups}
            pre_dir = work / "pre"
            pre_dir.mkdir()
            pre_paths, pre_info, excluded = [], [], []
            for i, src in enumerate(source.member_paths):
                pre = pre_dir / f"member_{i}.onnx"
                pre_info.append(preprocess_member(src, pre))
                pre_paths.append(pre)
                excluded.append(sensitive_nodes(onnx.load(str(pre), load_external_data=False)))
            for variant, groups in plans.items():
                folder = work / f"v{len(variants)}"

                def transform(src, dst, i, groups=groups):
                    exclude = [n for g in groups for n in excluded[i][g]]
                    if tool == "modelopt":
                        _quantize_modelopt(pre_paths[i], dst, calib_set.images, method, exclude, op_types)
                    else:
                        _quantize_ort(pre_paths[i], dst, calib_set.images, method, exclude, op_types, per_channel)

                log.info("quantizing %d members (%s, %s)", len(source.member_paths), variant, method)
                _, ensemble = write_graphs(source, folder, transform)
                result = accuracy.compare_outputs(ref_out, accuracy.run_graph(ensemble, eval_images, exact_qdq=True),
                                                  source.task, names, labels)
                variants[variant] = {"keep_fp32": groups, "folder": folder, "summary": result["summary"],
                                     "excluded_nodes_per_member": [sum(len(e[g]) for g in groups) for e in excluded],
                                     "ensemble": ensemble}
            block = {
                "method": "explicit Q/DQ (QuantFormat.QDQ), symmetric INT8, per-channel weights" if per_channel
                else "explicit Q/DQ (QuantFormat.QDQ), symmetric INT8, per-tensor weights",
                "tool": "nvidia-modelopt" if tool == "modelopt" else "onnxruntime.quantization.quantize_static",
                "calibrate_method": method,
                "op_types_to_quantize": op_types,
                "pre_process": pre_info[0],
                "calibration": {"file": str(Path(calib).resolve()), "frames": len(calib_set),
                                "per_class": calib_set.manifest.get("per_class"),
                                "skipped": calib_set.manifest.get("skipped")},
            }
        chosen = _choose(variants)
        summary = variants[chosen]["summary"]
        if precision == "int8":
            # The gate judges the Q/DQ graph itself (what TensorRT and VNNI/AMX CPUs compute);
            # this CPU's own INT8 kernels are measured too, for the record and the runtime check.
            from armscope.edge.backends.cpu_features import int8_exact

            exact, why = int8_exact()
            here = accuracy.compare_outputs(ref_out, accuracy.run_graph(variants[chosen]["ensemble"], eval_images),
                                            source.task, names, labels)
            block["evaluation"] = "exact Q/DQ (ONNX Runtime, graph optimisations off)"
            block["this_cpu"] = {"int8_exact": exact, "why": why, "onnxruntime_int8_kernels": here["summary"]}
        reasons = accuracy.gate(summary) if evaluated_on == "holdout" else [
            "not evaluated on a hold-out set (pass --holdout DIR, disjoint from the calibration set)"]
        move_graphs(source, variants[chosen]["folder"], stage)
        shutil.rmtree(work)
        block.update({
            "keep_fp32": variants[chosen]["keep_fp32"],
            "variant": chosen,
            "variants": {k: {"keep_fp32": v["keep_fp32"], "summary": v["summary"],
                             **({"excluded_nodes_per_member": v["excluded_nodes_per_member"]}
                                if "excluded_nodes_per_member" in v else {})} for k, v in variants.items()},
            "evaluated_on": evaluated_on,
            "evaluation_images": len(names),
            "gate": {"min_top1_agreement": accuracy.MIN_AGREEMENT, "max_positive_to_negative_flips": 0,
                     "min_cam_pearson_mean": accuracy.MIN_CAM_PEARSON, "failed": reasons},
            "deployable": not reasons or force_deployable,
            "forced": bool(reasons) and force_deployable,
        })
        manifest = derived_manifest(source, stage, precision, block, precision)
        write_manifest(stage, manifest)
        load_bundle(stage)  # the written bundle must load and verify like any other
    return block
