"""The renal electron-microscopy system (issue 19): a ResNet-shaped feature
extractor with skip features and a scikit-learn SVC head, beside a plain
ResNet-shaped softmax classifier of another input size, averaged in one
bundle. Narrow seeded stand-ins built here; the SVCs are trained here on the
stand-in's features of crops of the real NCT-CRC-HE-100K tiles (the stand-in
for EM images). Checked: probabilities against Keras and scikit-learn's
``predict_proba`` (binary and three classes, with a StandardScaler), the SVM
member's in-graph Grad-CAM against tf.GradientTape on the Keras model times
the SVM score's gradient measured on scikit-learn itself (finite
differences), a pickle refused without --trust-code, classify and the daemon,
the INT8/FP16 gate, and that schema 1 bundles still load."""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import cv2
import joblib
import numpy as np
import onnxruntime as ort
import pytest

from armscope.core.bundle import load_bundle
from armscope.cli import main
from armscope.core.errors import ArmscopeError

pytest.importorskip("tensorflow")
pytest.importorskip("sklearn")
pytestmark = pytest.mark.tf

import resnet_zoo_support as rz  # noqa: E402  (tests/ is on sys.path: rootdir conftest)

from repo_paths import DEMO_BUNDLE, REPO
HOST = 96  # the bundle's input: the plain member's size; the SVM member (64) resizes in its graph


def export_renal(tmp: Path, features, plain, head, classes, out: Path, *extra) -> int:
    return main(["export", str(features), str(plain), "--svm-head", f"{features}={head}",
                 "--scaling", f"{features}=caffe", "--scaling", f"{plain}=caffe", "--trust-code",
                 "--classes", ",".join(classes), "--crop", "224", "--out", str(out),
                 # 224 px tiles at 0.5 um/px are softer than the 640 px camera fields the default gate is tuned on
                 "--tissue-gate", "min_focus=40", *extra])


@pytest.fixture(scope="module")
def renal(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("renal")
    fm = rz.skip_features(64, seed=0)
    pm = rz.plain_classifier(HOST, classes=2, seed=1)
    svm = rz.train_svm(fm, REPO, rz.BINARY)
    fm.save(tmp / "features.keras")
    pm.save(tmp / "plain.keras")
    joblib.dump(svm, tmp / "svm.joblib")
    out = tmp / "bundle"
    classes = ["tumour", "other"]  # not scikit-learn's sorted order: the export reorders the SVM's columns
    assert export_renal(tmp, tmp / "features.keras", tmp / "plain.keras", tmp / "svm.joblib", classes, out) == 0
    return {"tmp": tmp, "fm": fm, "pm": pm, "svm": svm, "bundle": out, "classes": classes}


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(path, x) -> dict:
    s = session(path)
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"image": x})))


def member_input(x: np.ndarray, size: int) -> np.ndarray:
    from armscope.export import member_input as mi

    return np.asarray(mi.to_member(x, HOST, size, "caffe"))


def sklearn_scores(estimator, v: np.ndarray) -> np.ndarray:
    """The SVM's Grad-CAM score from scikit-learn itself: s_c = sum_j f_cj over its one-vs-one decision values."""
    svc = estimator[-1] if hasattr(estimator, "steps") else estimator
    shape, svc.decision_function_shape = svc.decision_function_shape, "ovo"
    try:
        d = estimator.decision_function(v)
    finally:
        svc.decision_function_shape = shape
    k = len(svc.classes_)
    if k == 2:  # scikit-learn gives -f_01: positive means classes_[1]
        return np.stack([-d, d], axis=1)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    s = np.zeros((len(v), k))
    for p, (i, j) in enumerate(pairs):
        s[:, i] += d[:, p]
        s[:, j] -= d[:, p]
    return s


