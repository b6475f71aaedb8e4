"""INT8 Q/DQ and FP16 bundles from the demo bundle, measured on real frames.

One member of the demo ensemble keeps the calibration runs short (about 15 s
per quantization on 2 cores); the full pipeline is the same for five."""
from __future__ import annotations

import importlib.util
import json
from collections import Counter

import numpy as np
import onnx
import pytest

from armscope.core.bundle import load_bundle
from armscope.cli import main
from armscope.core.errors import ArmscopeError
from armscope.calibration import accuracy
from armscope.calibration.calibration_set import build_calibration_set
from armscope.calibration.derive import subset_bundle
from armscope.calibration.graph import sensitive_nodes
from armscope.calibration.quantize import make_reduced_bundle

from repo_paths import HE, SAMPLES

FIELD = HE / "cmu-small-region"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    bundle = subset_bundle(load_bundle(SAMPLES / "demo_bundle"), [0], root / "fp32")
    calib = root / "calib.npz"
    build_calibration_set([FIELD], calib, size=3, frame_size=(1600, 1200))
    return {"root": root, "fp32": bundle, "calib": calib, "holdout": SAMPLES / "frames"}


@pytest.fixture(scope="module")
def int8_auto(work):
    out = work["root"] / "int8"
    rc = main(["quantize", str(work["fp32"]), "--out", str(out), "--calib", str(work["calib"]),
               "--holdout", str(work["holdout"])])
    return out, rc


