"""Bundles of issue 17's contract (any square input S, CAM of any H x W,
patch_probs optional, one sigmoid unit as probs [1 - p, p]) through everything
that consumes bundles: the loader, ONNX Runtime and OpenVINO, ``classify`` with
overlays, the daemon, calibration + INT8/FP16 + the accuracy gate, cascades.
The bundles are real convolutional ONNX graphs built without TensorFlow
(tests/general_bundle_support.py) and every output is checked against the
same graph computed in numpy, on the real camera frames in samples/frames."""
from __future__ import annotations

import importlib.util

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from armscope.core import protocol
from armscope.core.bundle import load_bundle
from armscope.cli import main
from armscope.core.errors import ArmscopeError
from armscope.core.preprocess import crop_box, load_image, preprocess_frame
from armscope.edge.backends import open_backend

from daemon_support import running, wait_for
from general_bundle_support import ModelSpec, ensemble_reference, write_general_bundle

from repo_paths import DEMO_BUNDLE, FRAMES, HE

FIELD = HE / "cmu-small-region"

SPECS = {
    # whole-image binary classifier with one sigmoid unit, odd S (a 19 x 19 CAM)
    "sigmoid75": (ModelSpec(75, ("other", "tumour"), head="sigmoid"), None),
    # whole-image 3-class softmax with a non-square 24 x 12 CAM
    "softmax96": (ModelSpec(96, ("a", "b", "c"), conv2_strides=(1, 2)), None),
    # tiled: 2 x 2 patches of 32, shared per-patch heads (patch_probs), 16 x 16 CAM
    "tiled64": (ModelSpec(64, ("other", "tumour"), grid=2), None),
    # a second step for a cascade after sigmoid75 (same preprocessing)
    "subtypes75": (ModelSpec(75, ("IMNM", "DM", "IBM")), None),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (bundle dir, spec, member params); every bundle with 2 members."""
    root = tmp_path_factory.mktemp("general")
    out = {}
    for i, (name, (spec, task)) in enumerate(SPECS.items()):
        path, params = write_general_bundle(root / name, spec, seeds=(10 * i, 10 * i + 1), task=task, name=name)
        out[name] = (path, spec, params)
    return out


def frames_for(bundle, paths=FRAMES) -> np.ndarray:
    return np.stack([preprocess_frame(load_image(p), bundle.preprocessing) for p in paths])


def test_manifests_load_and_inspect_describes_them(built, capsys):
    assert load_bundle(DEMO_BUNDLE).output_names == ("probs", "patch_probs", "cam")
    for name, (path, spec, _) in built.items():
        bundle = load_bundle(path)
        assert bundle.input_size == spec.size
        assert bundle.output_names == (("probs", "patch_probs", "cam") if spec.grid else ("probs", "cam"))
    assert main(["inspect", str(built["sigmoid75"][0])]) == 0
    out = capsys.readouterr().out
    assert "whole-image-classifier" in out and "input 75x75" in out and "sigmoid head" in out and "CAM 19x19" in out
    assert main(["inspect", str(built["tiled64"][0])]) == 0
    out = capsys.readouterr().out
    assert "tiled-patch-classifier" in out and "2x2 patches of 32" in out and "CAM 16x16" in out


@pytest.mark.parametrize("name", ["sigmoid75", "softmax96", "tiled64"])
@pytest.mark.parametrize("kind, layout", [("onnxruntime", "members"), ("onnxruntime", "merged"),
                                          ("openvino", "merged")])
def test_backends_match_the_graph_computed_in_numpy(built, name, kind, layout):
    path, spec, params = built[name]
    bundle = load_bundle(path)
    x = frames_for(bundle)
    expected = ensemble_reference(spec, params, x)
    with open_backend(bundle, kind, layout=layout, threads=2) as backend:
        got = backend.infer(x)
    assert set(got) == set(bundle.output_names)
    h, w = spec.map_shape()
    assert got["cam"].shape == (len(FRAMES), len(spec.classes), h, w)
    for key in got:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-4, rtol=1e-4, err_msg=f"{name} {kind} {key}")
    np.testing.assert_allclose(got["probs"].sum(axis=1), 1.0, atol=1e-5)
    assert (got["cam"] >= 0).all() and got["cam"].max() > 0


@pytest.mark.parametrize("name", ["sigmoid75", "softmax96"])
def test_classify_writes_overlays_and_decides(built, name, tmp_path, capsys):
    path, spec, params = built[name]
    bundle = load_bundle(path)
    overlays, report = tmp_path / "overlays", tmp_path / "report.json"
    rc = main(["classify", *map(str, FRAMES), "--bundle", str(path), "--overlay-dir", str(overlays),
               "--json", str(report), "--backend", "onnxruntime"])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads(report.read_text())
    expected = ensemble_reference(spec, params, frames_for(bundle))
    for i, (frame_path, row) in enumerate(zip(FRAMES, result["images"])):
        np.testing.assert_allclose([row["probs"][c] for c in spec.classes], expected["probs"][i], atol=1e-4)
        assert row["decision"]["label"] in printed.splitlines()[i + 1]
        overlay = cv2.imread(str(overlays / f"{frame_path.stem}_overlay.png"))
        frame = load_image(frame_path)
        assert overlay.shape == frame.shape
        top, left, size = crop_box(frame.shape, bundle.preprocessing)
        inside = np.abs(overlay[top:top + size, left:left + size].astype(int) - frame[top:top + size, left:left + size])
        assert inside.mean() > 3, "no heat map blended into the crop box"
        assert np.array_equal(overlay[:top - 2], frame[:top - 2]) and np.array_equal(overlay[:, :left - 2], frame[:, :left - 2])
    assert "slide (mean)" in printed


def test_daemon_publishes_overlays_of_a_whole_image_bundle(built, tmp_path):
    """The non-square 24 x 12 CAM of a 96 x 96 whole-image model, upsampled to the overlay."""
    path, spec, params = built["softmax96"]
    bundle = load_bundle(path)
    expected = ensemble_reference(spec, params, frames_for(bundle))["probs"]
    with running(path, f"image://{FRAMES[1]}?fps=6", tmp_path, overlay_size=200,
                 backend="onnxruntime", rendered_topic=True) as daemon:
        with protocol.Subscriber(daemon.endpoints["publish"], topics=["overlay", "rendered"], rcvbuf=1 << 20) as sub:
            message, _ = wait_for(sub, lambda m: True, 60, topic="overlay")
            second, _ = wait_for(sub, lambda m: m.header["frame_id"] > message.header["frame_id"], 30, topic="overlay")
            bitmap, _ = wait_for(sub, lambda m: True, 30, topic="rendered")
    for m in (message, second):
        assert m.header["classes"] == list(spec.classes)
        np.testing.assert_allclose(m.header["probs"], expected[1], atol=1e-4)
        # v2: the model's non-square CAM crosses the wire as it is, over the crop the model saw
        c, r = m.header["cam"], m.header["region"]
        top, left, size = crop_box((r["frame_height"], r["frame_width"], 3), bundle.preprocessing)
        assert r == {"frame_width": r["frame_width"], "frame_height": r["frame_height"], "x": left, "y": top,
                     "size": size}
        assert c["box"] == {"x": left, "y": top, "size": size}
        assert sorted((c["height"], c["width"])) == [12, 24]
        assert c["peak"] > 0 and protocol.cam_array(m)[c["index"]].max() > 0
        x, y, w, h = m.header["focus_bbox"]   # camera pixels, inside the region shown
        assert r["x"] <= x < x + w <= r["x"] + r["size"] and r["y"] <= y < y + h <= r["y"] + r["size"]
    # the opt-in rendered topic: the same overlay as a bitmap of the region, focus box in its pixels
    assert bitmap.header["classes"] == list(spec.classes)
    np.testing.assert_allclose(bitmap.header["probs"], expected[1], atol=1e-4)
    rgba = protocol.overlay_image(bitmap)
    assert rgba.shape == (200, 200, 4) and rgba[..., 3].max() > 0
    x, y, w, h = bitmap.header["focus_bbox"]
    assert 0 <= x < x + w <= 200 and 0 <= y < y + h <= 200


def test_calibration_quantization_and_accuracy_gate(built, tmp_path, capsys):
    path, spec, _ = built["sigmoid75"]
    calib = tmp_path / "calib.npz"
    assert main(["calibration-set", str(FIELD), "--out", str(calib), "--size", "3", "--bundle", str(path),
                 "--frame-size", "1600x1200"]) == 0
    with np.load(calib) as data:
        assert data["images"].shape == (3, 75, 75, 3) and data["images"].dtype == np.uint8
    for precision, extra in [("int8", ["--calib", str(calib)]), ("fp16", [])]:
        out = tmp_path / precision
        rc = main(["quantize", str(path), "--out", str(out), "--precision", precision, *extra,
                   "--holdout", *map(str, FRAMES)])
        reduced = load_bundle(out)
        q = reduced.manifest["quantization"]
        # Pinned (seeded members, exact Q/DQ: the same on any x86 CPU): both precisions agree 4/4 with FP32,
        # no flip, CAM r > 0.999; INT8 keeps first_conv, heads and cam in FP32 (max |delta p| 0.0006 vs 0.012)
        assert (rc, q["deployable"], q["gate"]["failed"]) == (0, True, []), q["gate"]
        assert q["variant"] == {"int8": "keep-fp32:first_conv,heads,cam", "fp16": "fp16"}[precision]
        s = q["variants"][q["variant"]]["summary"]
        assert s["top1_agreement"] == 1.0 and s["decision_flips"] == 0 and s["cam_pearson_mean"] > 0.99, s
        assert s["n_images"] == len(FRAMES) and 0 <= s["top1_agreement"] <= 1
        assert s["cam_pearson_mean"] > 0.9, s  # the 19 x 19 CAMs compared at their own size
        assert reduced.output_names == ("probs", "cam")
        assert all(o.name != "patch_probs" for o in onnx.load(str(reduced.ensemble_path)).graph.output)
        if precision == "int8":
            ops = {n.op_type for n in onnx.load(str(reduced.ensemble_path)).graph.node}
            assert "QuantizeLinear" in ops
            report = tmp_path / "report"
            assert main(["accuracy", "--bundle", str(path), "--candidate", str(out), "--exact-qdq",
                         "--images", *map(str, FRAMES), "--out", str(report)]) == 0
            summary = json.loads((report / "report.json").read_text())["summary"]
            assert summary["n_images"] == len(FRAMES) and summary["cam_pearson_mean"] > 0.9
            # the charts need matplotlib (the [plots] extra); without it the report says they were skipped
            has_matplotlib = importlib.util.find_spec("matplotlib") is not None
            assert (report / "cam_worst.png").is_file() == has_matplotlib
    capsys.readouterr()


def test_sensitive_nodes_of_a_whole_image_graph(built):
    """The Dense after the pool is a head; the closed-form CAM that multiplies the
    unpooled map by the same kernel is in the cam group (kept FP32 with it)."""
    from armscope.calibration.graph import name_nodes, sensitive_nodes

    model = name_nodes(onnx.load(str(load_bundle(built["softmax96"][0]).member_paths[0])))
    ops = {n.name: n.op_type for n in model.graph.node}
    groups = sensitive_nodes(model)
    assert [ops[n] for n in groups["first_conv"]] == ["Conv"]
    assert [ops[n] for n in groups["heads"]] == ["Gemm"]
    assert {"Einsum", "Relu", "Softmax"} <= {ops[n] for n in groups["cam"]}


def test_cascade_of_whole_image_bundles(built, tmp_path):
    from armscope.edge.cascade import assemble
    from armscope.edge.classify import classify_images

    step_one, _, params_one = built["sigmoid75"]
    step_two, spec_two, params_two = built["subtypes75"]
    cascade = assemble(step_one, {"tumour": step_two}, tmp_path / "cascade")
    report = classify_images(cascade.root, FRAMES, backend="onnxruntime")
    x = frames_for(cascade)
    p_one = ensemble_reference(built["sigmoid75"][1], params_one, x)["probs"]
    p_two = ensemble_reference(spec_two, params_two, x)["probs"]
    for i, row in enumerate(report["images"]):
        if row["decision"]["label"] == "tumour":
            np.testing.assert_allclose(row["subtype"]["probs"], p_two[i], atol=1e-4)
        else:
            assert "subtype" not in row
    assert any("subtype" in r for r in report["images"]), p_one
    # a step made for another input size cannot take step one's preprocessed field
    with pytest.raises(ArmscopeError, match=r"field task\.steps\.0\.bundle: .* preprocesses as .*resize=96.* step one as .*resize=75"):
        assemble(step_one, {"tumour": built["softmax96"][0]}, tmp_path / "mismatch")
    assert not (tmp_path / "mismatch").exists()


def _edit(path: Path, edit) -> None:
    manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))


def _drop_output(name):
    return lambda m: m.update(outputs=[o for o in m["outputs"] if o["name"] != name])


@pytest.mark.parametrize("source, edit, message", [
    ("sigmoid75", lambda m: m["preprocessing"].update(resize=96),
     r"field preprocessing\.resize: 96 does not match field inputs\.0\.shape \['N', 75, 75, 3\]"),
    ("sigmoid75", lambda m: m["inputs"][0].update(shape=["N", 75, 74, 3]), r"field inputs\.0\.shape: .* expected \[N, S, S, 3\]"),
    ("sigmoid75", lambda m: m["inputs"][0].update(name="input_1"), r"field inputs: \['input_1'\], expected exactly one input 'image'"),
    ("sigmoid75", lambda m: m["model"].update(input_size=299), r"field model\.input_size: 299 does not match"),
    ("sigmoid75", lambda m: m["model"].update(architecture="transformer"), r"field model\.architecture: 'transformer' is not one of"),
    ("sigmoid75", lambda m: m["model"]["cam"].pop("score"), r"field model\.cam: 'score' is a required property"),
    ("sigmoid75", lambda m: m["model"].pop("cam"), r"field model: 'cam' is a required property"),
    ("sigmoid75", _drop_output("cam"), r"field outputs: missing \['cam'\]"),
    ("sigmoid75", lambda m: m["outputs"][1].update(shape=["N", 2, 19]), r"field outputs\.1\.shape: cam .* rank 3, expected 4"),
    ("sigmoid75", lambda m: m["outputs"].insert(1, {"name": "patch_probs", "shape": ["N", 4, 2], "dtype": "float32"}),
     r"field model\.per_patch_heads: 'none', but outputs have patch_probs"),
    ("tiled64", lambda m: m["model"].pop("grid"), r"field model: 'grid' is a required property"),
    ("tiled64", lambda m: m["model"].update(map_size=20), r"field model\.map_size: 20 does not match field outputs\.2\.shape"),
    ("tiled64", _drop_output("patch_probs"), r"field model\.per_patch_heads: 'shared', but outputs lack patch_probs"),
])
def test_manifests_that_contradict_themselves_are_refused_naming_the_field(built, tmp_path, source, edit, message):
    copy = tmp_path / "copy"
    shutil.copytree(built[source][0], copy)
    _edit(copy, edit)
    with pytest.raises(ArmscopeError, match=message):
        load_bundle(copy)


@pytest.mark.parametrize("kind", ["onnxruntime", "openvino"])
def test_a_graph_without_a_declared_output_is_refused_by_the_backend(built, tmp_path, kind):
    """patch_probs declared but not in the graph: refused at activation, naming what is missing."""
    copy = tmp_path / "copy"
    shutil.copytree(built["sigmoid75"][0], copy)

    def declare(m):
        m["model"].pop("per_patch_heads")
        m["outputs"].insert(1, {"name": "patch_probs", "shape": ["N", 4, 2], "dtype": "float32"})
    _edit(copy, declare)
    with pytest.raises(ArmscopeError, match=r"expected input \['image'\] and outputs \['probs', 'patch_probs', 'cam'\]"):
        open_backend(load_bundle(copy), kind, layout="merged").activate()