def reference_svm_cam(model, estimator, x: np.ndarray, order: list[int]) -> np.ndarray:
    """(N, C, h, w): d s_c / d v measured on scikit-learn by central differences, chained to the deepest
    map by tf.GradientTape through the Keras model's own pooling and concatenation layers. (The tape
    starts at the map: recording the backbone too makes TensorFlow's oneDNN conv2d_backprop_filter
    crash on this narrow stem, and the gradient w.r.t. the map does not pass through it.)"""
    import tensorflow as tf

    from armscope.export.feature_model import find_feature_structure
    from armscope.export.graph import sub_model

    st = find_feature_structure(model, "m")
    pools = [model.get_layer(name) for name in st.pooled_layers]
    concat = model.get_layer("skip_features")
    parts = sub_model(model, [*st.maps, model.outputs[0]], "reference")
    outs = parts(x, training=False)
    maps, v = [np.asarray(t) for t in outs[:-1]], np.asarray(outs[-1], np.float64)
    sl = st.channel_slice
    grads = np.zeros((len(x), len(order), sl.stop - sl.start))
    # steps small against the SVM's own length scale of each feature (a StandardScaler's std)
    unit = estimator[0].scale_ if hasattr(estimator, "steps") else np.maximum(1.0, np.abs(v).max(axis=0))
    for d in range(sl.start, sl.stop):
        step = np.zeros(v.shape[1])
        step[d] = 1e-3 * unit[d]
        diff = (sklearn_scores(estimator, v + step) - sklearn_scores(estimator, v - step)) / (2 * step[d])
        grads[:, :, d - sl.start] = diff[:, order]
    a = tf.convert_to_tensor(maps[st.deepest])
    cams = []
    for c in range(len(order)):
        with tf.GradientTape() as tape:
            tape.watch(a)
            pooled = [pool(a if i == st.deepest else tf.convert_to_tensor(m)) for i, (pool, m) in
                      enumerate(zip(pools, maps))]
            feats = concat(pooled)
            np.testing.assert_allclose(np.asarray(feats), v, rtol=1e-5, atol=1e-5)  # the same features
            target = tf.reduce_sum(feats[:, sl] * tf.constant(grads[:, c], tf.float32))
        alpha = tf.reduce_mean(tape.gradient(target, a), axis=(1, 2))
        cams.append(tf.nn.relu(tf.einsum("bijd,bd->bij", a, alpha)).numpy())
    return np.stack(cams, axis=1)


def check_bundle(bundle: Path, fm, pm, svm, classes) -> None:
    import tensorflow as tf

    from armscope.export.onnx_export import keras_probs
    from armscope.export.structure import find_structure

    x = rz.host_images(REPO, HOST)
    svc = svm[-1] if hasattr(svm, "steps") else svm
    order = [list(svc.classes_).index(c) for c in classes]
    v = rz.features_of(fm, member_input(x, 64), scaling="none")
    ref_svm = svm.predict_proba(v)[:, order]
    got_svm = run(bundle / "members" / "member_0.onnx", x)
    assert np.max(np.abs(got_svm["probs"] - ref_svm)) <= 1e-4
    assert np.ptp(ref_svm[:, 0]) > 0.05, "the SVM gives every tile the same probability: the check proves little"
    ref_plain = keras_probs(pm, find_structure(pm, "p"), member_input(x, HOST))
    got_plain = run(bundle / "members" / "member_1.onnx", x)
    assert np.max(np.abs(got_plain["probs"] - ref_plain)) <= 1e-4
    got = run(bundle / "ensemble.onnx", x)
    assert np.max(np.abs(got["probs"] - (ref_svm + ref_plain) / 2)) <= 1e-4
    # the SVM member's Grad-CAM (4 x 4 map, resized in its graph to the bundle's 6 x 6)
    ref = reference_svm_cam(fm, svm, member_input(x, 64), order)
    ref = tf.transpose(tf.image.resize(tf.transpose(ref, (0, 2, 3, 1)), (6, 6), method="bilinear"), (0, 3, 1, 2))
    ref = np.asarray(ref)
    cam = got_svm["cam"]
    assert cam.shape == ref.shape == (len(x), len(classes), 6, 6)
    compared = 0
    for n in range(len(x)):
        for c in range(len(classes)):
            if ref[n, c].max() <= 1e-6 * (np.abs(ref).max() + 1e-12):
                assert cam[n, c].max() <= 1e-4 * (np.abs(cam).max() + 1e-12)
                continue
            assert np.corrcoef(ref[n, c].ravel(), cam[n, c].ravel())[0, 1] >= 0.999, (n, c)
            compared += 1
    assert compared >= len(x)