def test_sensitive_nodes_found_by_structure():
    model = onnx.load(str(SAMPLES / "demo_bundle" / "members" / "member_0.onnx"))
    groups = sensitive_nodes(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert len(groups["first_conv"]) == 16 and all(ops[n] == "Conv" for n in groups["first_conv"])
    assert sorted(ops[n] for n in groups["heads"]) == ["MatMul", "MatMul"]  # final_head, patch_heads
    cam_ops = Counter(ops[n] for n in groups["cam"])
    assert cam_ops["MatMul"] == 1 and cam_ops["Softmax"] == 2 and "Conv" not in cam_ops


@pytest.mark.slow
def test_int8_bundle_measured_both_ways_and_gated(work, int8_auto):
    out, rc = int8_auto
    bundle = load_bundle(out)
    m = bundle.manifest
    q = m["quantization"]
    assert m["precision"] == "int8" and m["name"].endswith("-int8")
    assert q["source"]["ensemble_sha256"] == load_bundle(work["fp32"]).manifest["ensemble"]["sha256"]
    assert set(q["variants"]) == {"all-int8", "keep-fp32:first_conv,heads,cam"}
    assert q["variant"] in q["variants"] and q["evaluated_on"] == "holdout" and q["evaluation_images"] == 4
    for v in q["variants"].values():
        s = v["summary"]
        assert 0 <= s["top1_agreement"] <= 1 and s["max_abs_delta_p"] >= s["mean_abs_delta_p"] >= 0
        assert -1 <= s["cam_pearson_mean"] <= 1
    ops = Counter(n.op_type for n in onnx.load(str(bundle.ensemble_path)).graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    # The outcome, pinned (member 0 of the demo bundle, the 3-frame calibration set of the CMU field,
    # the 4 frames as hold-out): the gate judges the exact Q/DQ graph (float arithmetic on integer values,
    # the same on any x86 CPU). Measured: both variants agree 4/4 at top-1, no flip, CAM r 0.997 / 0.998,
    # max |delta p| 0.050 / 0.018; the one keeping first_conv, heads and cam in FP32 is chosen (smaller delta).
    for v in q["variants"].values():
        s = v["summary"]
        assert s["top1_agreement"] == 1.0 and s["decision_flips"] == 0 and s["cam_pearson_mean"] > 0.99, s
        assert accuracy.gate(s) == []
    assert q["variant"] == "keep-fp32:first_conv,heads,cam"
    assert q["variants"]["keep-fp32:first_conv,heads,cam"]["summary"]["max_abs_delta_p"] < 0.03
    assert q["variants"]["all-int8"]["summary"]["max_abs_delta_p"] < 0.1
    assert q["gate"]["failed"] == [] and q["deployable"] is True and q["forced"] is False
    assert rc == 0
    # it runs like any bundle on ONNX Runtime
    out_probs = accuracy.run_bundle(bundle, np.full((1, 640, 640, 3), 128, np.float32))["probs"]
    assert out_probs.shape == (1, 2) and abs(float(out_probs.sum()) - 1) < 1e-3


@pytest.mark.slow
def test_auto_runs_an_int8_bundle_on_openvino_where_int8_is_exact(int8_auto, real_inputs, monkeypatch):
    """``--backend auto`` on the CPU: an INT8 bundle goes to OpenVINO where the CPU computes INT8
    exactly (there ONNX Runtime ran INT8 slower than FP32, OpenVINO 1.8-2.4x faster). On a CPU
    without VNNI/AMX it is refused, by ONNX Runtime; the wiring to OpenVINO is then checked with the
    exactness answer a VNNI/AMX CPU gives."""
    pytest.importorskip("openvino")
    from armscope.edge.backends import cpu_features, open_backend
    from armscope.edge.backends.onnxruntime_backend import OnnxRuntimeBackend

    bundle = load_bundle(int8_auto[0])
    exact_here = cpu_features.int8_exact()[0]
    if not exact_here:
        with pytest.raises(ArmscopeError, match="cannot run exactly on this CPU with onnxruntime"):
            open_backend(bundle, "auto")
        monkeypatch.setattr(cpu_features, "int8_exact", lambda *a, **k: (True, "as on a VNNI/AMX CPU"))
    frames = real_inputs[:2]
    with open_backend(bundle, "auto") as backend:
        described = backend.describe()
        out = backend.infer(frames)
    assert described["backend"] == "openvino" and described["layout"] == "merged"
    assert out["probs"].shape == (2, 2) and np.allclose(out["probs"].sum(axis=1), 1, atol=1e-3)
    if exact_here:  # both runtimes exact: the same answers
        with OnnxRuntimeBackend(bundle, "merged") as ort_backend:
            np.testing.assert_allclose(out["probs"], ort_backend.infer(frames)["probs"], atol=2e-3)


@pytest.mark.slow
def test_already_quantized_bundle_is_refused(work, int8_auto):
    out = work["root"] / "twice"
    assert main(["quantize", str(int8_auto[0]), "--out", str(out), "--calib", str(work["calib"])]) == 2
    with pytest.raises(ArmscopeError, match=r"manifest.json: field precision: bundle is already int8"):
        make_reduced_bundle(int8_auto[0], out, "int8", calib=work["calib"])
    assert not out.exists()


@pytest.mark.slow
def test_force_marks_deployable_and_records_it(work):
    out = work["root"] / "forced"
    block = make_reduced_bundle(work["fp32"], out, "int8", calib=work["calib"], keep_fp32="first_conv,heads,cam",
                                method="minmax", force_deployable=True)
    assert block["evaluated_on"].startswith("calibration set")  # no hold-out: never deployable on its own
    assert block["deployable"] is True and block["forced"] is True
    # the only reason it failed: no hold-out (on the calibration frames it agrees 3/3, CAM r > 0.999)
    assert block["gate"]["failed"] == ["not evaluated on a hold-out set (pass --holdout DIR, disjoint from the "
                                       "calibration set)"]
    assert load_bundle(out).manifest["quantization"]["keep_fp32"] == ["first_conv", "heads", "cam"]


def test_bad_inputs_leave_nothing(work, tmp_path):
    out = tmp_path / "q"
    with pytest.raises(ArmscopeError, match="needs --calib"):
        make_reduced_bundle(work["fp32"], out, "int8")
    with pytest.raises(ArmscopeError, match="--keep-fp32 'stem': unknown group"):
        make_reduced_bundle(work["fp32"], out, "int8", calib=work["calib"], keep_fp32="stem",
                            holdout=[work["holdout"]])
    # the hold-out must not share files with the calibration set
    with pytest.raises(ArmscopeError, match="are calibration sources too"):
        make_reduced_bundle(work["fp32"], out, "int8", calib=work["calib"], holdout=[FIELD / "cmu_small_region_level0.jpg"])
    # images smaller than the centre crop (wrong shape) are named
    with pytest.raises(ArmscopeError, match=r"ADI-AAQEFMRI.tif: image is 224x224, smaller than the 1024x1024"):
        make_reduced_bundle(work["fp32"], out, "int8", calib=work["calib"], holdout=[SAMPLES / "he" / "nct-crc-he-100k"])
    corrupt = tmp_path / "c.npz"
    corrupt.write_bytes(b"\x00" * 100)
    assert main(["quantize", str(work["fp32"]), "--out", str(out), "--calib", str(corrupt)]) == 2
    assert not out.exists() and not list(tmp_path.glob(".q.*"))


def test_fp16_bundle_on_onnxruntime_cpu(work):
    out = work["root"] / "fp16"
    block = make_reduced_bundle(work["fp32"], out, "fp16", holdout=[work["holdout"]])
    bundle = load_bundle(out)
    assert bundle.manifest["precision"] == "fp16"
    graph = onnx.load(str(bundle.ensemble_path)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    s = block["variants"]["fp16"]["summary"]
    assert s["max_abs_delta_p"] < 0.01 and s["top1_agreement"] == 1.0 and s["cam_pearson_min"] > 0.99
    assert block["deployable"] is True


def test_accuracy_report(work, tmp_path):
    fp16 = work["root"] / "fp16"
    if not fp16.exists():
        make_reduced_bundle(work["fp32"], fp16, "fp16", holdout=[work["holdout"]])
    labels = tmp_path / "labels.csv"
    names = sorted(p.name for p in work["holdout"].glob("*.jpg"))
    labels.write_text("image,label\n" + "".join(f"{n},{'tumour' if i % 2 else 'other'}\n" for i, n in enumerate(names)))
    out = tmp_path / "report"
    assert main(["accuracy", "--bundle", str(work["fp32"]), "--candidate", str(fp16), "--images",
                 str(work["holdout"]), "--labels", str(labels), "--out", str(out)]) == 0
    charts = {"probs_scatter.png", "delta_p.png", "cam_agreement.png", "cam_worst.png"}  # matplotlib: [plots] extra
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "per_image.csv"} | (
        charts if has_matplotlib else set())
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["n_images"] == 4 and report["summary"]["labelled"] == 4
    assert report["summary"]["auc_ref"] is not None and report["summary"]["auc_cand"] is not None
    md = (out / "report.md").read_text()
    assert "top-1 agreement" in md and "Grad-CAM Pearson" in md and "positive->negative flips" in md
    # bad input: no images -> error, no report
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["accuracy", "--bundle", str(work["fp32"]), "--candidate", str(fp16), "--images", str(empty),
                 "--out", str(tmp_path / "r2")]) == 2
    assert not (tmp_path / "r2").exists()


def test_flips_listed_positive_to_negative_first():
    task = {"type": "binary", "classes": ["other", "tumour"], "positive_class": "tumour", "threshold": 0.3}
    ref = {"probs": np.array([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5], [0.2, 0.8]], np.float32),
           "cam": np.random.default_rng(0).random((4, 2, 20, 20)).astype(np.float32)}
    cand = {"probs": np.array([[0.6, 0.4], [0.8, 0.2], [0.5, 0.5], [0.25, 0.75]], np.float32),
            "cam": ref["cam"].copy()}
    r = accuracy.compare_outputs(ref, cand, task, ["a", "b", "c", "d"], labels=["other", "tumour", "tumour", "tumour"])
    s = r["summary"]
    assert [f["flip"] for f in s["flipped_images"]] == ["positive->negative", "negative->positive"]
    assert s["flipped_images"][0]["image"] == "b"
    assert s["positive_to_negative_flips"] == 1 and accuracy.gate(s)
    # top-1 agrees everywhere, yet two decisions flip at the 0.3 threshold: the gate looks at both
    assert s["top1_agreement"] == 1.0 and s["cam_pearson_min"] == pytest.approx(1.0) and s["cam_iou_min"] == 1.0
    assert accuracy.auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)) == 0.75


