"""Exporting the classifiers labs actually hold (issue 17): tf.keras .h5 with
nested backbones and in-model tiling, multi-output models with per-patch heads,
Lambda slicing (refused unless trusted), Keras 3 models with their own names,
whole-image single-sigmoid models, SavedModels; parity of probabilities and of
the in-graph Grad-CAM against tf.GradientTape on the original model, on real
camera frames; every refusal is one clear error and writes nothing."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from armscope.cli import main

pytest.importorskip("tensorflow")
pytest.importorskip("tf_keras")
pytestmark = pytest.mark.tf

import keras_zoo_support as zoo  # noqa: E402  (tests/ is on sys.path: rootdir conftest)


def real_inputs(frame_paths, size: int, n: int = 2) -> np.ndarray:
    """Camera frames through the daemon's preprocessing, resized to the model's input."""
    from armscope.core.preprocess import Preprocessing, load_image, preprocess_frame

    spec = Preprocessing(resize=size)
    return np.stack([preprocess_frame(load_image(p), spec) for p in frame_paths[:n]])


def run_bundle(bundle, x):
    session = ort.InferenceSession(str(bundle / "ensemble.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": x})))


def check_parity(models, bundle, x):
    """probs <= 1e-4 against Keras; each member's CAM correlation >= 0.999 against GradientTape."""
    from armscope.export.gradcam_reference import reference_cam
    from armscope.export.onnx_export import keras_probs
    from armscope.export.structure import find_structure

    structures = [find_structure(m, m.name) for m in models]
    got = run_bundle(bundle, x)
    ref_probs = np.mean([keras_probs(m, s, x) for m, s in zip(models, structures)], axis=0)
    assert np.max(np.abs(got["probs"] - ref_probs)) <= 1e-4
    member = ort.InferenceSession(str(bundle / "members" / "member_0.onnx"), providers=["CPUExecutionProvider"])
    cam = member.run(["cam"], {"image": x})[0]
    compared = 0
    for n in range(len(x)):
        ref = reference_cam(models[0], x[n], structures[0])
        assert cam[n].shape == ref.shape
        for c in range(ref.shape[0]):
            if ref[c].max() <= 0:  # ReLU removed everything: the graph must agree
                assert cam[n, c].max() <= 1e-5 * (np.abs(ref).max() + 1e-6)
                continue
            corr = np.corrcoef(ref[c].ravel(), cam[n, c].ravel())[0, 1]
            assert corr >= 0.999, (n, c, corr)
            compared += 1
    assert compared >= len(x)  # at least one non-trivial CAM per image, or the check proves little
    return got, structures[0]


def export(args, capsys=None) -> int:
    code = main(["export", *map(str, args)])
    return code