def test_binary_svm_and_plain_members_match_keras_and_sklearn(renal):
    m = json.loads((renal["bundle"] / "manifest.json").read_text())
    assert m["schema_version"] == 2 and m["task"]["classes"] == ["tumour", "other"]
    assert m["inputs"][0]["shape"] == ["N", HOST, HOST, 3] and m["preprocessing"]["center_crop"] == 224
    first, second = m["members"]
    assert first["preprocessing"] == {**first["preprocessing"], "input_size": 64, "resize": "bilinear",
                                      "scaling": "caffe"}
    assert second["preprocessing"]["resize"] == "none" and second["preprocessing"]["input_size"] == HOST
    assert first["model"]["head"] == "svm" and first["model"]["feature_layer"] == "conv4_block1_out"
    assert first["model"]["features"]["size"] == 8 + 12 + 16 and first["cam_resized"]["from"] == [4, 4]
    assert "vote margin" in m["model"]["cam"]["score"] and "class logit" in m["model"]["cam"]["score"]
    load_bundle(renal["bundle"])
    check_bundle(renal["bundle"], renal["fm"], renal["pm"], renal["svm"], renal["classes"])


def test_three_classes_with_a_scaler(renal, tmp_path):
    """libsvm's iterative pairwise coupling for three classes, after a StandardScaler."""
    svm = rz.train_svm(renal["fm"], REPO, rz.THREE, scaler=True)
    pm = rz.plain_classifier(HOST, classes=3, seed=2)
    joblib.dump(svm, tmp_path / "svm3.joblib")
    pm.save(tmp_path / "plain3.keras")
    classes = ["epithelial", "stromal", "other"]
    out = tmp_path / "b3"
    assert export_renal(tmp_path, renal["tmp"] / "features.keras", tmp_path / "plain3.keras",
                        tmp_path / "svm3.joblib", classes, out) == 0
    check_bundle(out, renal["fm"], pm, svm, classes)


def test_a_pickle_is_refused_without_trust_code(renal, tmp_path, capsys):
    t = renal["tmp"]
    out = tmp_path / "refused"
    base = ["export", str(t / "features.keras"), str(t / "plain.keras"),
            "--svm-head", f"{t / 'features.keras'}={t / 'svm.joblib'}"]
    for args in (base + ["--out", str(out)], base + ["--explain"]):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert f"{t / 'svm.joblib'}: the SVM head file is a pickle (joblib) and carries code" in err
        assert "sklearn.svm._classes.SVC" in err and "--trust-code" in err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert not out.exists() and not list(tmp_path.glob(".refused*"))
    assert main(base + ["--explain", "--trust-code"]) == 0
    text = capsys.readouterr().out
    assert "SVC(kernel='rbf'" in text and "feature map conv4_block1_out: 4x4x16" in text
    # a member named in --svm-head must be one of the members
    assert main(["export", str(t / "plain.keras"), "--svm-head", f"{t / 'features.keras'}={t / 'svm.joblib'}",
                 "--trust-code", "--out", str(out)]) == 2
    assert "is not one of the members given" in capsys.readouterr().err


