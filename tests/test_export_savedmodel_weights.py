"""A lab's own model as a SavedModel without Keras layers (Keras 3 ``model.export()``,
``tf.saved_model.save``): ``armscope export --weights DIR --architecture NAME``
maps its variables onto an architecture armscope builds (by layer name, else by
layer order, and shape), and the bundle computes what the lab's Keras model
computes on real camera frames (probabilities <= 1e-4, Grad-CAM r >= 0.999).
A layer-less SavedModel given without ``--weights`` is refused naming the command
to use; a wrong or ambiguous architecture is refused; nothing is written then."""
from __future__ import annotations

import numpy as np
import pytest

from armscope.cli import main

pytest.importorskip("tensorflow")
pytestmark = [pytest.mark.tf, pytest.mark.slow]   # each test exports from Keras: 5-16 s on 2 cores

import keras_zoo_support as zoo  # noqa: E402  (tests/ is on sys.path: rootdir conftest)
from test_export_general import check_parity, manifest_of, real_inputs  # noqa: E402

SIZE = 160   # densenet-mini: stride 32 -> a 5x5 map


def lab_densenet_mini(K, size: int, name: str = "features"):
    """armscope.export.architecture.densenet_mini as a lab writes it without naming its layers:
    Keras numbers them (conv2d_17, batch_normalization_9, ...), as keras.applications'
    InceptionV3 does, so only the layers' order and shapes say which is which."""
    L = K.layers
    inp = K.Input((size, size, 3))
    x = L.ZeroPadding2D(3)(inp)
    x = L.Conv2D(32, 7, strides=2, use_bias=False)(x)
    x = L.Activation("relu")(L.BatchNormalization(epsilon=1.001e-5)(x))
    x = L.MaxPooling2D(3, strides=2)(L.ZeroPadding2D(1)(x))
    for b in range(4):
        for _ in range(2):
            y = L.Activation("relu")(L.BatchNormalization(epsilon=1.001e-5)(x))
            y = L.Conv2D(48, 1, use_bias=False)(y)
            y = L.Activation("relu")(L.BatchNormalization(epsilon=1.001e-5)(y))
            y = L.Conv2D(12, 3, padding="same", use_bias=False)(y)
            x = L.Concatenate()([x, y])
        if b < 3:
            x = L.Activation("relu")(L.BatchNormalization(epsilon=1.001e-5)(x))
            x = L.AveragePooling2D(2, strides=2)(L.Conv2D(x.shape[-1] // 2, 1, use_bias=False)(x))
    x = L.Activation("relu")(L.BatchNormalization(epsilon=1.001e-5)(x))
    return K.Model(inp, x, name=name)


def whole_image_lab_model(seed: int = 0, classes: int = 3, backbones: int = 1):
    """Keras 3, the lab's own names: normalise -> features (nested) -> pool -> dropout ->
    'diagnosis' softmax. ``backbones=2``: two such networks averaged in one model."""
    K = zoo.keras3()
    K.utils.set_random_seed(seed)
    L = K.layers
    inp = K.Input((SIZE, SIZE, 3), name="field")
    x = L.Rescaling(1 / 127.5, offset=-1.0, name="normalise")(inp)
    outs = []
    for i in range(backbones):
        y = L.GlobalAveragePooling2D(name=f"pool{i}")(lab_densenet_mini(K, SIZE, name=f"features{i}")(x))
        outs.append(L.Dense(classes, activation="softmax", name=f"diagnosis{i}")(L.Dropout(0.2)(y)))
    model = K.Model(inp, outs[0] if backbones == 1 else L.Average()(outs), name="lab_whole")
    zoo.randomise(model, seed)
    return model


def tiled_lab_model(seed: int = 0, classes: int = 2):
    """Keras 3, the tiled shape with the lab's own names: Reshape/Permute tiling, a
    TimeDistributed DenseNet (the backbone's layer names as keras.applications
    writes them), 20x20 reassembly, 'final_dx', and 16 per-patch heads 'patch_k'
    (sliced by Cropping1D, no Lambda)."""
    from armscope.export.architecture import densenet_mini

    K = zoo.keras3()
    K.utils.set_random_seed(seed)
    L = K.layers
    inp = K.Input((640, 640, 3), name="field")
    x = L.Rescaling(1 / 127.5, offset=-1.0, name="to_unit")(inp)
    x = L.Reshape((4, 160, 4, 160, 3), name="cut")(x)
    x = L.Reshape((16, 160, 160, 3), name="tiles")(L.Permute((1, 3, 2, 4, 5), name="order")(x))
    maps = L.TimeDistributed(densenet_mini(), name="per_tile")(x)
    k = maps.shape[-1]
    y = L.Permute((1, 3, 2, 4, 5), name="interleave")(L.Reshape((4, 4, 5, 5, k), name="grid")(maps))
    y = L.Reshape((20, 20, k), name="mosaic")(y)
    outputs = [L.Dense(classes, activation="softmax", name="final_dx")(L.GlobalAveragePooling2D(name="gap")(y))]
    pooled = L.TimeDistributed(L.GlobalAveragePooling2D(), name="tile_gap")(maps)
    for p in range(16):
        one = L.Flatten(name=f"take_{p}")(L.Cropping1D((p, 15 - p), name=f"crop_{p}")(pooled))
        outputs.append(L.Dense(classes, activation="softmax", name=f"patch_{p}")(one))
    model = K.Model(inp, outputs, name="lab_tiled")
    zoo.randomise(model, seed)
    return model


def _nothing_written(tmp_path) -> bool:
    return not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_keras3_export_savedmodel_by_layer_order_to_bundle_with_parity(tmp_path, frame_paths, capsys):
    """model.export() of a whole-image model with auto-numbered layers -> --weights DIR -> bundle:
    every tensor matched (by order), printed; probabilities and Grad-CAM equal the lab's Keras model's."""
    lab = whole_image_lab_model(seed=4)
    lab.export(tmp_path / "lab_sm", verbose=False)
    out = tmp_path / "out"
    code = main(["export", "--weights", str(tmp_path / "lab_sm"), "--architecture", "densenet-mini",
                 "--input-scaling", "symmetric", "--classes", "normal,inflamed,necrotic", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    n_weights = len(lab.weights)
    assert f"lab_sm: {n_weights} weights of densenet-mini matched" in printed.out
    assert f"input {SIZE}x{SIZE} from the file" in printed.out
    matched = [line for line in printed.out.splitlines() if " <- " in line]
    assert len(matched) == n_weights and sum("[order+shape]" in line for line in matched) == n_weights - 2
    assert any("final_head/kernel" in line and "diagnosis0/kernel:0" in line for line in matched)
    m = manifest_of(out)
    assert m["model"]["architecture"] == "whole-image-classifier" and m["preprocessing"]["resize"] == SIZE
    x = real_inputs(frame_paths, SIZE, n=3)
    got, _ = check_parity([lab], out, x)
    want = np.asarray(lab(x, training=False))
    np.testing.assert_allclose(got["probs"], want, atol=1e-4)
    assert np.abs(want - want.mean(axis=0)).max() > 1e-3   # the frames are told apart: not a constant model
    assert main(["classify", "--bundle", str(out), str(frame_paths[0])]) == 0


def test_tiled_keras3_export_and_tf_saved_model_save_map_exactly(tmp_path, frame_paths):
    """The tiled shape (names match, 16 numbered per-patch heads stacked) from model.export(), and
    the whole-image model from tf.saved_model.save (variables read from its object graph):
    the mapped Keras model gives the lab model's outputs on a real frame."""
    import tensorflow as tf

    from armscope.export.weights_map import load_weights_member

    lab = tiled_lab_model(seed=2)
    lab.export(tmp_path / "tiled_sm", verbose=False)
    lines = []
    model = load_weights_member(tmp_path / "tiled_sm", "tiled-densenet-mini", "symmetric", report=lines.append)
    x = real_inputs(frame_paths, 640, n=1)
    want = [np.asarray(o) for o in lab(x, training=False)]
    got = model(x, training=False)
    np.testing.assert_allclose(np.asarray(got["probs"]), want[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["patch_probs"]), np.stack(want[1:], axis=1), atol=1e-5)
    assert any("patch_heads/kernel" in line and "patch_0/kernel:0 .. patch_15/kernel:0" in line for line in lines)
    assert any("conv1_conv/kernel" in line and "[name+shape]" in line for line in lines)

    whole = whole_image_lab_model(seed=5, classes=2)
    tf.saved_model.save(whole, str(tmp_path / "tf_sm"))
    lines = []
    model = load_weights_member(tmp_path / "tf_sm", "densenet-mini", "symmetric", report=lines.append)
    x = real_inputs(frame_paths, SIZE, n=2)
    np.testing.assert_allclose(np.asarray(model(x, training=False)["probs"]), np.asarray(whole(x, training=False)),
                               atol=1e-5)
    assert lines[0].startswith(f"{tmp_path / 'tf_sm'}: {len(whole.weights)} weights of densenet-mini matched")


def test_refusals_name_the_command_and_write_nothing(tmp_path, capsys):
    """No --weights for a layer-less SavedModel: the error gives the command; a tiled architecture
    for a whole-image model, another backbone, and two backbones in one model are refused."""
    lab = whole_image_lab_model(seed=6)
    lab.export(tmp_path / "lab_sm", verbose=False)
    capsys.readouterr()   # what making the test's SavedModel printed (TensorFlow's own INFO lines) is not under test
    out = tmp_path / "out"

    def refused(args) -> str:
        assert main(["export", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and _nothing_written(tmp_path)
        return err

    err = refused([str(tmp_path / "lab_sm")])
    assert "lab_sm: a SavedModel without Keras layer structure" in err and len(err.splitlines()) == 1
    assert f"armscope export --weights {tmp_path / 'lab_sm'} --architecture tiled-densenet121|" in err
    assert "--input-scaling symmetric|unit|imagenet --out BUNDLE" in err

    err = refused(["--weights", str(tmp_path / "lab_sm"), "--input-scaling", "symmetric"])
    assert "--weights needs --architecture and --input-scaling" in err

    scaling = ["--input-scaling", "symmetric"]
    err = refused(["--weights", str(tmp_path / "lab_sm"), "--architecture", "tiled-densenet-mini", *scaling])
    assert f"the model takes {SIZE}x{SIZE} images, but tiled-densenet-mini takes 640x640" in err

    err = refused(["--weights", str(tmp_path / "lab_sm"), "--architecture", "densenet121", *scaling])
    assert "cannot tell the number of classes" in err and "(1024, C)" in err

    twin = whole_image_lab_model(seed=7, backbones=2)
    twin.export(tmp_path / "twin_sm", verbose=False)
    capsys.readouterr()
    err = refused(["--weights", str(tmp_path / "twin_sm"), "--architecture", "densenet-mini", *scaling])
    assert "twin_sm: its weights do not map onto the architecture" in err
    assert "by name: no backbone weight's layer name is in the file" in err
    assert "appear 2 times in the file: ambiguous" in err
