"""tf2onnx handlers for the gradient ops a Grad-CAM computed in the graph needs
and tf2onnx lacks (its op set covers forward inference).

A head that is not linear after its pool (GAP -> Dense+ReLU -> Dense, say) gets
its Grad-CAM from a tf.GradientTape inside the deploy function; the traced
backward pass holds ``ReluGrad`` (and ``SigmoidGrad``/``TanhGrad`` for those
hidden activations), which become plain elementwise ONNX ops here. Importing
this module registers them with tf2onnx (its ``tf_op`` registry is global), so
every conversion route in ``export`` gets them.
"""
from __future__ import annotations

import numpy as np
from tf2onnx import utils
from tf2onnx.handler import tf_op


def _const(ctx, node, value: float, dtype):
    return ctx.make_const(utils.make_name(f"{node.name}_c"),
                          np.array(value, dtype=utils.map_onnx_to_numpy_type(dtype))).output[0]


@tf_op("ReluGrad")
class ReluGrad:
    """ReluGrad(dy, x) = dy * (x > 0) = dy * Sign(Relu(x)): no Cast to a fixed float type, so
    the graph converts to FP16 whole (armscope.calibration.fp16)."""

    @classmethod
    def version_1(cls, ctx, node, **kwargs):
        grads, features = node.input
        relu = ctx.make_node("Relu", [features])
        mask = ctx.make_node("Sign", relu.output)
        node.type = "Mul"
        ctx.replace_inputs(node, [grads, mask.output[0]])


@tf_op("SigmoidGrad")
class SigmoidGrad:
    """SigmoidGrad(y, dy) = dy * y * (1 - y)."""

    @classmethod
    def version_1(cls, ctx, node, **kwargs):
        y, grads = node.input
        dtype = ctx.get_dtype(y)
        one_minus = ctx.make_node("Sub", [_const(ctx, node, 1.0, dtype), y])
        local = ctx.make_node("Mul", [y, one_minus.output[0]])
        node.type = "Mul"
        ctx.replace_inputs(node, [grads, local.output[0]])


@tf_op("TanhGrad")
class TanhGrad:
    """TanhGrad(y, dy) = dy * (1 - y * y)."""

    @classmethod
    def version_1(cls, ctx, node, **kwargs):
        y, grads = node.input
        dtype = ctx.get_dtype(y)
        square = ctx.make_node("Mul", [y, y])
        local = ctx.make_node("Sub", [_const(ctx, node, 1.0, dtype), square.output[0]])
        node.type = "Mul"
        ctx.replace_inputs(node, [grads, local.output[0]])


import armscope.export.tf2onnx_pool_grads  # noqa: E402,F401  (the input gradient's pooling/concat ops: saliency maps)
