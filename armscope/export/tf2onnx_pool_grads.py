"""tf2onnx handlers for the backward-pass ops a saliency map needs: the gradient
of the class score with respect to the input image runs back through the whole
backbone, and an InceptionV3-shaped network's backward pass holds four TensorFlow
ops tf2onnx does not convert (its op set covers forward inference):

* ``ShapeN``: N ``Shape`` ops.
* ``ConcatOffset``: where each input of a ``Concatenate`` starts along its axis
  (the concatenation's gradient slices the incoming gradient there).
* ``MaxPoolGrad``: the gradient goes to the input cell that was the window's
  maximum. ONNX ``MaxPool`` returns that cell's flat index (its second output);
  ``ScatterElements`` with ``reduction="add"`` sums the gradient of every window
  into it. (Ties: TensorFlow gives a window's gradient to one maximal cell, ONNX
  Runtime to one too; after a ReLU the common tie is between zeros, whose own
  gradient is zero either way.)
* ``AvgPoolGrad``: each output cell's gradient spread evenly over the input cells
  its window covered (padding excluded, as TensorFlow counts): divide by that
  count (a constant of the static shapes) and apply a depthwise ``ConvTranspose``
  with a kernel of ones.

TensorFlow computes these in NHWC; ONNX pools and convolutions are NCHW, so each
handler transposes in and out (tf2onnx's optimiser cancels neighbouring
transposes). Importing this module registers the handlers with tf2onnx's global
registry (``armscope.export.tf2onnx_grads`` imports it).
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto
from tf2onnx import utils
from tf2onnx.handler import tf_op

_TO_NCHW, _TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def _attr_list(node, name: str) -> list[int]:
    return [int(v) for v in node.get_attr_value(name)]


def _padding(node) -> str:
    value = node.get_attr_value("padding")
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_nhwc(node) -> None:
    fmt = node.get_attr_value("data_format", b"NHWC")
    fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
    if fmt != "NHWC":
        raise ValueError(f"{node.type} {node.name}: data_format {fmt}; only NHWC is supported")


def _out_size(size: int, k: int, s: int, padding: str) -> int:
    """TensorFlow's pooled size (the incoming gradient's shape is often unknown after a Slice)."""
    return -(-size // s) if padding == "SAME" else (size - k) // s + 1


def _same_pads(size: int, out: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow's SAME padding (extra cell at the end), before and after."""
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _static_hw(ctx, tensor: str, what: str, node) -> tuple[int, int]:
    shape = ctx.get_shape(tensor)
    if shape is None or len(shape) != 4 or any(d is None or d < 0 for d in shape[1:3]):
        raise ValueError(f"{node.type} {node.name}: {what} has no static height and width ({shape})")
    return int(shape[1]), int(shape[2])


@tf_op("ShapeN")
class ShapeN:
    """ShapeN(x_1..x_n) = Shape(x_1)..Shape(x_n), in the requested integer type."""

    @classmethod
    def version_1(cls, ctx, node, **kwargs):
        inputs, outputs = list(node.input), list(node.output)
        dtypes = [ctx.get_dtype(o) for o in outputs]
        shapes = [ctx.get_shape(o) for o in outputs]
        ctx.remove_node(node.name)
        for x, out, dtype, shape in zip(inputs, outputs, dtypes, shapes):
            shape_node = ctx.make_node("Shape", [x])
            ctx.make_node("Cast", shape_node.output, attr={"to": dtype}, outputs=[out], shapes=[shape],
                          dtypes=[dtype])


@tf_op("ConcatOffset")
class ConcatOffset:
    """ConcatOffset(axis, s_1..s_n)[i] = sum_{j<i} s_j masked to the axis (zeros elsewhere)."""

    @classmethod
    def version_1(cls, ctx, node, **kwargs):
        axis_node = node.inputs[0]
        if not axis_node.is_const():
            raise ValueError(f"ConcatOffset {node.name}: the concatenation axis is not a constant")
        shapes_in, outputs = list(node.input[1:]), list(node.output)
        rank = ctx.get_shape(shapes_in[0])[0]
        axis = int(axis_node.get_tensor_value()) % rank
        dtype = ctx.get_dtype(shapes_in[0])
        np_dtype = utils.map_onnx_to_numpy_type(dtype)
        mask = np.zeros(rank, np_dtype)
        mask[axis] = 1
        mask_name = ctx.make_const(utils.make_name(f"{node.name}_mask"), mask).output[0]
        zeros = ctx.make_const(utils.make_name(f"{node.name}_zero"), np.zeros(rank, np_dtype)).output[0]
        ctx.remove_node(node.name)
        acc = zeros
        for i, out in enumerate(outputs):
            if i == 0:
                ctx.make_node("Identity", [zeros], outputs=[out], shapes=[[rank]], dtypes=[dtype])
                continue
            step = ctx.make_node("Mul", [shapes_in[i - 1], mask_name]).output[0]
            acc = ctx.make_node("Add", [acc, step], outputs=[out], shapes=[[rank]], dtypes=[dtype]).output[0]