def test_gate_fails_a_candidate_whose_heat_maps_differ():
    """Same labels and probabilities, but Grad-CAMs that do not match FP32's
    (what the eyepiece would show): not deployable."""
    task = {"type": "binary", "classes": ["other", "tumour"], "positive_class": "tumour", "threshold": 0.3}
    rng = np.random.default_rng(1)
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]], np.float32)
    cam = rng.random((3, 2, 20, 20)).astype(np.float32)
    ref = {"probs": probs, "cam": cam}
    close = {"probs": probs, "cam": cam + 0.01 * rng.standard_normal(cam.shape).astype(np.float32)}
    other = {"probs": probs, "cam": rng.random(cam.shape).astype(np.float32)}
    names, labels = ["a", "b", "c"], ["other", "tumour", "other"]
    s_close = accuracy.compare_outputs(ref, close, task, names, labels)["summary"]
    s_other = accuracy.compare_outputs(ref, other, task, names, labels)["summary"]
    assert s_close["cam_pearson_mean"] > 0.99 and accuracy.gate(s_close) == []
    assert s_other["top1_agreement"] == 1.0 and s_other["positive_to_negative_flips"] == 0
    assert [r for r in accuracy.gate(s_other) if "Grad-CAM" in r] == accuracy.gate(s_other) != []


