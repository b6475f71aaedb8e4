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
    with pytest.raises(ArmscopeError, match="feed 'rgb': expected one of float32, uint8"):
        open_backend(load_bundle(fronted), "onnxruntime", feed="rgb")
    with open_backend(load_bundle(fronted), "onnxruntime", feed="uint8") as backend:
        spec = load_bundle(fronted).preprocessing
        with pytest.raises(ArmscopeError, match="feed uint8: expected the camera crops as uint8 BGR, got float32"):
            backend.infer(np.zeros((1, spec.center_crop, spec.center_crop, 3), np.float32))
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


def test_composing_keeps_the_front_apart_from_a_lab_graphs_names(tmp_path):
    """A lab's graph may use the front's own inner names (``x``, ``z``, ``rows_w``):
    composing prefixes the front's nodes and tensors (``front.PREFIX``, also what a
    TensorRT build keeps in FP32), so the graphs do not collide and the composed graph
    computes the front, then the graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    spec = load_bundle(DEMO).preprocessing
    model, _ = front.front_model(spec, 17, 8)
    onnx.save(model, str(tmp_path / "front.onnx"))
    s = spec.resize
    lab = helper.make_model(helper.make_graph(
        [helper.make_node("Mul", ["image", "rows_w"], ["x"]), helper.make_node("ReduceMean", ["x"], ["z"], keepdims=0),
         helper.make_node("Identity", ["z"], ["probs"])], "lab",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", s, s, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.float32(0.5), "rows_w")]), opset_imports=[helper.make_opsetid("", 17)])
    lab.ir_version = 8
    onnx.save(lab, str(tmp_path / "lab.onnx"))
    composed = onnx.load(str(front.compose(tmp_path / "front.onnx", tmp_path / "lab.onnx", tmp_path / "c.onnx")))
    front_nodes = [n for n in composed.graph.node if n.name.startswith(front.PREFIX)]
    assert len(front_nodes) == len(model.graph.node)
    assert [i.name for i in composed.graph.input] == [front.INPUT]
    frame = load_image(FRAMES[0])
    got = ort.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"]).run(
        ["probs"], {front.INPUT: front.camera_crop(frame, spec)[None]})[0]
    want = ort.InferenceSession(str(tmp_path / "lab.onnx"), providers=["CPUExecutionProvider"]).run(
        ["probs"], {"image": preprocess_frame(frame, spec)[None]})[0]
    assert got == want and got == pytest.approx(0.5 * preprocess_frame(frame, spec).mean(dtype=np.float64), rel=1e-3)


def _tf32(a: np.ndarray) -> np.ndarray:
    """float32 rounded to TF32 (10 explicit mantissa bits, nearest even), as a GPU's
    tensor cores round each operand of an FP32 matrix product with TF32 on."""
    bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~np.uint64(0x1FFF)
    return bits.astype(np.uint32).view(np.float32)


def _front_in_tf32(model, crop: np.ndarray) -> np.ndarray:
    """The MatMul form of the front with TF32 operands and float32 accumulation."""
    from onnx import numpy_helper

    w = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    x = crop[None].astype(np.float32)
    y = np.matmul(_tf32(w["rows_w"]).astype(np.float64), _tf32(x.reshape(w["rows_shape"])).astype(np.float64))
    z = np.matmul(_tf32(y.astype(np.float32).reshape(w["cols_shape"])).astype(np.float64),
                  _tf32(w["cols_w"]).astype(np.float64)).astype(np.float32)
    return np.clip(np.round(z.reshape(w["out_shape"])), 0, 255)[0]


@pytest.mark.parametrize("interpolation", ["area", "linear"])
def test_tf32_exactness_is_decided_by_the_weights(interpolation):
    """``front.tf32_exact`` says whether a GPU's TF32 MatMul keeps the front's pixels
    (a TensorRT build switches TF32 off where it does not): the demo's INTER_AREA
    1024 -> 640 weights are multiples of 1/8 and, emulated in TF32, still give
    exactly ``preprocess_frame``'s pixels; INTER_LINEAR's (0.3, 0.7, ...) are not,
    and in TF32 they change pixels."""
    spec = dataclasses.replace(load_bundle(DEMO).preprocessing, interpolation=interpolation)
    model, _ = front.front_model(spec, 17, 8)
    exact, why = front.tf32_exact(model)
    assert exact == (interpolation == "area"), why
    exact_session = _front_session(spec)
    changed = 0
    for path in FRAMES:
        frame = load_image(path)
        crop = front.camera_crop(frame, spec)
        fp32 = exact_session.run([front.OUTPUT], {front.INPUT: crop[None]})[0][0]
        changed += int((_front_in_tf32(model, crop) != fp32).sum())
    assert (changed == 0) == exact, changed


def test_bundles_derived_from_a_fronted_bundle_keep_its_front(fronted, tmp_path, capsys):
    """FP16 (``quantize``/``build``) and subset bundles made from a bundle with a front
    carry the front file its manifest names, so ``front`` then ``build --precision fp16
    --feed uint8`` works in that order; ``inspect`` lists it."""
    from armscope.calibration.derive import subset_bundle
    from armscope.calibration.quantize import make_reduced_bundle
    from armscope.cli import main

    make_reduced_bundle(fronted, tmp_path / "fp16", "fp16", holdout=FRAMES)
    subset_bundle(load_bundle(fronted), [0], tmp_path / "one")
    frame = load_image(FRAMES[0])
    for root in (tmp_path / "fp16", tmp_path / "one"):
        derived = load_bundle(root)   # verifies the front's sha256 against the copied manifest block
        source = front.entry(load_bundle(fronted))
        block = front.entry(derived)
        assert block["sha256"] == source["sha256"] and block["parity"]["max_abs_pixel"] == 0
        # measured on the source's graphs; bit-identical pixels carry it over, and the block says so
        assert block["parity"]["measured_on"]["ensemble_sha256"] == load_bundle(fronted).manifest["ensemble"]["sha256"]
        assert block["parity"]["decision_flips"] == 0 and "bit-identical" in block["parity"]["note"]
        with open_backend(derived, "onnxruntime", feed="uint8") as u8, open_backend(derived, "onnxruntime") as f32:
            got = u8.infer(front.camera_crop(frame, derived.preprocessing)[None])["probs"]
            want = f32.infer(preprocess_frame(frame, derived.preprocessing)[None])["probs"]
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert main(["inspect", str(tmp_path / "fp16")]) == 0
    assert f"uint8 front {front.FILE}" in capsys.readouterr().out