def test_classify_and_the_daemon_run_it(renal, tmp_path, capsys):
    from armscope.core import protocol
    from armscope.core.preprocess import load_image, preprocess_frame
    from daemon_support import OS_PORT, wait_for
    from armscope.edge.config import load_config
    from armscope.edge.daemon import Daemon

    bundle = load_bundle(renal["bundle"])
    tiles = [rz.tile_paths(REPO)[t] for t in ("TUM", "NORM", "STR", "MUS")]
    x = np.stack([preprocess_frame(load_image(p), bundle.preprocessing) for p in tiles])
    expected = run(renal["bundle"] / "ensemble.onnx", x)["probs"]
    report, overlays = tmp_path / "r.json", tmp_path / "overlays"
    blank = tmp_path / "blank.png"  # no tissue: never a diagnosis, whatever the modality's thresholds
    cv2.imwrite(str(blank), np.full((224, 224, 3), 245, np.uint8))
    assert main(["classify", *map(str, tiles), str(blank), "--bundle", str(renal["bundle"]), "--json", str(report),
                 "--overlay-dir", str(overlays), "--backend", "onnxruntime"]) == 0
    rows = json.loads(report.read_text())["images"]
    assert len(rows) == len(tiles) + 1 and all(row["probs"] is not None for row in rows[:-1]), rows
    assert rows[-1]["probs"] is None
    for i, (path, row) in enumerate(zip(tiles, rows)):
        np.testing.assert_allclose([row["probs"][c] for c in renal["classes"]], expected[i], atol=1e-4)
        overlay = cv2.imread(str(overlays / f"{path.stem}_overlay.png"))
        assert overlay is not None and overlay.shape == load_image(path).shape
    capsys.readouterr()
    options = dict(bundle=str(renal["bundle"]), source=f"image://{tiles[0]}?fps=6", publish=OS_PORT,
                   control=OS_PORT, threads=2, heartbeat_hz=5.0, slides_dir=str(tmp_path / "slides"),
                   snapshot_dir=str(tmp_path / "snapshots"), backend="onnxruntime", overlay_size=120)
    daemon = Daemon(load_config(None, options))
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", daemon.run(install_signals=False)),
                              daemon=True)
    thread.start()
    try:
        assert daemon.bound.wait(60), "the daemon did not bind its sockets"
        with protocol.Subscriber(daemon.endpoints["publish"], topics=["overlay"]) as sub:
            message, _ = wait_for(sub, lambda m: True, 90)
    finally:
        daemon.request_stop("test over")
        thread.join(60)
    assert result.get("rc") == 0
    assert message.header["classes"] == renal["classes"]
    np.testing.assert_allclose(message.header["probs"], expected[0], atol=1e-4)
    c = message.header["cam"]   # protocol v2: the CAM as data, the bridge draws it
    maps = protocol.cam_array(message)
    assert maps.shape == (c["classes"], c["height"], c["width"]) and c["index"] == message.header["decision"]["index"]
    assert maps[c["index"]].max() > 0


def test_int8_and_fp16_pass_through_the_accuracy_gate(renal, tmp_path, capsys):
    calib_dir, holdout = tmp_path / "calib_tiles", tmp_path / "holdout"
    calib_dir.mkdir()
    holdout.mkdir()
    for i, (tissue, path) in enumerate(rz.tile_paths(REPO).items()):
        shutil.copy(path, (calib_dir if i % 2 else holdout) / path.name)
    calib = tmp_path / "calib.npz"
    assert main(["calibration-set", str(calib_dir), "--out", str(calib), "--size", "3",
                 "--bundle", str(renal["bundle"])]) == 0
    for precision, extra in [("int8", ["--calib", str(calib)]), ("fp16", [])]:
        out = tmp_path / precision
        rc = main(["quantize", str(renal["bundle"]), "--out", str(out), "--precision", precision, *extra,
                   "--holdout", str(holdout)])
        q = load_bundle(out).manifest["quantization"]
        assert rc == (0 if q["deployable"] else 3), q.get("gate")
        s = q["variants"][q["variant"]]["summary"]
        assert s["n_images"] >= 3 and 0 <= s["top1_agreement"] <= 1
        # the SVM head, its kernel and the coupling loop are not quantized (no MatMul/Gemm/Conv in them)
        import onnx

        ops = [n.op_type for n in onnx.load(str(out / "members" / "member_0.onnx")).graph.node]
        assert "Loop" in ops
        if precision == "fp16":
            assert q["deployable"], q
    capsys.readouterr()


def test_schema_1_bundles_still_load_and_v2_fields_need_v2(tmp_path):
    demo = load_bundle(DEMO_BUNDLE)
    assert demo.manifest["schema_version"] == 1
    copy = tmp_path / "demo"
    shutil.copytree(DEMO_BUNDLE, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["members"][0]["preprocessing"] = {"input_size": 640, "resize": "none", "scaling": "none"}
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArmscopeError, match=r"field members\.0\.preprocessing: needs schema_version 2"):
        load_bundle(copy)
    m["schema_version"] = 2
    m["members"][0]["preprocessing"]["input_size"] = 320
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArmscopeError, match=r"members\.0\.preprocessing\.resize: 'none' with input_size 320"):
        load_bundle(copy)