def manifest_of(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_tf_keras_h5_reshape_permute_timedistributed(tmp_path, frame_paths, capsys):
    """(a) tf.keras .h5, nested DenseNet-style backbone, Reshape/Permute tiling, TimeDistributed,
    GlobalAveragePooling3D final head and shared per-patch heads."""
    model = zoo.tiled_timedistributed(zoo.tfk())
    model.save(tmp_path / "m.h5")
    out = tmp_path / "bundle"
    assert export(["--out", out, "--classes", "other,IIM", tmp_path / "m.h5"]) == 0
    m = manifest_of(out)
    assert m["model"]["architecture"] == "tiled-patch-classifier" and m["model"]["grid"] == 4
    assert m["model"]["per_patch_heads"] == "shared" and m["model"]["cam"]["method"].startswith("patch-weighted")
    assert m["preprocessing"]["resize"] == zoo.SIZE and m["inputs"][0]["shape"] == ["N", zoo.SIZE, zoo.SIZE, 3]
    x = real_inputs(frame_paths, zoo.SIZE)
    got, _ = check_parity([model], out, x)
    np.testing.assert_allclose(got["patch_probs"], model.predict(x, verbose=0)[1], atol=1e-4)


@pytest.mark.slow
def test_tf_keras_h5_cropping_shared_backbone_multi_output(tmp_path, frame_paths, capsys):
    """(b) Cropping2D patches, one shared nested backbone, maps reassembled by Concatenate,
    16 separate per-patch GAP + Dense outputs: [final, patch_0..patch_15]."""
    model = zoo.tiled_cropping(zoo.tfk())
    model.save(tmp_path / "m.h5")
    assert export(["--explain", tmp_path / "m.h5"]) == 0
    text = capsys.readouterr().out
    assert "4x4 patches of 80x80" in text and "output 0 ('final') of 17" in text
    assert "separate (patch_0, patch_1" in text and "patch-weighted Grad-CAM" in text
    out = tmp_path / "bundle"
    assert export(["--out", out, tmp_path / "m.h5"]) == 0
    assert manifest_of(out)["model"]["per_patch_heads"] == "separate"
    x = real_inputs(frame_paths, zoo.SIZE)
    got, _ = check_parity([model], out, x)
    # patch_probs in image order: Cropping2D patch k = 4 r + c is block k
    np.testing.assert_allclose(got["patch_probs"], np.stack(model.predict(x, verbose=0)[1:], axis=1), atol=1e-4)


@pytest.mark.slow
def test_lambda_slicing_refused_unless_trusted(tmp_path, frame_paths, capsys):
    """(c) Lambda patch slicing: the file carries Python code, so it is refused by name
    (export and --explain) and written nowhere; --trust-code loads and exports it."""
    model = zoo.tiled_lambda(zoo.tfk())
    model.save(tmp_path / "m.h5")
    capsys.readouterr()  # tf-keras's own notice about the legacy HDF5 format is not ours
    out = tmp_path / "bundle"
    for args in (["--out", out, tmp_path / "m.h5"], ["--explain", tmp_path / "m.h5"]):
        assert export(args) == 2
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert "m.h5: the model file carries Python code (Lambda layers 'slice_0_0'" in err
        assert "--trust-code" in err and len(err.splitlines()) == 1 and "Traceback" not in err
        assert not out.exists() and not list(tmp_path.glob(".bundle*"))
    assert export(["--out", out, "--trust-code", tmp_path / "m.h5"]) == 0
    m = manifest_of(out)
    assert m["model"]["per_patch_heads"] == "none" and m["model"]["cam"]["method"].startswith("Grad-CAM (closed")
    assert [o["name"] for o in m["outputs"]] == ["probs", "cam"]
    check_parity([model], out, real_inputs(frame_paths, zoo.SIZE))


def test_keras3_own_names_no_patch_heads(tmp_path, frame_paths, capsys):
    """(d) Keras 3 .keras with its own layer names, Reshape/Permute reassembly, no per-patch heads."""
    model = zoo.tiled_own_names()
    model.save(tmp_path / "lab.keras")
    assert export(["--explain", tmp_path / "lab.keras"]) == 0
    text = capsys.readouterr().out
    assert "feature map mosaic: 20x20x8" in text and "backbone    encoder" in text
    assert "'diagnosis': softmax over 3 classes; linear after the pool" in text
    out = tmp_path / "bundle"
    assert export(["--out", out, tmp_path / "lab.keras"]) == 0
    m = manifest_of(out)
    assert m["task"]["classes"] == ["class_0", "class_1", "class_2"] and m["model"]["feature_layer"] == "mosaic"
    check_parity([model], out, real_inputs(frame_paths, zoo.SIZE))


def test_whole_image_single_sigmoid_ensemble(tmp_path, frame_paths, capsys):
    """(e) a whole-image InceptionV3-shaped binary classifier (139x139, one sigmoid unit),
    two members: probs [1 - p, p], the logit differentiated."""
    models = [zoo.inception_like(zoo.keras3(), seed=s) for s in (0, 1)]
    for i, model in enumerate(models):
        model.save(tmp_path / f"m{i}.keras")
    out = tmp_path / "bundle"
    assert export(["--out", out, "--classes", "normal,tumour", tmp_path / "m0.keras", tmp_path / "m1.keras"]) == 0
    m = manifest_of(out)
    assert m["model"]["architecture"] == "whole-image-classifier" and m["model"]["head"] == "sigmoid"
    assert "logit z of the single sigmoid unit" in m["model"]["cam"]["score"]
    assert m["preprocessing"]["resize"] == 139 and [o["name"] for o in m["outputs"]] == ["probs", "cam"]
    x = real_inputs(frame_paths, 139)
    got, _ = check_parity(models, out, x)
    assert got["cam"].shape == (2, 2, 16, 16)
    np.testing.assert_allclose(got["probs"].sum(axis=1), 1.0, atol=1e-6)


def test_whole_image_bundle_runs_in_classify(tmp_path, frame_paths, capsys):
    """A 75x75 single-sigmoid bundle through ``armscope classify``: the same [1 - p, p] as Keras."""
    from armscope.export.onnx_export import keras_probs
    from armscope.export.structure import find_structure

    model = zoo.inception_like(zoo.keras3(), size=75, seed=3)
    model.save(tmp_path / "m.keras")
    out = tmp_path / "bundle"
    assert export(["--out", out, "--classes", "normal,tumour", tmp_path / "m.keras"]) == 0
    report = tmp_path / "r.json"
    assert main(["classify", str(frame_paths[0]), "--bundle", str(out), "--json", str(report)]) == 0
    image = json.loads(report.read_text())["images"][0]
    expected = keras_probs(model, find_structure(model, "m"), real_inputs(frame_paths, 75, n=1))[0]
    np.testing.assert_allclose([image["probs"]["normal"], image["probs"]["tumour"]], expected, atol=1e-4)


@pytest.mark.slow
def test_savedmodels(tmp_path, frame_paths, capsys):
    """A tf.keras SavedModel exports with its structure; a Keras 3 export() SavedModel of a
    lab's model holds no layers and is refused, naming what to give instead."""
    model = zoo.inception_like(zoo.tfk(), size=107)
    model.save(tmp_path / "tfk_sm", save_format="tf")
    out = tmp_path / "bundle"
    assert export(["--out", out, tmp_path / "tfk_sm"]) == 0
    check_parity([model], out, real_inputs(frame_paths, 107))
    k3 = zoo.mlp_head_multiclass()
    k3.export(tmp_path / "k3_sm", verbose=False)
    assert export(["--out", tmp_path / "b2", tmp_path / "k3_sm"]) == 2
    err = capsys.readouterr().err
    assert "k3_sm: a SavedModel without Keras layer structure" in err and "export the model's .keras" in err
    assert not (tmp_path / "b2").exists()


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_head_not_linear_gets_in_graph_gradient(tmp_path, frame_paths, capsys, pool):
    """GAP (or GMP) -> Dense+ReLU -> Dropout -> Dense softmax: Grad-CAM by a gradient inside the ONNX graph."""
    model = zoo.mlp_head_multiclass(pool=pool)
    model.save(tmp_path / "mlp.keras")
    out = tmp_path / "bundle"
    assert export(["--out", out, tmp_path / "mlp.keras"]) == 0
    assert manifest_of(out)["model"]["cam"]["method"] == "Grad-CAM (gradient computed in graph)"
    check_parity([model], out, real_inputs(frame_paths, 96))


def _refused(tmp_path, capsys, path, *expected):
    out = tmp_path / "bundle"
    assert export(["--out", out, path]) == 2
    err = capsys.readouterr().err.strip()
    for text in expected:
        assert text in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))


