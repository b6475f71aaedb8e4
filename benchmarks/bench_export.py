"""Exporting a full-size ensemble: five tiled DenseNet-121 members (random
weights, ``benchmarks/conftest.py``) to a bundle with ``export_bundle``, as
``armscope export`` does: loading the .keras files, tracing, the shared-graph
conversion (``armscope.export.convert``), per-member and ensemble parity against Keras,
the merged graph. One round: it takes minutes.

Recorded beside the time: the manifest's parity figures (max |delta probs| vs
Keras, bar 1e-4), the in-graph Grad-CAM's correlation with tf.GradientTape on
a real frame (member 0, bar 0.999) and one frame of member 0 through ONNX
Runtime FP32 (the graph must not be slower than the per-member conversion's).

    python -m pytest benchmarks/bench_export.py --benchmark-only
"""
from __future__ import annotations

import time

import numpy as np
import pytest

GROUP = "export"


@pytest.fixture(scope="module")
def exported() -> dict:
    """Where the export benchmark left its bundle, for the per-frame benchmark."""
    return {}


def test_export_full_ensemble(benchmark, full_members, tmp_path_factory, real_inputs, exported):
    from armscope.core.bundle import load_bundle
    from armscope.export.onnx_export import TaskSpec, export_bundle

    benchmark.group = GROUP
    out = tmp_path_factory.mktemp("export") / "densenet121_x5"
    task = TaskSpec("binary", ["other", "IIM"], "IIM", 0.3)
    started = time.perf_counter()
    benchmark.pedantic(export_bundle, args=(full_members, out, task), kwargs={"force": True},
                       rounds=1, iterations=1)
    seconds = time.perf_counter() - started
    manifest = load_bundle(out).manifest
    parity = max([m["parity_max_abs_probs"] for m in manifest["members"]]
                 + [manifest["ensemble"]["parity_max_abs_probs"]])
    correlation = _cam_correlation(full_members[0], out / "members" / "member_0.onnx", real_inputs[0])
    benchmark.extra_info.update({"members": len(full_members), "seconds": seconds,
                                 "max_abs_delta_probs_vs_keras": parity,
                                 "min_cam_correlation_vs_gradient_tape": correlation})
    exported["bundle"] = out
    assert parity <= 1e-4
    assert correlation >= 0.999


def _cam_correlation(member_path, onnx_path, frame: np.ndarray) -> float:
    import keras
    import onnxruntime as ort

    from armscope.export.gradcam_reference import reference_cam

    ref = reference_cam(keras.models.load_model(member_path, compile=False), frame)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["cam"], {"image": frame[None]})[0][0]
    live = [c for c in range(ref.shape[0]) if ref[c].max() > 0]
    assert live, "GradientTape's CAM is zero for every class on this frame: nothing to compare"
    return float(min(np.corrcoef(ref[c].ravel(), got[c].ravel())[0, 1] for c in live))


def test_exported_member_frame_onnxruntime(benchmark, exported, real_inputs):
    """One frame of the exported member 0 in ONNX Runtime FP32 (all usable CPUs, as armscope runs it)."""
    from armscope.core.cpus import usable_cpus
    from armscope.edge.backends.onnxruntime_backend import open_session

    if "bundle" not in exported:
        pytest.skip("the export benchmark did not produce a bundle")
    benchmark.group = GROUP
    session = open_session(exported["bundle"] / "members" / "member_0.onnx", usable_cpus())
    frame = np.ascontiguousarray(real_inputs[:1])
    session.run(None, {"image": frame})
    benchmark.pedantic(session.run, args=(None, {"image": frame}), rounds=10, iterations=1, warmup_rounds=1)
