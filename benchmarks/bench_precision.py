"""Precision on the CPU: the full-size ensemble (5 x DenseNet-121 tiled members,
one real 640x640 frame) as FP32, INT8 (explicit Q/DQ, all Conv/MatMul/Gemm in
INT8) and FP16 on ONNX Runtime, and FP32/BF16 on OpenVINO when ``openvino`` is
installed (``pip install -e '.[openvino]'``; skipped otherwise).

Run (full size; the FP32 bundle comes from benchmarks/conftest.py, the INT8 and
FP16 bundles are derived once and cached next to it in benchmarks/.cache):

    .venv/bin/python -m pytest benchmarks/bench_precision.py --benchmark-only

Smoke run on the demo bundle (seconds):

    ARMSCOPE_BENCH_BUNDLE=samples/demo_bundle .venv/bin/python -m pytest benchmarks/bench_precision.py \
        --benchmark-only --benchmark-min-rounds=1

The benchmarks measure latency only; accuracy against FP32 is what
``armscope accuracy`` reports (random-weight members make accuracy meaningless
here). Expectations: ONNX Runtime's CPU FP16 runs mostly through casts (slower
than FP32: FP16 is for GPUs/TensorRT); INT8 speed depends on VNNI/AMX; OpenVINO
BF16 needs AVX512-BF16 or AMX, otherwise it silently runs FP32.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from armscope.bundle import load_bundle
from edge.backends.onnxruntime_backend import OnnxRuntimeBackend

CACHE = Path(__file__).resolve().parent / ".cache"
SAMPLES = Path(__file__).resolve().parents[1] / "samples"
GROUP = "precision-ensemble-cpu"


@pytest.fixture(scope="module")
def fp32_bundle(request):
    override = os.environ.get("ARMSCOPE_BENCH_BUNDLE")
    if override:
        return load_bundle(override)
    return request.getfixturevalue("full_bundle")


def _derived(fp32, precision: str):
    from calibration.calibration_set import build_calibration_set
    from calibration.quantize import make_reduced_bundle

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


@pytest.mark.benchmark(group=GROUP, min_rounds=5, warmup=True, warmup_iterations=1)
@pytest.mark.parametrize("precision", ["fp32", "int8", "fp16"])
def test_onnxruntime(benchmark, fp32_bundle, frame, precision):
    bundle = fp32_bundle if precision == "fp32" else _derived(fp32_bundle, precision)
    benchmark.extra_info.update({"precision": precision, "bundle": bundle.manifest["name"]})
    with OnnxRuntimeBackend(bundle, "merged") as backend:
        out = benchmark(backend.infer, frame)
    assert out["probs"].shape == (1, len(bundle.classes)) and np.isfinite(out["cam"]).all()


@pytest.mark.benchmark(group=GROUP, min_rounds=5, warmup=True, warmup_iterations=1)
@pytest.mark.parametrize("hint", ["f32", "bf16"])
def test_openvino(benchmark, fp32_bundle, frame, hint):
    ov = pytest.importorskip("openvino")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(fp32_bundle.ensemble_path)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": hint})
    request = compiled.create_infer_request()
    benchmark.extra_info.update({"precision": hint, "openvino": ov.__version__,
                                 "cpu_capabilities": core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")})

    def run():
        return request.infer({"image": frame})

    result = benchmark(run)
    probs = result[compiled.output("probs")]
    with OnnxRuntimeBackend(fp32_bundle, "merged") as backend:
        ref = backend.infer(frame)["probs"]
    assert np.abs(probs - ref).max() < (1e-3 if hint == "f32" else 5e-2)
