"""Reference Grad-CAM with tf.GradientTape on the original Keras model.

Differentiates the model's actual layers (reassembly of patch maps, pooling,
the heads) instead of using their weights, so it checks the deploy graph's
closed forms and in-graph gradients (``armscope.export.deploy_graph``) rather than
restating them. The score is the class logit: a head whose Dense applies
softmax/sigmoid itself has that activation set to linear for the duration (the
usual way to take Grad-CAM's pre-softmax score from a Keras model).
Used by the tests and by ``armscope export`` checks.
"""
from __future__ import annotations

import contextlib

import numpy as np

from armscope.export.graph import sub_model
from armscope.export.structure import PATCH_WEIGHTED, ModelStructure, find_structure


@contextlib.contextmanager
def _logits_out(heads):
    """Make each head's output tensor its logits while active (activation -> linear)."""
    swapped = []
    for head in heads:
        if head.logits is not None:
            continue
        layer = head.classifier.inner or head.classifier.layer
        swapped.append((layer, layer.activation))
        layer.activation = _linear(layer)
    try:
        yield
    finally:
        for layer, activation in swapped:
            layer.activation = activation


def _linear(layer):
    if type(layer).__module__.startswith("tf_keras"):
        import tf_keras

        return tf_keras.activations.linear
    import keras

    return keras.activations.linear


def _scores(head, tensor):
    """Logits (B, [P,] C) of ``head``, with a sigmoid unit's z made [-z, z]."""
    import tensorflow as tf

    z = tf.convert_to_tensor(tensor)
    return tf.concat([-z, z], axis=-1) if head.activation == "sigmoid" else z


def _probabilities(head, z):
    import tensorflow as tf

    # a sigmoid unit's scores are [-z, z], whose sigmoids are [1 - p, p]
    return tf.nn.sigmoid(z) if head.activation == "sigmoid" else tf.nn.softmax(z, axis=-1)


def reference_cam(model, image: np.ndarray, structure: ModelStructure | None = None) -> np.ndarray:
    """image (S, S, 3) float32 0..255 -> cam (C, H, W) via GradientTape."""
    import tensorflow as tf

    from armscope.export.structure import assemble_map

    st = structure or find_structure(model, model.name)
    x = tf.convert_to_tensor(image[None].astype(np.float32))
    patch = st.cam_form == PATCH_WEIGHTED
    heads = st.patch_heads if patch else [st.final]
    read = [m for h in heads for m in h.maps]  # the maps the differentiated heads read
    scored = [h.logits if h.logits is not None else h.output for h in heads]
    with _logits_out(heads):
        parts = sub_model(model, [*st.final.maps, *read, *scored], "armscope_reference")
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            outs = parts(x, training=False)
            outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
            n_final, n_read = len(st.final.maps), len(read)
            final_maps, read_maps = outs[:n_final], outs[n_final:n_final + n_read]
            logits = [_scores(h, z) for h, z in zip(heads, outs[n_final + n_read:])]
            if patch:
                z = tf.concat([t if t.shape.rank == 3 else t[:, None] for t in logits], axis=1)  # (B, P, C)
                p = tf.stop_gradient(_probabilities(st.final, z))
                share = p / tf.reduce_sum(p, axis=1, keepdims=True)
                targets = [tf.reduce_sum(share[..., c] * z[..., c]) for c in range(st.n_classes)]
            else:
                targets = [tf.reduce_sum(logits[0][:, c]) for c in range(st.n_classes)]
    fmap = assemble_map(final_maps, st.final.layout, st.order, st.grid)
    cams = []
    for target in targets:
        grads = tape.gradient(target, read_maps)
        if patch:  # per-patch gradients placed in their image blocks
            per_patch = []
            for g in grads:
                per_patch.extend([g[:, k] for k in range(g.shape[1])] if g.shape.rank == 5 else [g])
            order = [st.patch_blocks.index(j) for j in range(len(st.patch_blocks))]
            grads = assemble_map(per_patch, "list", order, st.grid)
        else:
            grads = assemble_map(grads, st.final.layout, st.order, st.grid)
        alpha = tf.reduce_mean(grads, axis=(1, 2))  # (1, K)
        cams.append(tf.nn.relu(tf.reduce_sum(fmap * alpha[:, None, None, :], axis=-1))[0].numpy())
    del tape
    return np.stack(cams)


def reference_saliency(model, image: np.ndarray, structure: ModelStructure | None = None,
                       input_scaling=None) -> np.ndarray:
    """image (S, S, 3) float32 0..255 -> saliency (C, S, S): max over channels of
    |d score_c / d image| by GradientTape through the whole Keras model (pool and
    head included), the image scaled by ``input_scaling`` = (scale, offset) first
    when the bundle prepends it."""
    import tensorflow as tf

    st = structure or find_structure(model, model.name)
    x = tf.convert_to_tensor(image[None].astype(np.float32))
    scored = st.final.logits if st.final.logits is not None else st.final.output
    with _logits_out([st.final]):
        part = sub_model(model, [scored], "armscope_reference_saliency")
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            fed = x if input_scaling is None else x * np.asarray(input_scaling[0], np.float32) + \
                np.asarray(input_scaling[1], np.float32)
            out = part(fed, training=False)
            z = _scores(st.final, out[0] if isinstance(out, (list, tuple)) else out)
            targets = [tf.reduce_sum(z[:, c]) for c in range(st.n_classes)]
    maps = [tf.reduce_max(tf.abs(tape.gradient(t, x)), axis=-1)[0].numpy() for t in targets]
    del tape
    return np.stack(maps)
