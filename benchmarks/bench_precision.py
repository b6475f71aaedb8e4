"""Precision on the CPU, full size: 5 x DenseNet-121 tiled members, one real
640x640 frame, every path in one run.

Ours (behind ``InferenceBackend``, per-member layout, the daemon's default):
ONNX Runtime FP32 / INT8 (explicit Q/DQ) / FP16, OpenVINO FP32 / BF16 / INT8
(the same Q/DQ bundle). The peer, as a user would run it without armscope:
OpenVINO's own API on the bundle's merged ensemble ONNX, FP32 and BF16
inference precision. BF16 runs only where the CPU has it (AVX512-BF16 or AMX);
elsewhere those rows are skipped with the CPU's capabilities in the reason,
since OpenVINO would silently run FP32.

Run (the FP32 bundle comes from benchmarks/conftest.py; the INT8 and FP16
bundles are derived once, cached next to it in benchmarks/.cache):

    .venv/bin/python -m pytest benchmarks/bench_precision.py --benchmark-only

Smoke run on the demo bundle (seconds):

    ARMSCOPE_BENCH_BUNDLE=samples/demo_bundle .venv/bin/python -m pytest benchmarks/bench_precision.py \\
        --benchmark-only --benchmark-min-rounds=1

Every row also checks its probabilities against ONNX Runtime FP32 on the same
frame (FP32 paths to 1e-4). INT8 rows are timed even on CPUs where the runtimes'
INT8 kernels are inexact (x86 without VNNI/AMX, ``armscope.edge.backends.cpu_features``),
where armscope refuses to deploy INT8; ``int8_exact_on_this_cpu`` records it. Accuracy of the reduced precisions on real frames
is what ``armscope accuracy`` / the manifest's ``quantization`` block report.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from armscope.core.bundle import load_bundle
from armscope.edge.backends.onnxruntime_backend import OnnxRuntimeBackend

CACHE = Path(__file__).resolve().parent / ".cache"
SAMPLES = Path(__file__).resolve().parents[1] / "samples"
GROUP = "precision-ensemble-cpu"
FP32_TOL = 1e-4


@pytest.fixture(scope="module")
def fp32_bundle(request):
    override = os.environ.get("ARMSCOPE_BENCH_BUNDLE")
    if override:
        return load_bundle(override)
    return request.getfixturevalue("full_bundle")


def _derived(fp32, precision: str):
    from armscope.calibration.calibration_set import build_calibration_set
    from armscope.calibration.quantize import make_reduced_bundle

    target = CACHE / f"{fp32.root.name}-{precision}"
    if not (target / "manifest.json").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        calib = CACHE / "bench_calib.npz"
        if not calib.is_file():
            build_calibration_set([SAMPLES / "he" / "cmu-small-region"], calib, size=4, frame_size=(1600, 1200))
        make_reduced_bundle(fp32.root, target, precision, calib=calib, keep_fp32="none",
                            holdout=[SAMPLES / "frames"], force=True)
    bundle = load_bundle(target)
    assert bundle.manifest["quantization"]["source"]["ensemble_sha256"] == fp32.manifest["ensemble"]["sha256"], \
        f"{target} was derived from another bundle; delete it"
    return bundle


@pytest.fixture(scope="module")
def frame(real_inputs):
    return np.ascontiguousarray(real_inputs[:1])


@pytest.fixture(scope="module")
def reference(fp32_bundle, frame):
    with OnnxRuntimeBackend(fp32_bundle, "members") as backend:
        return backend.infer(frame)["probs"]


def _record(benchmark, bundle, runtime, precision, out, reference, tol=None):
    from armscope.edge.backends.cpu_features import int8_exact

    delta = float(np.abs(out["probs"] - reference).max())
    if precision == "int8":
        benchmark.extra_info["int8_exact_on_this_cpu"] = int8_exact()[0]
    benchmark.extra_info.update({"runtime": runtime, "precision": precision, "bundle": bundle.manifest["name"],
                                 "members": len(bundle.member_paths), "max_abs_delta_p_vs_fp32": delta,
                                 "deployable": bundle.manifest.get("quantization", {}).get("deployable", True)})
    assert out["probs"].shape == reference.shape and np.isfinite(out["cam"]).all()
    if tol is not None:
        assert delta <= tol, f"{runtime} {precision}: max |delta p| {delta} vs ONNX Runtime FP32"


@pytest.mark.benchmark(group=GROUP, min_rounds=5, warmup=True, warmup_iterations=1)
@pytest.mark.parametrize("precision", ["fp32", "int8", "fp16"])
def test_ours_onnxruntime(benchmark, fp32_bundle, frame, reference, precision):
    bundle = fp32_bundle if precision == "fp32" else _derived(fp32_bundle, precision)
    # INT8 is timed even where this CPU computes it inexactly (the daemon refuses it there)
    with OnnxRuntimeBackend(bundle, "members", allow_inexact_int8=True) as backend:
        out = benchmark(backend.infer, frame)
    _record(benchmark, bundle, "armscope onnxruntime (members)", precision, out, reference,
            FP32_TOL if precision == "fp32" else None)


@pytest.mark.benchmark(group=GROUP, min_rounds=5, warmup=True, warmup_iterations=1)
@pytest.mark.parametrize("precision,layout", [("fp32", "members"), ("fp32", "merged"), ("bf16", "merged"),
                                              ("int8", "members"), ("int8", "merged")])
def test_ours_openvino(benchmark, fp32_bundle, frame, reference, precision, layout):
    pytest.importorskip("openvino")
    from armscope.edge.backends.openvino_backend import OpenVinoBackend, cpu_capabilities

    if precision == "bf16" and "BF16" not in cpu_capabilities():
        pytest.skip(f"this CPU has no BF16 (OpenVINO reports {cpu_capabilities()})")
    bundle = _derived(fp32_bundle, "int8") if precision == "int8" else fp32_bundle
    with OpenVinoBackend(bundle, layout, precision="bf16" if precision == "bf16" else "f32",
                         allow_inexact_int8=True) as backend:
        out = benchmark(backend.infer, frame)
    _record(benchmark, bundle, f"armscope openvino ({layout})", precision, out, reference,
            FP32_TOL if precision == "fp32" else None)


@pytest.mark.benchmark(group=GROUP, min_rounds=5, warmup=True, warmup_iterations=1)
@pytest.mark.parametrize("hint", ["f32", "bf16"])
def test_peer_openvino(benchmark, fp32_bundle, frame, reference, hint):
    """OpenVINO as a user would run it: its own API, the merged ensemble ONNX, defaults but the precision."""
    ov = pytest.importorskip("openvino")
    core = ov.Core()
    caps = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    if hint == "bf16" and "BF16" not in caps:
        pytest.skip(f"this CPU has no BF16 (OpenVINO reports {caps}); OpenVINO would run FP32")
    compiled = core.compile_model(core.read_model(str(fp32_bundle.ensemble_path)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run():
        result = request.infer({"image": frame})
        return {name: result[compiled.output(name)] for name in ("probs", "cam")}

    out = benchmark(run)
    _record(benchmark, fp32_bundle, f"peer openvino {ov.__version__}", hint, out, reference,
            FP32_TOL if hint == "f32" else 5e-2)
