"""What one member's graph does to the bundle's host input before its own layers.

A bundle has ONE input, ``image`` (N, S, S, 3) RGB float32 0..255, so every
backend, the merged graph and the runtime stay as they are. A member trained at
another size, or on inputs scaled outside the model (``preprocess_input`` in the
lab's data pipeline), gets both inside its graph: a bilinear resize (TensorFlow's
``tf.image.resize``, half-pixel centres, no antialiasing; an ONNX ``Resize``)
and the scaling named here. ``members[i].preprocessing`` in the manifest says
which (``armscope.core.bundle``); the host never applies it.
"""
from __future__ import annotations

import numpy as np

from armscope.core.errors import ArmscopeError

IMAGENET_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> what it means (the manifest's members[i].preprocessing.scaling)
SCALINGS = {
    "none": "none outside the model (the model scales its own input)",
    "x/255": "x/255 (0..1)",
    "x/127.5-1": "x/127.5-1 (-1..1)",
    "caffe": "caffe: RGB->BGR, minus the ImageNet mean (B, G, R) = (103.939, 116.779, 123.68); "
             "keras.applications.resnet50.preprocess_input",
    "torch": "torch: x/255, minus the ImageNet mean (0.485, 0.456, 0.406), divided by the ImageNet std "
             "(0.229, 0.224, 0.225)",
}
# the names ``export --input-scaling`` uses for the same scalings
ALIASES = {"unit": "x/255", "symmetric": "x/127.5-1", "imagenet": "torch"}
RESIZE = "bilinear"
RESIZE_TEXT = "bilinear (tf.image.resize: half-pixel centres, no antialiasing; ONNX Resize linear)"


def check_scaling(name: str, where: str) -> str:
    """The scaling's canonical name (``ALIASES`` accepted), or ArmscopeError naming ``where``."""
    name = ALIASES.get(name, name)
    if name not in SCALINGS:
        raise ArmscopeError(f"{where}: scaling {name!r}; expected one of {', '.join(SCALINGS)}")
    return name


def scale(x, name: str):
    """TensorFlow ops: RGB 0..255 -> what the member was trained on."""
    import tensorflow as tf

    if name == "none":
        return x
    if name == "x/255":
        return x / 255.0
    if name == "x/127.5-1":
        return x / 127.5 - 1.0
    if name == "caffe":
        bgr = tf.gather(x, [2, 1, 0], axis=-1)
        return bgr - tf.constant(np.array(IMAGENET_CAFFE_BGR_MEAN, np.float32))
    if name == "torch":
        return (x / 255.0 - tf.constant(np.array(IMAGENET_MEAN, np.float32))) / tf.constant(
            np.array(IMAGENET_STD, np.float32))
    raise ArmscopeError(f"scaling {name!r}; expected one of {', '.join(SCALINGS)}")


def to_member(image, host_size: int, member_size: int, scaling: str):
    """The host image (B, S, S, 3) -> the member's input (B, s, s, 3), resized and scaled."""
    import tensorflow as tf

    x = image
    if member_size != host_size:
        x = tf.image.resize(x, (member_size, member_size), method="bilinear", antialias=False)
    return scale(x, scaling)


def resize_cam(cam, size: tuple[int, int]):
    """(B, C, h, w) -> (B, C, H, W), bilinear, so members with other map sizes can be averaged.
    Still non-negative: bilinear weights are non-negative."""
    import tensorflow as tf

    if tuple(cam.shape[2:]) == tuple(size):
        return cam
    x = tf.transpose(cam, (0, 2, 3, 1))
    x = tf.image.resize(x, size, method="bilinear", antialias=False)
    return tf.transpose(x, (0, 3, 1, 2))


def manifest_block(host_size: int, member_size: int, scaling: str) -> dict:
    return {"input_size": member_size, "resize": "none" if member_size == host_size else RESIZE,
            "scaling": scaling, "scaling_means": SCALINGS[scaling],
            **({"resize_means": RESIZE_TEXT} if member_size != host_size else {})}