def test_unsupported_models_are_refused_naming_the_layer(tmp_path, capsys):
    import keras

    L = keras.layers

    def save(name, inputs, outputs):
        keras.Model(inputs, outputs).save(tmp_path / name)
        return tmp_path / name

    inp = keras.Input((64, 64, 3))
    fmap = L.Conv2D(4, 3, name="conv")(inp)
    _refused(tmp_path, capsys, save("logits.keras", inp, L.Dense(3, name="logits")(L.GlobalAveragePooling2D()(fmap))),
             "logits.keras: no supported classifier output", "'logits' has activation 'linear'")
    _refused(tmp_path, capsys,
             save("multilabel.keras", inp, L.Dense(3, activation="sigmoid", name="tags")(L.GlobalAveragePooling2D()(fmap))),
             "'tags' has 3 sigmoid units (a multi-label model)")
    _refused(tmp_path, capsys,
             save("flat.keras", inp, L.Dense(2, activation="softmax", name="fc")(L.Flatten(name="flat")(fmap))),
             "no global pooling before 'fc'", "Flatten 'flat'")
    other = keras.Input((64, 64, 3))
    two = L.Concatenate()([L.GlobalAveragePooling2D()(fmap), L.GlobalAveragePooling2D()(other)])
    _refused(tmp_path, capsys, save("two.keras", [inp, other], L.Dense(2, activation="softmax")(two)),
             "two.keras: the model has 2 inputs")
    rect = keras.Input((64, 48, 3))
    _refused(tmp_path, capsys,
             save("rect.keras", rect, L.Dense(2, activation="softmax")(L.GlobalAveragePooling2D()(L.Conv2D(4, 3)(rect)))),
             "rect.keras: input shape (None, 64, 48, 3)")
