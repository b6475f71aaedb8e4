"""Reference patch-weighted Grad-CAM with tf.GradientTape on the Keras model.

Differentiates the actual Keras layers (reshape of the 20x20 map into
patches, per-patch pooling, the patch heads) instead of using their weights
directly, so it checks the closed form in ``export.deploy_graph`` rather than
restating it. Used by the tests and by ``armscope export --check-cam``.
"""
from __future__ import annotations

import numpy as np

from export import architecture as arch


def reference_cam(model, image: np.ndarray) -> np.ndarray:
    """image (640, 640, 3) float32 0..255 -> cam (C, 20, 20) via GradientTape."""
    import keras
    import tensorflow as tf

    feature_model = keras.Model(model.input, model.get_layer(arch.FEATURE_MAP).output)
    heads = model.get_layer(arch.PATCH_HEADS)
    patch_gap = model.get_layer("patch_gap")
    fmap = tf.convert_to_tensor(feature_model(image[None], training=False))  # (1, 20, 20, K)
    k = fmap.shape[-1]
    n_classes = heads.kernel.shape[-1]
    cams = []
    for c in range(n_classes):
        with tf.GradientTape() as tape:
            tape.watch(fmap)
            # 20x20 map -> (16, 5, 5, K) patches, the inverse of the model's reassembly
            cells = arch.MAP_SIZE // arch.GRID
            patches = tf.reshape(fmap, (1, arch.GRID, cells, arch.GRID, cells, k))
            patches = tf.transpose(patches, (0, 1, 3, 2, 4, 5))
            patches = tf.reshape(patches, (1, arch.N_PATCHES, cells, cells, k))
            logits = heads(patch_gap(patches))  # (1, 16, C)
            probs = tf.stop_gradient(tf.nn.softmax(logits, axis=-1))
            share = probs[..., c] / tf.reduce_sum(probs[..., c])
            target = tf.reduce_sum(share * logits[..., c])
        grads = tape.gradient(target, fmap)  # (1, 20, 20, K)
        alpha = tf.reduce_mean(grads, axis=(1, 2))  # (1, K)
        cams.append(tf.nn.relu(tf.reduce_sum(fmap * alpha[:, None, None, :], axis=-1))[0].numpy())
    return np.stack(cams)
