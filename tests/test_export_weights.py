"""The weights-only path (``armscope export --weights``): Keras 2 ``.h5`` files
written by tf.keras with a ``Lambda`` in them (so their graph is not rebuilt),
mapped onto armscope's own architecture by name and shape; the mapped model must
compute what the lab's model computed, on a real frame; every partial or
ambiguous mapping is refused, naming what is missing, and writes nothing."""
from __future__ import annotations

import numpy as np
import pytest

from armscope.cli import main
from armscope.core.errors import ArmscopeError

pytest.importorskip("tensorflow")
tf_keras = pytest.importorskip("tf_keras")

pytestmark = pytest.mark.tf


def _seed_batchnorm(model, seed: int) -> None:
    """Non-trivial BN statistics, so a tensor in the wrong place changes the output."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        if "moving_variance" in w.name:
            w.assign(rng.uniform(0.5, 2.0, w.shape).astype("float32"))
        elif "moving_mean" in w.name or "beta" in w.name:
            w.assign(rng.normal(0, 0.1, w.shape).astype("float32"))


def _mini_backbone_keras2():
    """armscope.export.architecture.densenet_mini written the way a lab writes it in tf.keras (Keras 2):
    the same layer names, built with tf_keras."""
    L = tf_keras.layers
    inp = L.Input((160, 160, 3))
    x = L.ZeroPadding2D(3)(inp)
    x = L.Conv2D(32, 7, strides=2, use_bias=False, name="conv1_conv")(x)
    x = L.BatchNormalization(epsilon=1.001e-5, name="conv1_bn")(x)
    x = L.Activation("relu")(x)
    x = L.ZeroPadding2D(1)(x)
    x = L.MaxPooling2D(3, strides=2)(x)
    for b in range(4):
        name = f"conv{b + 2}"
        for i in range(2):
            y = L.BatchNormalization(epsilon=1.001e-5, name=f"{name}_{i}_bn0")(x)
            y = L.Activation("relu")(y)
            y = L.Conv2D(48, 1, use_bias=False, name=f"{name}_{i}_conv1")(y)
            y = L.BatchNormalization(epsilon=1.001e-5, name=f"{name}_{i}_bn1")(y)
            y = L.Activation("relu")(y)
            y = L.Conv2D(12, 3, padding="same", use_bias=False, name=f"{name}_{i}_conv2")(y)
            x = L.Concatenate()([x, y])
        if b < 3:
            t = f"pool{b + 2}"
            x = L.BatchNormalization(epsilon=1.001e-5, name=f"{t}_bn")(x)
            x = L.Activation("relu")(x)
            x = L.Conv2D(x.shape[-1] // 2, 1, use_bias=False, name=f"{t}_conv")(x)
            x = L.AveragePooling2D(2, strides=2)(x)
    x = L.BatchNormalization(epsilon=1.001e-5, name="bn")(x)
    x = L.Activation("relu")(x)
    return tf_keras.Model(inp, x, name="densenet_mini")


def lab_model(backbone, n_classes=2, patch_heads="separate", seed=0):
    """The muscle-biopsy shape as a lab writes it in tf.keras: a Lambda for input scaling,
    Reshape/Permute tiling, TimeDistributed nested backbone, 20x20 reassembly, GAP + softmax;
    per-patch heads as 16 Lambda slices + Dense (or none)."""
    L = tf_keras.layers
    tf_keras.utils.set_random_seed(seed)
    k = backbone.output.shape[-1]
    inp = L.Input((640, 640, 3))
    x = L.Lambda(lambda t: t / 127.5 - 1.0, name="scale_lambda")(inp)
    x = L.Reshape((4, 160, 4, 160, 3))(x)
    x = L.Permute((1, 3, 2, 4, 5))(x)
    x = L.Reshape((16, 160, 160, 3))(x)
    maps = L.TimeDistributed(backbone)(x)
    y = L.Reshape((4, 4, 5, 5, k))(maps)
    y = L.Permute((1, 3, 2, 4, 5))(y)
    y = L.Reshape((20, 20, k))(y)
    outputs = [L.Dense(n_classes, activation="softmax", name="predictions")(L.GlobalAveragePooling2D()(y))]
    if patch_heads == "separate":
        pooled = L.TimeDistributed(L.GlobalAveragePooling2D())(maps)
        for p in range(16):
            sliced = L.Lambda(lambda t, p=p: t[:, p], name=f"take_{p}")(pooled)
            outputs.append(L.Dense(n_classes, activation="softmax", name=f"patch_{p}")(sliced))
    model = tf_keras.Model(inp, outputs)
    _seed_batchnorm(model, seed)
    return model


def _lab_outputs(model, x):
    out = model(x, training=False)
    out = out if isinstance(out, list) else [out]
    probs = np.asarray(out[0])
    patches = np.stack([np.asarray(o) for o in out[1:]], axis=1) if len(out) > 1 else None
    return probs, patches


@pytest.mark.slow
def test_a_keras2_densenet121_file_maps_by_name_onto_the_tiled_architecture(tmp_path, real_inputs):
    """Full DenseNet-121 with tf.keras's own layer names ('conv1/conv', ...), as a lab's file has them."""
    from armscope.export.weights_map import load_weights_member

    base = tf_keras.applications.DenseNet121(include_top=False, weights=None, input_shape=(160, 160, 3))
    lab = lab_model(base, n_classes=3, seed=3)
    lab.save(tmp_path / "lab.h5")
    want_probs, want_patches = _lab_outputs(lab, real_inputs[:1])
    lines = []
    model = load_weights_member(tmp_path / "lab.h5", "tiled-densenet121", "symmetric", report=lines.append)
    got = model(real_inputs[:1], training=False)
    np.testing.assert_allclose(np.asarray(got["probs"]), want_probs, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["patch_probs"]), want_patches, atol=1e-5)
    assert lines[0].startswith(f"{tmp_path / 'lab.h5'}: 608 weights of tiled-densenet121 matched")
    assert "conv1_conv/kernel" in lines[1] and "conv1/conv/kernel:0" in lines[1]
    assert any("final_head/kernel" in line and "predictions/kernel:0" in line for line in lines)
    assert any("patch_heads/kernel" in line and "patch_0/kernel:0 .. " in line for line in lines)


@pytest.mark.slow
def test_export_weights_cli_end_to_end_and_classify(tmp_path, real_inputs, frame_paths, capsys):
    """A tf.keras file with Lambda layers -> --weights -> bundle -> ONNX probs equal the lab model's."""
    import onnxruntime as ort

    from armscope.core.bundle import load_bundle

    labs = [lab_model(_mini_backbone_keras2(), seed=s) for s in (1, 2)]
    for i, lab in enumerate(labs):
        lab.save(tmp_path / f"fold{i}.h5")
    want = np.mean([_lab_outputs(lab, real_inputs[:2])[0] for lab in labs], axis=0)
    out = tmp_path / "bundle"
    code = main(["export", "--weights", str(tmp_path / "fold0.h5"), "--weights", str(tmp_path / "fold1.h5"),
                 "--architecture", "tiled-densenet-mini", "--input-scaling", "symmetric",
                 "--classes", "other,tumour", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "fold0.h5: " in printed.out and "weights of tiled-densenet-mini matched" in printed.out
    bundle = load_bundle(out)
    session = ort.InferenceSession(str(bundle.ensemble_path), providers=["CPUExecutionProvider"])
    got = session.run(["probs"], {"image": real_inputs[:2]})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(want[0] - want[1]).max() > 1e-4 or np.abs(want - 0.5).max() > 1e-3   # not a constant model
    code = main(["classify", "--bundle", str(out), str(frame_paths[0])])
    assert code == 0


def _no_output(tmp_path):
    return not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_partial_ambiguous_and_wrong_mappings_are_refused_and_write_nothing(tmp_path, capsys):
    import h5py

    lab = lab_model(_mini_backbone_keras2(), seed=4)
    lab.save(tmp_path / "lab.h5")
    args = ["--architecture", "tiled-densenet-mini", "--input-scaling", "symmetric", "--out", str(tmp_path / "out")]

    # a tensor missing from the file
    missing = tmp_path / "missing.h5"
    missing.write_bytes((tmp_path / "lab.h5").read_bytes())
    with h5py.File(missing, "r+") as f:
        root = f["model_weights"]
        group = next(root[name] for name in root if "conv3_1_conv2" in root[name])   # the TimeDistributed backbone
        del group["conv3_1_conv2/kernel:0"]
        group.attrs["weight_names"] = [n for n in group.attrs["weight_names"]
                                       if (n.decode() if isinstance(n, bytes) else n) != "conv3_1_conv2/kernel:0"]
    assert main(["export", "--weights", str(missing), *args]) == 2
    err = capsys.readouterr().err
    assert "missing.h5: its weights do not map onto the architecture" in err
    assert "conv3_1_conv2/kernel (3, 3, 48, 12): no tensor in the file" in err
    assert _no_output(tmp_path)

    # 17 heads named alike: which is the final one cannot be told
    L = tf_keras.layers
    backbone = _mini_backbone_keras2()
    inp = L.Input((640, 640, 3))
    x = L.Reshape((16, 160, 160, 3))(L.Permute((1, 3, 2, 4, 5))(L.Reshape((4, 160, 4, 160, 3))(inp)))
    maps = L.TimeDistributed(backbone)(x)
    pooled = L.TimeDistributed(L.GlobalAveragePooling2D())(maps)
    heads = [L.Dense(2, name=f"dense_{p}")(L.Lambda(lambda t, p=p: t[:, p])(pooled)) for p in range(16)]
    heads.append(L.Dense(2, name="dense_16")(L.GlobalAveragePooling1D()(pooled)))
    tf_keras.Model(inp, heads).save(tmp_path / "ambiguous.h5")
    assert main(["export", "--weights", str(tmp_path / "ambiguous.h5"), *args]) == 2
    err = capsys.readouterr().err
    assert "final_head: expected exactly one Dense kernel" in err and "dense_16/kernel:0" in err
    assert _no_output(tmp_path)

    # the wrong architecture for the file
    assert main(["export", "--weights", str(tmp_path / "lab.h5"), *args[:1], "tiled-densenet121", *args[2:]]) == 2
    assert "cannot tell the number of classes" in capsys.readouterr().err
    assert _no_output(tmp_path)

    # flags that belong together, and files that are not Keras 2 weights
    assert main(["export", "--weights", str(tmp_path / "lab.h5"), "--architecture", "tiled-densenet-mini",
                 "--out", str(tmp_path / "out")]) == 2
    assert "--weights needs --architecture and --input-scaling" in capsys.readouterr().err
    (tmp_path / "text.h5").write_text("not hdf5")
    assert main(["export", "--weights", str(tmp_path / "text.h5"), *args]) == 2
    assert "text.h5: not an HDF5 file" in capsys.readouterr().err
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.zeros(3)
    assert main(["export", "--weights", str(tmp_path / "plain.h5"), *args]) == 2
    assert "plain.h5: no Keras 2 weights in it" in capsys.readouterr().err
    assert _no_output(tmp_path)


def test_a_file_without_patch_heads_keeps_the_final_output_only(tmp_path, real_inputs):
    from armscope.export.weights_map import load_weights_member

    lab = lab_model(_mini_backbone_keras2(), patch_heads="none", seed=5)
    lab.save(tmp_path / "nopatch.h5")
    lines = []
    model = load_weights_member(tmp_path / "nopatch.h5", "tiled-densenet-mini", "symmetric", report=lines.append)
    assert list(model.output) == ["probs"]
    np.testing.assert_allclose(np.asarray(model(real_inputs[:1], training=False)["probs"]),
                               _lab_outputs(lab, real_inputs[:1])[0], atol=1e-5)
    assert "no per-patch heads in the file" in lines[-1]
    with pytest.raises(ArmscopeError, match="--input-scaling 'bgr'"):
        load_weights_member(tmp_path / "nopatch.h5", "tiled-densenet-mini", "bgr")
