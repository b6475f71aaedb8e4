"""OpenVINO backend: same interface and outputs as ONNX Runtime on the demo bundle, real H&E inputs."""
import json
import subprocess
import sys

import numpy as np
import pytest

ov = pytest.importorskip("openvino")

from armscope.core.bundle import load_bundle  # noqa: E402
from armscope.core.errors import ArmscopeError  # noqa: E402
from armscope.edge.backends import open_backend  # noqa: E402
from armscope.edge.backends.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from armscope.edge.backends.openvino_backend import OpenVinoBackend, cpu_capabilities  # noqa: E402

from repo_paths import DEMO_BUNDLE as DEMO


@pytest.fixture(scope="module")
def demo():
    return load_bundle(DEMO)


@pytest.fixture(scope="module")
def reference(demo, real_inputs):
    with OnnxRuntimeBackend(demo, "merged") as backend:
        return backend.infer(real_inputs)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["members", "merged"])
def test_fp32_matches_onnxruntime_on_real_frames(demo, real_inputs, reference, layout):
    with open_backend(demo, "openvino", layout=layout) as backend:
        assert isinstance(backend, OpenVinoBackend)
        out = backend.infer(real_inputs)
        info = backend.describe()
        # one frame a call (the daemon's) runs the static one-frame graphs, a batch the dynamic ones
        single = np.concatenate([backend.infer(real_inputs[i : i + 1])["probs"] for i in range(len(real_inputs))])
    assert len(real_inputs) > 1
    np.testing.assert_allclose(single, reference["probs"], atol=1e-4, rtol=1e-4)
    assert info["precision"] == "f32" and info["requests"] == (5 if layout == "members" else 1)
    for name in ("probs", "patch_probs", "cam"):
        assert out[name].shape == reference[name].shape
        np.testing.assert_allclose(out[name], reference[name], atol=1e-4, rtol=1e-4, err_msg=name)
    assert (out["probs"].argmax(1) == reference["probs"].argmax(1)).all()


@pytest.mark.slow
def test_bf16_runs_where_the_cpu_has_it_and_is_refused_where_not(demo, real_inputs, reference):
    if "BF16" in cpu_capabilities():
        with OpenVinoBackend(demo, precision="bf16") as backend:
            out = backend.infer(real_inputs)
            assert backend.describe()["precision"] == "bf16"
        assert np.abs(out["probs"] - reference["probs"]).max() < 0.05
    else:
        with pytest.raises(ArmscopeError, match="no BF16 support"):
            OpenVinoBackend(demo, precision="bf16").activate()


def test_bad_options_are_clear_errors(demo):
    with pytest.raises(ArmscopeError, match="layout 'sideways'"):
        OpenVinoBackend(demo, layout="sideways")
    with pytest.raises(ArmscopeError, match="precision 'fp8'"):
        OpenVinoBackend(demo, precision="fp8")


@pytest.mark.slow
def test_classify_cli_with_openvino(tmp_path, frame_paths):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "armscope.cli", "classify", *map(str, frame_paths[:2]),
                           "--bundle", str(DEMO), "--backend", "openvino", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert len(report["images"]) == 2 and "slide" in report


@pytest.mark.slow
def test_accuracy_report_runs_the_candidate_on_openvino(tmp_path, frame_paths):
    """``armscope accuracy --backend openvino`` measures what will run: the same FP32 bundle on
    OpenVINO agrees with ONNX Runtime FP32 on real frames, and the report says which runtime ran."""
    from armscope.calibration.accuracy import accuracy_report

    report = accuracy_report(DEMO, None, frame_paths, tmp_path / "rep", backend="openvino")
    s = report["summary"]
    assert s["n_images"] == len(frame_paths) and s["top1_agreement"] == 1.0 and s["max_abs_delta_p"] < 1e-4
    assert report["candidate"]["runtime"] == {"backend": "openvino", "cpu_precision": "f32"}
    assert "on openvino (inference precision f32)" in (tmp_path / "rep" / "report.md").read_text()
    with pytest.raises(ArmscopeError, match="--candidate"):
        accuracy_report(DEMO, None, frame_paths, tmp_path / "rep2")


@pytest.mark.slow
def test_auto_layout_is_the_faster_one_per_backend(demo):
    """The daemon's and classify's default layout: OpenVINO one merged graph,
    ONNX Runtime concurrent member sessions (BENCHMARKS.md, section 4)."""
    with open_backend(demo, "openvino") as backend:
        assert backend.describe()["layout"] == "merged"
    with open_backend(demo, "onnxruntime") as backend:
        assert backend.describe()["layout"] == "members"
    with open_backend(demo, "openvino", layout="members") as backend:
        assert backend.describe()["layout"] == "members"
