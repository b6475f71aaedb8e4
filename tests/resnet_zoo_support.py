"""Narrow, seeded ResNet-shaped Keras models and SVM heads for the renal
electron-microscopy system's tests (keras.applications.ResNet50 is too big for
CI): a stem, stages of residual blocks (conv-BN-ReLU, conv-BN, projection
shortcut, add, ReLU), each stage halving the map. ``skip_features`` pools the
outputs of several stages and concatenates them (the "skip features" an SVM is
trained on); ``plain_classifier`` is GAP + softmax on the last stage. Neither
scales its input: like ResNet50, they expect ``preprocess_input`` (caffe) done
outside, which the export puts in the graph (``--scaling``).

The SVM heads are trained here, in the test, on the feature model's features
of crops of the real NCT-CRC-HE-100K tiles (samples/he/)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

TISSUES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
# the stand-in tasks: tissue types grouped (the tiles carry no renal labels)
BINARY = {"tumour": ("TUM", "NORM", "LYM", "MUS"), "other": ("ADI", "BACK", "DEB", "MUC", "STR")}
THREE = {"epithelial": ("TUM", "NORM", "MUC"), "stromal": ("STR", "MUS", "ADI"), "other": ("LYM", "DEB", "BACK")}


def _seed(seed: int):
    import keras

    keras.utils.set_random_seed(seed)


def _randomise_bn(model, seed: int) -> None:
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 5.0, layer.moving_mean.shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(20, 60, layer.moving_variance.shape).astype("float32"))
            layer.beta.assign(rng.normal(0.1, 0.2, layer.beta.shape).astype("float32"))


def _body(size: int, widths=(8, 12, 16)):
    """Input and the output of each stage (stride 4 after the stem, then x2 per stage after the first)."""
    import keras

    L = keras.layers
    inp = keras.Input((size, size, 3))
    x = L.Conv2D(8, 5, strides=2, padding="same", name="conv1_conv")(inp)
    x = L.Activation("relu", name="conv1_relu")(L.BatchNormalization(name="conv1_bn")(x))
    x = L.MaxPooling2D(3, strides=2, padding="same", name="pool1_pool")(x)
    outs = []
    for s, width in enumerate(widths):
        stride = 1 if s == 0 else 2
        name = f"conv{s + 2}_block1"
        y = L.Conv2D(width, 3, strides=stride, padding="same", name=f"{name}_1_conv")(x)
        y = L.Activation("relu", name=f"{name}_1_relu")(L.BatchNormalization(name=f"{name}_1_bn")(y))
        y = L.BatchNormalization(name=f"{name}_2_bn")(L.Conv2D(width, 3, padding="same", name=f"{name}_2_conv")(y))
        shortcut = L.BatchNormalization(name=f"{name}_0_bn")(
            L.Conv2D(width, 1, strides=stride, name=f"{name}_0_conv")(x))
        x = L.Activation("relu", name=f"{name}_out")(L.Add(name=f"{name}_add")([shortcut, y]))
        outs.append(x)
    return inp, outs


def skip_features(size: int = 64, seed: int = 0):
    """ResNet-shaped feature extractor: GAP of three stages' outputs, concatenated."""
    import keras

    _seed(seed)
    L = keras.layers
    inp, outs = _body(size)
    pools = [L.GlobalAveragePooling2D(name=f"gap_{i + 2}")(o) for i, o in enumerate(outs)]
    model = keras.Model(inp, L.Concatenate(name="skip_features")(pools), name="resnet_skip_features")
    _randomise_bn(model, seed)
    return model


def plain_classifier(size: int = 96, classes: int = 2, seed: int = 1):
    """ResNet-shaped softmax classifier: GAP + Dense on the last stage."""
    import keras

    _seed(seed)
    L = keras.layers
    inp, outs = _body(size)
    x = L.GlobalAveragePooling2D(name="avg_pool")(outs[-1])
    model = keras.Model(inp, L.Dense(classes, activation="softmax", name="predictions")(x), name="resnet_plain")
    _randomise_bn(model, seed)
    rng = np.random.default_rng(seed)
    dense = model.get_layer("predictions")
    dense.kernel.assign(rng.normal(0, 0.5, dense.kernel.shape).astype("float32"))
    return model


def tile_paths(root: Path) -> dict[str, Path]:
    return {t: next((root / "samples" / "he" / "nct-crc-he-100k" / t).glob("*.tif")) for t in TISSUES}


def rgb(path: Path) -> np.ndarray:
    from armscope.core.preprocess import load_image

    return cv2.cvtColor(load_image(path), cv2.COLOR_BGR2RGB)


def crops(image: np.ndarray, size: int, n: int, seed: int) -> np.ndarray:
    """n random square crops (96..224 px) of an RGB tile, resized to size x size, float32 0..255."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        c = int(rng.integers(96, image.shape[0] + 1))
        top, left = rng.integers(0, image.shape[0] - c + 1), rng.integers(0, image.shape[1] - c + 1)
        patch = image[top:top + c, left:left + c]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        out.append(cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA))
    return np.stack(out).astype(np.float32)


def features_of(model, images: np.ndarray, scaling: str = "caffe", batch: int = 8) -> np.ndarray:
    """The model's features, a few images at a time (a full-size ResNet50 on a hundred crops at
    once holds gigabytes of activations)."""
    from armscope.export import member_input

    return np.concatenate([np.asarray(model(np.asarray(member_input.scale(images[i:i + batch], scaling)),
                                            training=False), np.float64) for i in range(0, len(images), batch)])


def train_svm(model, root: Path, groups: dict[str, tuple], per_tile: int = 10, scaler: bool = False, seed: int = 0):
    """An SVC(rbf, probability=True) on the model's features of crops of the real tiles, labelled by group."""
    import warnings

    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    size = int(model.inputs[0].shape[1])
    tiles = tile_paths(root)
    xs, ys = [], []
    for label, tissues in groups.items():
        for i, tissue in enumerate(tissues):
            xs.append(crops(rgb(tiles[tissue]), size, per_tile, seed + 31 * i + TISSUES.index(tissue)))
            ys += [label] * per_tile
    features = features_of(model, np.concatenate(xs))
    svc = SVC(kernel="rbf", probability=True, random_state=seed)
    estimator = make_pipeline(StandardScaler(), svc) if scaler else svc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn 1.9 deprecates probability=True (still what labs hold)
        estimator.fit(features, np.array(ys))
    return estimator


def host_images(root: Path, size: int) -> np.ndarray:
    """The nine real tiles (one per tissue), resized to the bundle's input, RGB float32 0..255."""
    return np.stack([cv2.resize(rgb(p), (size, size), interpolation=cv2.INTER_AREA)
                     for p in tile_paths(root).values()]).astype(np.float32)
