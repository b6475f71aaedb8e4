"""Narrow, seeded Keras classifiers shaped the way labs build them, for the
export tests: tf.keras (Keras 2, via tf_keras) and Keras 3, tiled in-model by
Reshape/Permute, Cropping2D or Lambda slicing, or whole-image; nested
DenseNet-style backbones; per-patch heads shared, separate or absent; softmax
or one sigmoid unit. Tiny (a few thousand weights) so conversion stays fast,
with batch-norm statistics and head weights randomised so outputs vary
between images and CAMs are not trivial."""
from __future__ import annotations

import numpy as np

SIZE = 320  # tiled models: 4x4 patches of 80 -> 5x5 maps per patch (stride 16), 20x20 reassembled
GRID, PATCH = 4, 80


def keras3():
    import keras

    return keras


def tfk():
    import tf_keras

    return tf_keras


def densenet_like(K, size: int, name: str = "densenet121", growth: int = 4):
    """A DenseNet-shaped nested backbone (stem, dense blocks with concatenation,
    transitions), stride 16."""
    L = K.layers
    inp = K.Input((size, size, 3))
    x = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="conv1_conv")(inp)
    x = L.BatchNormalization(name="conv1_bn")(x)
    x = L.Activation("relu", name="conv1_relu")(x)
    x = L.MaxPooling2D(2, name="pool1")(x)
    for b in range(2):
        for i in range(2):
            y = L.BatchNormalization(name=f"conv{b + 2}_block{i}_bn")(x)
            y = L.Activation("relu", name=f"conv{b + 2}_block{i}_relu")(y)
            y = L.Conv2D(growth, 3, padding="same", use_bias=False, name=f"conv{b + 2}_block{i}_conv")(y)
            x = L.Concatenate(name=f"conv{b + 2}_block{i}_concat")([x, y])
        x = L.Conv2D(8, 1, use_bias=False, name=f"pool{b + 2}_conv")(x)
        x = L.AveragePooling2D(2, name=f"pool{b + 2}_pool")(x)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Activation("relu", name="relu")(x)
    return K.Model(inp, x, name=name)


def randomise(model, seed: int) -> None:
    """Non-trivial batch-norm statistics and larger head weights (seeded)."""
    rng = np.random.default_rng(seed)

    def layers_of(m):
        for layer in m.layers:
            yield layer
            inner = getattr(layer, "layer", None)
            for sub in [layer] + ([inner] if inner is not None else []):
                if hasattr(sub, "layers") and sub is not m:
                    yield from layers_of(sub)

    for layer in layers_of(model):
        kind = type(layer).__name__
        if kind == "BatchNormalization":
            layer.moving_mean.assign(rng.normal(0, 0.2, layer.moving_mean.shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, layer.moving_variance.shape).astype("float32"))
            layer.beta.assign(rng.normal(0.1, 0.2, layer.beta.shape).astype("float32"))
        elif kind in ("Dense", "EinsumDense"):
            layer.kernel.assign(rng.normal(0, 1.5, layer.kernel.shape).astype("float32"))


def _seed(K, seed):
    if K.__name__ == "keras":
        K.utils.set_random_seed(seed)
    else:
        import tensorflow as tf

        tf.random.set_seed(seed)
        np.random.seed(seed)


def tiled_timedistributed(K, seed=0, classes=2):
    """Reshape/Permute tiling, TimeDistributed nested backbone, GlobalAveragePooling3D
    final head and shared TimeDistributed per-patch heads: outputs [final, patch]."""
    _seed(K, seed)
    L = K.layers
    inp = K.Input((SIZE, SIZE, 3))
    x = L.Rescaling(1 / 127.5, offset=-1.0)(inp)
    x = L.Reshape((GRID, PATCH, GRID, PATCH, 3))(x)
    x = L.Permute((1, 3, 2, 4, 5))(x)
    x = L.Reshape((GRID * GRID, PATCH, PATCH, 3))(x)
    maps = L.TimeDistributed(densenet_like(K, PATCH))(x)
    final = L.Dense(classes, activation="softmax")(L.GlobalAveragePooling3D()(maps))
    patch = L.TimeDistributed(L.Dense(classes, activation="softmax"))(L.TimeDistributed(L.GlobalAveragePooling2D())(maps))
    model = K.Model(inp, [final, patch])
    randomise(model, seed)
    return model


def _reassemble(L, maps):
    rows = [L.Concatenate(axis=2)(maps[r * GRID:(r + 1) * GRID]) for r in range(GRID)]
    return L.Concatenate(axis=1)(rows)


def tiled_cropping(K, seed=0, classes=2):
    """Cropping2D patches through one shared nested backbone, maps reassembled by
    Concatenate; 16 separate per-patch GAP + Dense outputs: [final, patch_0..patch_15]."""
    _seed(K, seed)
    L = K.layers
    inp = K.Input((SIZE, SIZE, 3))
    x = L.Rescaling(1 / 255.0)(inp)
    backbone = densenet_like(K, PATCH)
    maps = []
    for r in range(GRID):
        for c in range(GRID):
            crop = L.Cropping2D(((r * PATCH, SIZE - (r + 1) * PATCH), (c * PATCH, SIZE - (c + 1) * PATCH)))(x)
            maps.append(backbone(crop))
    final = L.Dense(classes, activation="softmax", name="final")(L.GlobalAveragePooling2D()(_reassemble(L, maps)))
    patches = [L.Dense(classes, activation="softmax", name=f"patch_{k}")(L.GlobalAveragePooling2D()(m))
               for k, m in enumerate(maps)]
    model = K.Model(inp, [final, *patches])
    randomise(model, seed)
    return model