@tf_op("MaxPoolGrad")
class MaxPoolGrad:
    """MaxPoolGrad(x, y, dy): dy summed into the argmax cell of each window."""

    @classmethod
    def version_16(cls, ctx, node, **kwargs):
        _check_nhwc(node)
        x, _, grad = node.input
        out = node.output[0]
        dtype = ctx.get_dtype(out)
        kh, kw = _attr_list(node, "ksize")[1:3]
        sh, sw = _attr_list(node, "strides")[1:3]
        h, w = _static_hw(ctx, x, "its input", node)
        ho, wo = _out_size(h, kh, sh, _padding(node)), _out_size(w, kw, sw, _padding(node))
        if _padding(node) == "SAME":
            (pt, pb), (pl, pr) = _same_pads(h, ho, kh, sh), _same_pads(w, wo, kw, sw)
        else:
            pt = pb = pl = pr = 0
        shape = ctx.get_shape(out)
        ctx.remove_node(node.name)
        x_nchw = ctx.make_node("Transpose", [x], attr={"perm": _TO_NCHW}).output[0]
        pool = ctx.make_node("MaxPool", [x_nchw], output_count=2,
                             attr={"kernel_shape": [kh, kw], "strides": [sh, sw], "pads": [pt, pl, pb, pr]},
                             dtypes=[dtype, TensorProto.INT64])
        g_nchw = ctx.make_node("Transpose", [grad], attr={"perm": _TO_NCHW}).output[0]
        flat = ctx.make_const(utils.make_name(f"{node.name}_flat"), np.array([-1], np.int64)).output[0]
        in_shape = ctx.make_node("Shape", [x_nchw]).output[0]
        # zeros of x's shape and type (x - x, x finite): no typed constant, so FP16 conversion keeps it whole
        zeros = ctx.make_node("Sub", [x_nchw, x_nchw]).output[0]
        index = ctx.make_node("Reshape", [pool.output[1], flat]).output[0]
        values = ctx.make_node("Reshape", [g_nchw, flat]).output[0]
        zeros_flat = ctx.make_node("Reshape", [zeros, flat]).output[0]
        summed = ctx.make_node("ScatterElements", [zeros_flat, index, values],
                               attr={"axis": 0, "reduction": "add"}).output[0]
        dx = ctx.make_node("Reshape", [summed, in_shape]).output[0]
        ctx.make_node("Transpose", [dx], attr={"perm": _TO_NHWC}, outputs=[out], shapes=[shape], dtypes=[dtype])


@tf_op("AvgPoolGrad")
class AvgPoolGrad:
    """AvgPoolGrad(input_shape, dy): dy / window count, spread by a depthwise ConvTranspose of ones."""

    @classmethod
    def version_11(cls, ctx, node, **kwargs):
        _check_nhwc(node)
        grad = node.input[1]
        out = node.output[0]
        dtype = ctx.get_dtype(out)
        shape = ctx.get_shape(out)
        kh, kw = _attr_list(node, "ksize")[1:3]
        sh, sw = _attr_list(node, "strides")[1:3]
        h, w = _static_hw(ctx, out, "its input", node)
        ho, wo = _out_size(h, kh, sh, _padding(node)), _out_size(w, kw, sw, _padding(node))
        channels = shape[3] if shape and shape[3] and shape[3] > 0 else ctx.get_shape(grad)[3]
        if channels is None or channels < 0:
            raise ValueError(f"AvgPoolGrad {node.name}: no static channel count")
        if _padding(node) == "SAME":
            (pt, pb), (pl, pr) = _same_pads(h, ho, kh, sh), _same_pads(w, wo, kw, sw)
        else:
            pt = pb = pl = pr = 0
        np_dtype = utils.map_onnx_to_numpy_type(dtype)
        rows = np.array([min(i * sh - pt + kh, h) - max(i * sh - pt, 0) for i in range(ho)], np.float64)
        cols = np.array([min(j * sw - pl + kw, w) - max(j * sw - pl, 0) for j in range(wo)], np.float64)
        inverse = (1.0 / np.outer(rows, cols)).astype(np_dtype)[None, None]
        ctx.remove_node(node.name)
        g_nchw = ctx.make_node("Transpose", [grad], attr={"perm": _TO_NCHW}).output[0]
        scale = ctx.make_const(utils.make_name(f"{node.name}_count"), inverse).output[0]
        scaled = ctx.make_node("Mul", [g_nchw, scale]).output[0]
        ones = ctx.make_const(utils.make_name(f"{node.name}_ones"),
                              np.ones((channels, 1, kh, kw), np_dtype)).output[0]
        extra_h = h - ((ho - 1) * sh + kh - pt - pb)
        extra_w = w - ((wo - 1) * sw + kw - pl - pr)
        if not (0 <= extra_h < max(sh, 1) + kh and 0 <= extra_w < max(sw, 1) + kw):
            raise ValueError(f"AvgPoolGrad {node.name}: cannot place a {ho}x{wo} gradient on a {h}x{w} input")
        spread = ctx.make_node("ConvTranspose", [scaled, ones],
                               attr={"group": channels, "kernel_shape": [kh, kw], "strides": [sh, sw],
                                     "pads": [pt, pl, pb, pr], "output_padding": [extra_h, extra_w]}).output[0]
        ctx.make_node("Transpose", [spread], attr={"perm": _TO_NHWC}, outputs=[out], shapes=[shape], dtypes=[dtype])

