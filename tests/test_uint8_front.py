"""The optional uint8 front (``armscope.core.front``, ``armscope front``): on real
H&E frames it makes the same model input as the CPU preprocessing
(``preprocess_frame``), so the bundle's outputs agree; the CPU backends,
``classify`` and the daemon feed it the camera crop; a tampered or missing
front is one clear error.

Bounds (measured on samples/frames and the CMU-1 region in
samples/he, 2026-12-03): INTER_AREA through the front is
bit-identical to ``preprocess_frame`` (max |pixel| 0, max |dp| 0, CAM r 1.0);
the tests allow one grey level, |dp| 1e-5 and CAM r 0.9999. INTER_LINEAR
differs by at most one level (OpenCV's fixed-point uint8 path), allowed 1.
OpenVINO BF16 also computes the front in BF16: |dp| 2e-4 against its float32
feed, allowed 2e-3."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from armscope.core import front
from armscope.core.bundle import load_bundle
from armscope.core.errors import ArmscopeError
from armscope.core.preprocess import load_image, preprocess_frame
from armscope.edge.backends import open_backend

from repo_paths import DEMO_BUNDLE as DEMO
from repo_paths import FRAMES, REPO
from repo_paths import HE_FIELD as CMU
REAL = FRAMES + ([CMU] if CMU.is_file() else [])


def _front_session(spec, opset=17):
    model, _ = front.front_model(spec, opset, 8)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("interpolation,bound", [("area", 0.0), ("linear", 1.0)])
def test_the_front_makes_what_preprocess_frame_makes(interpolation, bound):
    spec = dataclasses.replace(load_bundle(DEMO).preprocessing, interpolation=interpolation)
    session = _front_session(spec)
    for path in REAL:
        frame = load_image(path)
        want = preprocess_frame(frame, spec, source=str(path))
        got = session.run([front.OUTPUT], {front.INPUT: front.camera_crop(frame, spec)[None]})[0][0]
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.abs(got - want).max() <= bound, path
        assert (got != want).mean() <= (0.0 if bound == 0 else 0.2), path


def test_a_scale_without_blocks_gathers_taps():
    # 1000 -> 640 repeats every 25 inputs (16 outputs), 997 -> 640 never: the Gather form, same pixels
    spec = load_bundle(DEMO).preprocessing
    frame = load_image(FRAMES[0])
    for crop in (1000, 997):
        s = dataclasses.replace(spec, center_crop=crop)
        _, how = front.front_model(s, 17, 8)
        assert ("Gather" in how) == (crop == 997), how
        got = _front_session(s).run([front.OUTPUT], {front.INPUT: front.camera_crop(frame, s)[None]})[0][0]
        assert np.abs(got - preprocess_frame(frame, s)).max() <= 1.0


@pytest.fixture(scope="module")
def fronted(tmp_path_factory):
    """A copy of the demo bundle with the front added by ``armscope front`` (a real process)."""
    root = tmp_path_factory.mktemp("front") / "bundle"
    shutil.copytree(DEMO, root)
    out = subprocess.run([sys.executable, "-m", "armscope.cli", "front", "--bundle", str(root), "--images",
                          *map(str, REAL)], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr
    assert "parity with the CPU preprocessing" in out.stdout
    return root


def test_the_manifest_names_the_method_and_the_measured_parity(fronted):
    block = json.loads((fronted / "manifest.json").read_text())["uint8_front"]
    assert block["file"] == front.FILE and (fronted / front.FILE).is_file()
    assert block["input"] == {"name": "camera_bgr", "shape": ["N", 1024, 1024, 3], "dtype": "uint8",
                              "channel_order": "BGR", "what": "the camera frame's centre crop, as captured"}
    assert block["resize"]["method"] == "area" and "MatMul" in block["resize"]["implementation"]
    parity = block["parity"]
    assert parity["images"] == len(REAL) and parity["decision_flips"] == 0
    assert parity["max_abs_pixel"] <= 1.0 and parity["max_abs_delta_p"] <= 1e-5
    assert parity["cam_pearson_min"] >= 0.9999
    # the ensemble and its hash are untouched: fidelity records and engines still match
    assert block["sha256"] and load_bundle(fronted).manifest["ensemble"] == load_bundle(DEMO).manifest["ensemble"]


@pytest.mark.parametrize("kind,options,bound", [   # OpenVINO compiles both graphs: ~11 s each on 2 cores
    ("onnxruntime", {}, 1e-5), ("onnxruntime", {"layout": "merged"}, 1e-5),
    pytest.param("openvino", {}, 1e-5, marks=pytest.mark.slow),
    pytest.param("openvino", {"cpu_precision": "bf16"}, 2e-3, marks=pytest.mark.slow)])
def test_backends_fed_uint8_agree_with_float32(fronted, kind, options, bound):
    if kind == "openvino":
        pytest.importorskip("openvino")
        if options.get("cpu_precision") == "bf16":
            from armscope.edge.backends.openvino_backend import cpu_capabilities

            if "BF16" not in cpu_capabilities():
                pytest.skip("no BF16 on this CPU")
    bundle = load_bundle(fronted)
    with open_backend(bundle, kind, **options) as floats, open_backend(bundle, kind, feed="uint8", **options) as u8:
        assert u8.describe()["feed"] == "uint8"
        for path in FRAMES[:2]:
            frame = load_image(path)
            a = floats.infer(preprocess_frame(frame, bundle.preprocessing)[None])
            b = u8.infer(front.camera_crop(frame, bundle.preprocessing)[None])
            assert np.abs(a["probs"] - b["probs"]).max() <= bound
            for x, y in zip(a["cam"][0], b["cam"][0]):
                assert np.corrcoef(x.ravel(), y.ravel())[0, 1] >= 0.9999
        directory = Path(u8.graphs.composed_dir.name)
        assert directory.is_dir()
    assert not directory.exists()  # the composed graphs go with deactivate()


def test_classify_feeds_the_crop(fronted, tmp_path):
    reports = {}
    for feed in ("float32", "uint8"):
        out = subprocess.run([sys.executable, "-m", "armscope.cli", "classify", *map(str, FRAMES), "--bundle",
                              str(fronted), "--backend", "onnxruntime", "--feed", feed, "--json",
                              str(tmp_path / f"{feed}.json")], cwd=REPO, capture_output=True, text=True, timeout=600,
                             check=False)
        assert out.returncode == 0, out.stderr
        reports[feed] = json.loads((tmp_path / f"{feed}.json").read_text())
    assert reports["uint8"]["backend"]["feed"] == "uint8"
    for a, b in zip(reports["float32"]["images"], reports["uint8"]["images"]):
        assert a["decision"] == b["decision"]
        assert np.abs(np.array(list(a["probs"].values())) - list(b["probs"].values())).max() <= 1e-5


def test_the_daemon_feeds_the_crop(fronted, tmp_path):
    from daemon_support import running, wait_for

    from armscope.core import protocol

    with running(fronted, f"dir://{FRAMES[0].parent}/?fps=2&loop=1", tmp_path,
                 backend="onnxruntime", feed="uint8") as daemon:
        with protocol.Subscriber(daemon.endpoints["publish"]) as sub:
            overlay, _ = wait_for(sub, lambda m: True, 90, topic="overlay")
        status = protocol.control_request("status", daemon.endpoints["control"], timeout_ms=10000)
    assert status["backend"]["feed"] == "uint8"
    assert sum(overlay.header["probs"]) == pytest.approx(1.0, abs=1e-3)


def test_errors_are_one_clear_line(fronted, tmp_path):
    with pytest.raises(ArmscopeError, match="feed uint8 needs the bundle's uint8 front.*armscope front"):
        open_backend(load_bundle(DEMO), "onnxruntime", feed="uint8")
    with pytest.raises(ArmscopeError, match="TensorRT backend takes float32 frames only"):
        open_backend(load_bundle(fronted), "tensorrt", feed="uint8")
    tampered = tmp_path / "bundle"
    shutil.copytree(fronted, tampered)
    data = bytearray((tampered / front.FILE).read_bytes())
    data[-1] ^= 1
    (tampered / front.FILE).write_bytes(bytes(data))
    with pytest.raises(ArmscopeError, match="front_uint8.onnx: sha256 .* uint8_front.sha256"):
        load_bundle(tampered)
    with pytest.raises(ArmscopeError, match="already has a uint8 front"):
        from armscope.export.uint8_front import add_front

        add_front(fronted, FRAMES)
    whole = dataclasses.replace(load_bundle(DEMO).preprocessing, center_crop=0)
    with pytest.raises(ArmscopeError, match="center_crop is 0"):
        front.front_model(whole, 17, 8)
