"""The tuberous-sclerosis (TSC) system's model, narrow, for tests: an
InceptionV3-shaped whole-image binary classifier as the study trained it
(224 x 224 inputs already scaled to 0..1 outside the model, grey MRI slices
replicated to three channels, GAP + Dense(1, sigmoid)). Narrow (a few thousand
weights) and seeded, with batch-norm statistics and the head randomised so
outputs vary between slices and maps are not trivial; real InceptionV3 layer
types throughout (valid-padded strided stem, max pools, inception blocks with
1x1 / 3x3 / double 3x3 / average-pool branches, concatenation)."""
from __future__ import annotations

SIZE = 224


def tsc_inception(seed: int = 0, size: int = SIZE, scaling_inside: bool = False):
    """Keras 3 model. ``scaling_inside``: a Rescaling(1/255) layer first (else the
    export's --input-scaling unit supplies it)."""
    import keras

    from keras_zoo_support import randomise

    keras.utils.set_random_seed(seed)
    L = keras.layers
    inp = keras.Input((size, size, 3), name="slice")
    x = L.Rescaling(1 / 255.0)(inp) if scaling_inside else inp

    def conv(t, filters, k, strides=1, padding="same"):
        t = L.Conv2D(filters, k, strides=strides, padding=padding, use_bias=False)(t)
        return L.Activation("relu")(L.BatchNormalization(scale=False)(t))

    x = conv(x, 8, 3, 2, "valid")
    x = conv(x, 8, 3, 1, "valid")
    x = L.MaxPooling2D(3, strides=2)(x)
    x = conv(x, 12, 3, 1, "valid")
    x = L.MaxPooling2D(3, strides=2)(x)
    for block in range(3):
        b1 = conv(x, 4, 1)
        b3 = conv(conv(x, 4, 1), 6, 3)
        bd = conv(conv(conv(x, 4, 1), 6, 3), 6, 3)
        bp = conv(L.AveragePooling2D(3, strides=1, padding="same")(x), 4, 1)
        x = L.Concatenate(name=f"mixed{block}")([b1, b3, bd, bp])
        if block == 1:  # a reduction, as InceptionV3's mixed3
            r3 = conv(x, 8, 3, 2, "valid")
            rp = L.MaxPooling2D(3, strides=2)(x)
            x = L.Concatenate(name="mixed_reduce")([r3, rp])
    x = L.GlobalAveragePooling2D(name="avg_pool")(x)
    out = L.Dense(1, activation="sigmoid", name="predictions")(x)
    model = keras.Model(inp, out, name="tsc_inception")
    randomise(model, seed)
    return model
