"""The deployable forward graph: tiling, heads and the patch-weighted Grad-CAM,
all in one TensorFlow function that tf2onnx turns into ONNX.

Grad-CAM here is the paper's: on the reassembled 20x20 map A, the gradient of
each patch head's class score is weighted by that patch's share of the class
confidence,

    G^c = sum_k  p_k^c / sum_i p_i^c  *  d z_k^c / dA,

(p = patch-head softmax probabilities, z = patch-head logits, the score that
Grad-CAM differentiates), channel weights alpha^c = mean over the 20x20 map of
G^c, and cam^c = ReLU(sum_d alpha^c_d A_d).

Because every patch head is linear after a global average pool over its 5x5
cells, dz_k^c/dA is W_k[:, c] / 25 on patch k's cells and 0 elsewhere, so

    alpha^c_d = (1 / 400) * sum_k share_k^c * W_k[d, c]

and no backward pass is needed: the CAM is a few matmuls in the forward graph,
which ONNX Runtime and TensorRT run in the same pass as the prediction.
``export.gradcam_reference`` computes the same quantity with tf.GradientTape,
and the tests compare the two.
"""
from __future__ import annotations

from export import architecture as arch


def member_parts(model):
    """A Keras sub-model returning (feature_map, patch_logits, probs) and the patch-head kernel."""
    import keras

    parts = keras.Model(
        model.input,
        [
            model.get_layer(arch.FEATURE_MAP).output,
            model.get_layer(arch.PATCH_HEADS).output,
            model.get_layer(arch.FINAL_HEAD).output,
        ],
        name=f"{model.name}_parts",
    )
    kernel = model.get_layer(arch.PATCH_HEADS).kernel
    return parts, kernel


def closed_form_cam(feature_map, patch_logits, kernel):
    """(B, 20, 20, K), (B, 16, C), (16, K, C) -> (B, C, 20, 20), patch_probs (B, 16, C)."""
    import tensorflow as tf

    patch_probs = tf.nn.softmax(patch_logits, axis=-1)
    share = patch_probs / tf.reduce_sum(patch_probs, axis=1, keepdims=True)  # (B, 16, C)
    cells = tf.cast(tf.shape(feature_map)[1] * tf.shape(feature_map)[2], feature_map.dtype)
    # alpha[b, d, c] = sum_k share[b, k, c] * W[k, d, c] / cells
    alpha = tf.reduce_sum(share[:, :, None, :] * kernel[None], axis=1) / cells  # (B, K, C)
    cam = tf.nn.relu(tf.einsum("bijd,bdc->bcij", feature_map, alpha))
    return cam, patch_probs


def make_deploy_function(models):
    """One tf.function over ``models`` with their outputs averaged. The exporter
    traces one member at a time (the bundle's merged graph is assembled from the
    member ONNX graphs by ``export.merge``, since tracing every member a second
    time costs minutes per DenseNet-121)."""
    import tensorflow as tf

    members = [member_parts(m) for m in models]
    spec = tf.TensorSpec((None, arch.IMAGE_SIZE, arch.IMAGE_SIZE, 3), tf.float32, name="image")

    @tf.function(input_signature=[spec])
    def deploy(image):
        probs, patch_probs, cams = [], [], []
        for parts, kernel in members:
            feature_map, logits, p = parts(image, training=False)
            cam, pp = closed_form_cam(feature_map, logits, kernel)
            probs.append(p)
            patch_probs.append(pp)
            cams.append(cam)
        n = float(len(members))
        return {
            "probs": tf.add_n(probs) / n,
            "patch_probs": tf.add_n(patch_probs) / n,
            "cam": tf.add_n(cams) / n,
        }

    return deploy, spec
