"""What one member's graph does to the bundle's host input before its own layers.

A bundle has ONE input, ``image`` (N, S, S, 3) RGB float32 0..255, so every
backend, the merged graph and the runtime stay as they are. A member trained at
another size, or on inputs scaled outside the model (``preprocess_input`` in the
lab's data pipeline), gets both inside its graph: a bilinear resize (TensorFlow's
``tf.image.resize``, half-pixel centres, no antialiasing; an ONNX ``Resize``)
and the scaling named (``armscope.export.scalings``). ``members[i].preprocessing`` in the manifest says
which (``armscope.core.bundle``); the host never applies it.
"""
from __future__ import annotations

from armscope.export.scalings import SCALINGS, parse_scaling

RESIZE = "bilinear"
RESIZE_TEXT = "bilinear (tf.image.resize: half-pixel centres, no antialiasing; ONNX Resize linear)"


def check_scaling(name: str, where: str) -> str:
    """The scaling's canonical name (its --input-scaling name accepted too), or ArmscopeError naming ``where``."""
    return parse_scaling(name, f"{where}: scaling").name


def scale(x, name: str):
    """TensorFlow ops: RGB 0..255 -> what the member was trained on (``armscope.export.scalings``)."""
    return parse_scaling(name, "scaling").tensorflow(x)


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
            "scaling": scaling, "scaling_means": SCALINGS[scaling].means,
            **({"resize_means": RESIZE_TEXT} if member_size != host_size else {})}