@pytest.mark.slow
def test_classify_refuses_a_bundle_that_failed_its_gate(int8_auto, frame_paths, tmp_path, capsys):
    import shutil

    copy = tmp_path / "gated"
    shutil.copytree(int8_auto[0], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["quantization"]["deployable"] = False
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["classify", "--bundle", str(copy), str(frame_paths[0])]) == 2
    assert "field quantization.deployable is false" in capsys.readouterr().err
    manifest["quantization"]["deployable"] = True
    (copy / "manifest.json").write_text(json.dumps(manifest))
    from armscope.edge.backends.cpu_features import int8_exact

    if int8_exact()[0]:
        assert main(["classify", "--bundle", str(copy), str(frame_paths[0])]) == 0
    else:  # this CPU's INT8 kernels saturate: a deployable INT8 bundle is still refused here
        assert main(["classify", "--bundle", str(copy), str(frame_paths[0])]) == 2
        assert "cannot run exactly on this CPU" in capsys.readouterr().err


def test_int8_exactness_by_cpu():
    from armscope.edge.backends.cpu_features import cpu_flags, int8_exact

    assert int8_exact("x86_64", {"avx2", "fma"})[0] is False
    assert int8_exact("x86_64", {"avx2", "avx512f", "avx512_vnni"})[0] is True
    assert int8_exact("x86_64", {"avx2", "avx_vnni"})[0] is True
    assert int8_exact("x86_64", {"amx_int8", "amx_tile"})[0] is True
    assert int8_exact("aarch64", set())[0] is True
    assert cpu_flags("processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni\n") == {"fpu", "avx2", "avx512_vnni"}