def tiled_lambda(K, seed=0, classes=2):
    """Lambda slicing (Python code in the file), shared backbone, final head on the
    average of per-patch pools; no per-patch heads."""
    _seed(K, seed)
    L = K.layers
    inp = K.Input((SIZE, SIZE, 3))
    x = L.Rescaling(1 / 127.5, offset=-1.0)(inp)
    backbone = densenet_like(K, PATCH)
    pools = []
    for r in range(GRID):
        for c in range(GRID):
            patch = L.Lambda(lambda t, r, c, p: t[:, r * p:(r + 1) * p, c * p:(c + 1) * p, :],
                             arguments={"r": r, "c": c, "p": PATCH}, name=f"slice_{r}_{c}")(x)
            pools.append(L.GlobalAveragePooling2D()(backbone(patch)))
    final = L.Dense(classes, activation="softmax")(L.Average()(pools))
    model = K.Model(inp, final)
    randomise(model, seed)
    return model


def tiled_own_names(seed=0, classes=3):
    """Keras 3, the lab's own layer names, maps reassembled by Reshape/Permute, no per-patch heads."""
    K = keras3()
    _seed(K, seed)
    L = K.layers
    inp = K.Input((SIZE, SIZE, 3), name="slide_field")
    x = L.Rescaling(1 / 127.5, offset=-1.0, name="to_unit")(inp)
    x = L.Reshape((GRID, PATCH, GRID, PATCH, 3), name="cut")(x)
    x = L.Permute((1, 3, 2, 4, 5), name="order")(x)
    x = L.Reshape((GRID * GRID, PATCH, PATCH, 3), name="tiles")(x)
    maps = L.TimeDistributed(densenet_like(K, PATCH, name="encoder"), name="per_tile")(x)
    y = L.Reshape((GRID, GRID, 5, 5, maps.shape[-1]), name="grid")(maps)
    y = L.Permute((1, 3, 2, 4, 5), name="interleave")(y)
    y = L.Reshape((GRID * 5, GRID * 5, maps.shape[-1]), name="mosaic")(y)
    y = L.Dropout(0.3, name="drop")(L.GlobalAveragePooling2D(name="pool")(y))
    model = K.Model(inp, L.Dense(classes, activation="softmax", name="diagnosis")(y), name="lab_model")
    randomise(model, seed)
    return model


def inception_like(K, size=139, seed=0, mlp=False):
    """A whole-image InceptionV3-shaped binary classifier: valid-padded stem, two
    inception blocks (1x1 / 3x3 / double 3x3 / pool branches concatenated) with
    reductions, GAP and ONE sigmoid unit. ``mlp``: a hidden Dense+ReLU between the
    pool and the sigmoid (a head that is not linear)."""
    _seed(K, seed)
    L = K.layers
    inp = K.Input((size, size, 3))
    x = L.Rescaling(1 / 127.5, offset=-1.0)(inp)

    def conv(t, f, k, s=1, pad="same"):
        t = L.Conv2D(f, k, strides=s, padding=pad, use_bias=False)(t)
        return L.Activation("relu")(L.BatchNormalization(scale=False)(t))

    x = conv(x, 8, 3, 2, "valid")
    x = conv(x, 8, 3, 1, "valid")
    x = L.MaxPooling2D(3, strides=2)(x)
    for block in range(2):
        b1 = conv(x, 4, 1)
        b3 = conv(conv(x, 4, 1), 4, 3)
        bd = conv(conv(conv(x, 4, 1), 4, 3), 4, 3)
        bp = conv(L.AveragePooling2D(3, strides=1, padding="same")(x), 4, 1)
        x = L.Concatenate(name=f"mixed{block}")([b1, b3, bd, bp])
        if block == 0:
            x = L.MaxPooling2D(3, strides=2)(x)
    x = L.GlobalAveragePooling2D(name="avg_pool")(x)
    if mlp:
        x = L.Dense(8, activation="relu", name="hidden")(x)
    out = L.Dense(1, activation="sigmoid", name="predictions")(x)
    model = K.Model(inp, out, name="inception_like")
    randomise(model, seed)
    return model


def mlp_head_multiclass(seed=0, size=96, classes=3, pool="avg"):
    """Keras 3 whole-image CNN with an MLP head (GAP or GMP -> Dense+ReLU -> Dropout -> Dense softmax)."""
    K = keras3()
    _seed(K, seed)
    L = K.layers
    inp = K.Input((size, size, 3))
    x = L.Rescaling(1 / 255.0)(inp)
    x = L.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = L.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = L.Conv2D(12, 3, strides=2, activation="relu", name="last_conv")(x)
    x = (L.GlobalAveragePooling2D() if pool == "avg" else L.GlobalMaxPooling2D())(x)
    x = L.Dense(16, activation="relu")(x)
    x = L.Dropout(0.2)(x)
    model = K.Model(inp, L.Dense(classes, activation="softmax")(x))
    randomise(model, seed)
    return model
