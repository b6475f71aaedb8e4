"""A whole-model ``.h5`` in the layout Keras 2.2.4 (TensorFlow 1.13) wrote, as the
published muscle-biopsy ensembles were saved. No such file can be downloaded here,
so one is produced: a narrow tiled model is built with tf_keras (layers named the
way Keras 2.2.4 numbered them: ``conv2d_1``, ``batch_normalization_1``, ...), saved,
and its HDF5 attributes rewritten as Keras 2.2.4's ``keras/engine/saving.py``
(``_serialize_model``) wrote them: root ``keras_version`` b'2.2.4', ``backend``
b'tensorflow', ``model_config`` {"class_name": "Model", "config": Network.get_config()}
with each layer's config holding only the keys Keras 2.2.4's ``get_config`` returned
(no ``dtype`` except on InputLayer, no ``module``/``registered_name``, initialisers as
Keras 2.2.4 serialised them: glorot_uniform is ``VarianceScaling``), a
``training_config`` of a compiled model, and ``model_weights`` with the same
``keras_version``/``backend`` attributes. ``export --explain`` and ``export`` must
then deploy it with parity on real frames."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from armscope.cli import main

pytest.importorskip("tensorflow")
tf_keras = pytest.importorskip("tf_keras")
pytestmark = pytest.mark.tf

import keras_zoo_support as zoo  # noqa: E402  (tests/ is on sys.path: rootdir conftest)
from test_export_general import manifest_of, real_inputs  # noqa: E402

SIZE, GRID, PATCH = zoo.SIZE, zoo.GRID, zoo.PATCH

# Keras 2.2.4 get_config(): the keys each layer class returned (besides name and trainable)
_CONV = ("filters", "kernel_size", "strides", "padding", "data_format", "dilation_rate", "activation", "use_bias",
         "kernel_initializer", "bias_initializer", "kernel_regularizer", "bias_regularizer", "activity_regularizer",
         "kernel_constraint", "bias_constraint")
KERAS_224_KEYS = {
    "InputLayer": ("batch_input_shape", "dtype", "sparse", "name"),
    "Conv2D": _CONV,
    "Dense": ("units", "activation", "use_bias", "kernel_initializer", "bias_initializer", "kernel_regularizer",
              "bias_regularizer", "activity_regularizer", "kernel_constraint", "bias_constraint"),
    "BatchNormalization": ("axis", "momentum", "epsilon", "center", "scale", "beta_initializer", "gamma_initializer",
                           "moving_mean_initializer", "moving_variance_initializer", "beta_regularizer",
                           "gamma_regularizer", "beta_constraint", "gamma_constraint"),
    "Activation": ("activation",),
    "Reshape": ("target_shape",),
    "Permute": ("dims",),
    "MaxPooling2D": ("pool_size", "padding", "strides", "data_format"),
    "AveragePooling2D": ("pool_size", "padding", "strides", "data_format"),
    "GlobalAveragePooling2D": ("data_format",),
    "GlobalAveragePooling3D": ("data_format",),
    "Concatenate": ("axis",),
    "TimeDistributed": ("layer",),
}
# how Keras 2.2.4 serialised the initialisers tf_keras names by their own class
_INITIALISERS = {
    "GlorotUniform": {"class_name": "VarianceScaling",
                      "config": {"scale": 1.0, "mode": "fan_avg", "distribution": "uniform", "seed": None}},
    "Zeros": {"class_name": "Zeros", "config": {}},
    "Ones": {"class_name": "Ones", "config": {}},
}


def _names():
    """Keras 2.2.4's automatic layer names: snake_case class name + '_' + a count from 1."""
    counts = Counter()

    def name(kind: str) -> str:
        counts[kind] += 1
        return f"{kind}_{counts[kind]}"

    return name