@pytest.mark.slow
def test_quantize_gates_the_exact_qdq_graph_and_records_this_cpu(int8_auto):
    """The gate judges the Q/DQ graph (exact arithmetic, as TensorRT and VNNI CPUs);
    this CPU's own INT8 kernels are measured as well and recorded."""
    from armscope.edge.backends.cpu_features import cpu_flags

    q = load_bundle(int8_auto[0]).manifest["quantization"]
    assert q["evaluation"].startswith("exact Q/DQ")
    here = q["this_cpu"]
    kernels = here["onnxruntime_int8_kernels"]
    assert kernels["n_images"] == 4 and 0 <= kernels["top1_agreement"] <= 1
    # Per CPU, from /proc/cpuinfo's flags, not from the function that wrote the record.
    vnni = bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})
    if vnni:   # measured on an AMD EPYC with AVX512-VNNI: the INT8 kernels agree as the exact graph does
        assert here["int8_exact"] is True and "32 bits" in here["why"]
        assert kernels["top1_agreement"] == 1.0 and kernels["cam_pearson_mean"] > 0.99, kernels
    else:      # AVX2 only: saturating 16-bit sums; recorded, and the bundle is refused at run time here
        assert here["int8_exact"] is False and "vpmaddubsw" in here["why"]


def test_entropy_calibration_clips_outliers_unlike_minmax(tmp_path, work):
    """--method entropy must pick KL-optimal thresholds (2048-bin histogram, as
    TensorRT's entropy calibrator), not silently fall back to the full range:
    onnxruntime's quantize_static alone uses 128 bins and 128 quantized bins,
    which leaves the full range as the only candidate."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization import calibrate

    if not hasattr(calibrate, "load_tensors_data"):  # calibration caches: onnxruntime >= 1.32
        with pytest.raises(ArmscopeError, match="--method entropy needs onnxruntime 1.32 or newer"):
            make_reduced_bundle(work["fp32"], tmp_path / "out", "int8", calib=work["calib"], method="entropy")
        assert not (tmp_path / "out").exists()
        pytest.skip("this onnxruntime has no calibration caches: --method entropy is refused (checked)")
    from onnxruntime.quantization.calibrate import create_calibrator, load_tensors_data

    from armscope.calibration.quantize import _entropy_ranges, _Reader

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         helper.make_node("Conv", ["r1", "w2"], ["out"], name="conv2")],
        "toy", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 16, 16])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "toy.onnx"
    onnx.save(model, path)
    images = rng.normal(0, 1, (8, 3, 16, 16)).astype(np.float32)
    images[0, 0, 0, 0] = 40.0  # one outlier pixel

    cache = tmp_path / "ranges.json"
    _entropy_ranges(path, images, ["Conv"], cache)
    entropy = load_tensors_data(cache)
    minmax = create_calibrator(path, ["Conv"], augmented_model_path=str(tmp_path / "aug.onnx"),
                               calibrate_method=CalibrationMethod.MinMax, extra_options={"symmetric": True})
    minmax.collect_data(_Reader(images))
    full_hi = float(np.max(np.abs(minmax.compute_data()["image"].range_value)))
    ent_hi = float(np.max(np.abs(entropy["image"].range_value)))
    assert entropy.calibration_method == CalibrationMethod.Entropy
    assert full_hi >= 39.0
    assert ent_hi < 0.5 * full_hi, (ent_hi, full_hi)


def test_preprocessing_leaves_nothing_in_the_working_directory(tmp_path, monkeypatch):
    """ORT's symbolic shape inference fails on the tf2onnx members and then
    saves its partial model (sym_shape_infer_temp.onnx + a uuid-named .data)
    wherever quantize runs; those are removed, a user's own files are not."""
    from armscope.calibration.quantize import preprocess_member

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    mine = [cwd / "notes.txt", cwd / "00000000-0000-0000-0000-000000000000.data"]
    for f in mine:
        f.write_text("mine")
    monkeypatch.chdir(cwd)
    info = preprocess_member(SAMPLES / "demo_bundle" / "members" / "member_0.onnx", tmp_path / "pre.onnx")
    assert info == {"symbolic_shape_inference": False}  # the failing pass ran (what leaves the files)
    assert sorted(cwd.iterdir()) == sorted(mine)
    assert onnx.load(str(tmp_path / "pre.onnx")).graph.node