def keras224_tiled_model(seed: int = 0, classes: int = 2):
    """The muscle-biopsy shape as a Keras 2.2.4 script built it (no Rescaling layer then:
    the -1..1 scaling was in the data pipeline): Reshape/Permute tiling, a TimeDistributed
    nested DenseNet-style Model, GlobalAveragePooling3D + softmax final head, shared
    TimeDistributed per-patch heads."""
    K, L, n = tf_keras, tf_keras.layers, _names()
    tf_keras.utils.set_random_seed(seed)
    inp = L.Input((PATCH, PATCH, 3), name=n("input"))
    x = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name=n("conv2d"))(inp)
    x = L.Activation("relu", name=n("activation"))(L.BatchNormalization(name=n("batch_normalization"))(x))
    x = L.MaxPooling2D(2, name=n("max_pooling2d"))(x)
    for _ in range(2):
        for _ in range(2):
            y = L.BatchNormalization(name=n("batch_normalization"))(x)
            y = L.Conv2D(4, 3, padding="same", use_bias=False, name=n("conv2d"))(
                L.Activation("relu", name=n("activation"))(y))
            x = L.Concatenate(name=n("concatenate"))([x, y])
        x = L.Conv2D(8, 1, use_bias=False, name=n("conv2d"))(x)
        x = L.AveragePooling2D(2, name=n("average_pooling2d"))(x)
    x = L.Activation("relu", name=n("activation"))(L.BatchNormalization(name=n("batch_normalization"))(x))
    backbone = K.Model(inp, x, name=n("model"))
    image = L.Input((SIZE, SIZE, 3), name=n("input"))
    t = L.Reshape((GRID, PATCH, GRID, PATCH, 3), name=n("reshape"))(image)
    t = L.Permute((1, 3, 2, 4, 5), name=n("permute"))(t)
    t = L.Reshape((GRID * GRID, PATCH, PATCH, 3), name=n("reshape"))(t)
    maps = L.TimeDistributed(backbone, name=n("time_distributed"))(t)
    final = L.Dense(classes, activation="softmax", name=n("dense"))(
        L.GlobalAveragePooling3D(name=n("global_average_pooling3d"))(maps))
    pooled = L.TimeDistributed(L.GlobalAveragePooling2D(name=n("global_average_pooling2d")),
                               name=n("time_distributed"))(maps)
    patch = L.TimeDistributed(L.Dense(classes, activation="softmax", name=n("dense")), name=n("time_distributed"))(pooled)
    model = K.Model(image, [final, patch], name=n("model"))
    zoo.randomise(model, seed)
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def _initialiser_224(value):
    if isinstance(value, dict) and value.get("class_name") in _INITIALISERS:
        return _INITIALISERS[value["class_name"]]
    return value


def _layer_config_224(class_name: str, config: dict) -> dict:
    keep = KERAS_224_KEYS[class_name]   # a layer class this test does not know fails here, not silently
    base = {} if class_name == "InputLayer" else {"name": config["name"], "trainable": config["trainable"]}
    out = {**base, **{k: _initialiser_224(config[k]) for k in keep if k in config}}
    if class_name == "BatchNormalization" and isinstance(out["axis"], list):
        out["axis"] = out["axis"][0] if len(out["axis"]) == 1 else out["axis"]
    if class_name == "TimeDistributed":
        out["layer"] = _serialised_224(config["layer"])
    return out


def _network_config_224(config: dict) -> dict:
    """Keras 2.2.4 Network.get_config(): name, layers (name, class_name, config,
    inbound_nodes [[[layer, node, tensor, {}]]]), input_layers, output_layers."""
    layers = []
    for layer in config["layers"]:
        layers.append({"name": layer["name"], "class_name": _class_224(layer["class_name"]),
                       "config": _serialised_224(layer)["config"],
                       "inbound_nodes": [[[i[0], i[1], i[2], i[3] if len(i) > 3 else {}] for i in node]
                                         for node in layer["inbound_nodes"]]})
    return {"name": config["name"], "layers": layers, "input_layers": config["input_layers"],
            "output_layers": config["output_layers"]}


def _class_224(class_name: str) -> str:
    return "Model" if class_name in ("Functional", "Model") else class_name


def _serialised_224(obj: dict) -> dict:
    cls = _class_224(obj["class_name"])
    if cls == "Model":
        return {"class_name": "Model", "config": _network_config_224(obj["config"])}
    return {"class_name": cls, "config": _layer_config_224(cls, obj["config"])}


def _fixed(names) -> np.ndarray:
    """Names as Keras 2.2.4's H5Dict stored them: np.asarray of utf-8 bytes (fixed-length 'S')."""
    return np.asarray([n.encode("utf8") if isinstance(n, str) else bytes(n) for n in names])


def rewrite_as_keras_224(path) -> dict:
    """Rewrite a tf_keras .h5's attributes the way Keras 2.2.4's saving.py wrote them."""
    import h5py

    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        model_config = {"class_name": "Model", "config": _network_config_224(config["config"])}
        # h5py 2.x (Keras 2.2.4's) stored bytes as fixed-length strings (numpy 'S'), not variable-length
        f.attrs["model_config"] = np.bytes_(json.dumps(model_config).encode("utf-8"))
        f.attrs["keras_version"] = np.bytes_(b"2.2.4")
        f.attrs["backend"] = np.bytes_(b"tensorflow")
        f.attrs["training_config"] = np.bytes_(json.dumps({
            "optimizer_config": {"class_name": "Adam", "config": {"lr": 0.001, "beta_1": 0.9, "beta_2": 0.999,
                                                                  "decay": 0.0, "epsilon": 1e-07, "amsgrad": False}},
            "loss": "categorical_crossentropy", "metrics": ["accuracy"], "weighted_metrics": None,
            "sample_weight_mode": None, "loss_weights": None}).encode("utf-8"))
        weights = f["model_weights"]
        weights.attrs["keras_version"] = np.bytes_(b"2.2.4")
        weights.attrs["backend"] = np.bytes_(b"tensorflow")
        weights.attrs["layer_names"] = _fixed(weights.attrs["layer_names"])
        for layer in weights.attrs["layer_names"]:
            group = weights[layer.decode()]
            group.attrs["weight_names"] = _fixed(group.attrs["weight_names"])
        if "optimizer_weights" in f:   # tf_keras's optimizer layout is not Keras 2.2.4's: leave none
            del f["optimizer_weights"]
    return model_config


def test_keras_224_h5_explains_and_exports_with_parity(tmp_path, frame_paths, capsys):
    model = keras224_tiled_model(seed=3)
    path = tmp_path / "fold_1.h5"
    model.save(path)
    written = rewrite_as_keras_224(path)
    # the file is in Keras 2.2.4's layout: what a reader of it finds
    text = json.dumps(written)
    assert '"class_name": "Functional"' not in text and '"module"' not in text and "registered_name" not in text
    assert '"VarianceScaling"' in text and '"batch_input_shape": [null, 320, 320, 3]' in text
    assert '"inbound_nodes": [[["input_2", 0, 0, {}]]]' in text
    import h5py

    with h5py.File(path, "r") as f:
        assert f.attrs["keras_version"] == b"2.2.4" and f.attrs["backend"] == b"tensorflow"
        group = f["model_weights"]["time_distributed_1"]
        assert b"conv2d_1/kernel:0" in list(group.attrs["weight_names"])

    assert main(["export", "--explain", str(path)]) == 0
    explained = capsys.readouterr().out
    assert "4x4 patches of 80x80" in explained and "patch-weighted Grad-CAM" in explained
    out = tmp_path / "bundle"
    assert main(["export", "--input-scaling", "symmetric", "--classes", "other,IIM", "--out", str(out), str(path)]) == 0
    m = manifest_of(out)
    assert m["model"]["per_patch_heads"] == "shared" and m["preprocessing"]["scaling"]["name"] == "symmetric"
    x = real_inputs(frame_paths, SIZE)
    scaled = (x / 127.5 - 1.0).astype(np.float32)   # what the lab's pipeline fed the model
    got, _ = check_parity_scaled(model, out, x, scaled)
    np.testing.assert_allclose(got["patch_probs"], model.predict(scaled, verbose=0)[1], atol=1e-4)


def check_parity_scaled(model, bundle, x, scaled):
    """check_parity for a model fed pre-scaled pixels: the bundle takes 0..255 (x) and scales
    in its graph; Keras gets ``scaled``. Probabilities <= 1e-4, CAM r >= 0.999."""
    import onnxruntime as ort

    from armscope.export.gradcam_reference import reference_cam
    from armscope.export.onnx_export import keras_probs
    from armscope.export.structure import find_structure

    structure = find_structure(model, model.name)
    session = ort.InferenceSession(str(bundle / "ensemble.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": x})))
    assert np.max(np.abs(got["probs"] - keras_probs(model, structure, scaled))) <= 1e-4
    compared = 0
    for n in range(len(x)):
        ref = reference_cam(model, scaled[n], structure)
        for c in range(ref.shape[0]):
            if ref[c].max() > 0:
                assert np.corrcoef(ref[c].ravel(), got["cam"][n, c].ravel())[0, 1] >= 0.999
                compared += 1
    assert compared >= len(x)
    return got, structure
