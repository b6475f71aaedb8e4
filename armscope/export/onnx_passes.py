"""ONNX-side passes of the shared-graph conversion (``armscope.export.convert``): bind a
member's weights into the converted graph, fold it, and put batch
normalisations back into a form the runtimes fuse.

Why these passes: tf2onnx converts the graph once with the weights as inputs,
so nothing that depends on a weight is folded during conversion. After the
weights are bound, ONNX Runtime's *basic* offline level folds constants, fuses
Conv+BN/Mul/Add and cancels the layout transposes tf2onnx put around every
convolution, in C++ and in seconds, using standard ONNX operators only (the
extended levels would write ONNX Runtime's own operators, which OpenVINO and
TensorRT cannot read). A Keras batch normalisation that follows a
concatenation (DenseNet's pre-activation) reaches ONNX as ``x * s + b`` with
per-channel constants; ONNX Runtime's CPU layout pass cannot fuse that Add and
wraps it in layout reorders (a third slower per frame), while a
``BatchNormalization`` node it turns into a fused 1x1 convolution with the
following ReLU. ``fuse_channel_affine`` writes that node (mean 0, variance 1,
epsilon 0: exactly ``x * s + b``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from armscope.core.errors import ArmscopeError

WEIGHT_PREFIX = "weight_"
STANDARD_DOMAINS = ("", "ai.onnx")


class SharedConversionUnsupported(ArmscopeError):
    """The deploy graph cannot be converted with its weights as inputs; the
    caller can still convert each member on its own."""


def bind_weights(template, values: list[np.ndarray]):
    """A copy of ``template`` whose ``weight_i`` inputs are initializers holding ``values[i]``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(template)
    graph = model.graph
    keep = [i for i in graph.input if not i.name.startswith(WEIGHT_PREFIX)]
    bound = [i for i in graph.input if i.name.startswith(WEIGHT_PREFIX)]
    for value_info in bound:
        value = values[int(value_info.name[len(WEIGHT_PREFIX):])]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=dtype), value_info.name))
    del graph.input[:]
    graph.input.extend(keep)
    return model


def fold_with_onnxruntime(model, scratch: Path):
    """Constant folding, fusions and transpose cancelling at ONNX Runtime's basic
    level; refuses a result outside standard ONNX. ``scratch`` is where ONNX
    Runtime writes the optimised graph (it can only write to a file)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(scratch)
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    folded = onnx.load(str(scratch))
    other = {node.domain for node in folded.graph.node} - set(STANDARD_DOMAINS)
    if other:
        raise SharedConversionUnsupported(f"ONNX Runtime's basic optimisation produced operators outside standard "
                                          f"ONNX ({', '.join(sorted(other))}); the graph would not be portable")
    # ONNX Runtime lists every domain it knows (com.microsoft, org.pytorch.aten, ...); keep the one in use
    kept = [o for o in folded.opset_import if o.domain in STANDARD_DOMAINS]
    del folded.opset_import[:]
    folded.opset_import.extend(kept)
    return folded


def fuse_channel_affine(model) -> int:
    """Rewrite ``Mul(x, s)`` [-> ``Add(., b)``] on a 4-D NCHW ``x`` with (1, C, 1, 1)
    constants as one ``BatchNormalization`` (scale s, bias b, mean 0, var 1,
    epsilon 0), in place. Returns how many were rewritten."""
    from onnx import helper, numpy_helper, shape_inference

    graph = model.graph
    inferred = shape_inference.infer_shapes(model).graph
    rank = {v.name: len(v.type.tensor_type.shape.dim)
            for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output)
            if v.type.tensor_type.HasField("shape")}
    constants = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}

    def per_channel(name: str):
        if name not in constants:
            return None
        array = numpy_helper.to_array(constants[name])
        ok = array.ndim == 4 and array.shape[0] == 1 and array.shape[2:] == (1, 1) and array.dtype == np.float32
        return array.reshape(-1) if ok else None

    def split(node):
        """(tensor, per-channel constant) of a binary node, or (None, None)."""
        for a, b in ((0, 1), (1, 0)):
            values = per_channel(node.input[b])
            if values is not None and node.input[a] not in constants:
                return node.input[a], values
        return None, None

    nodes, absorbed, count = [], set(), 0
    for node in graph.node:
        if id(node) in absorbed:
            continue
        x, scale = split(node) if node.op_type == "Mul" and len(node.input) == 2 else (None, None)
        if x is None or rank.get(x) != 4 or rank.get(node.output[0]) != 4:
            nodes.append(node)
            continue
        bias, out = np.zeros_like(scale), node.output[0]
        following = consumers.get(out, [])
        if len(following) == 1 and following[0].op_type == "Add" and out not in graph_outputs:
            tensor, values = split(following[0])
            if tensor == out and values is not None and values.shape == scale.shape:
                bias, out = values, following[0].output[0]
                absorbed.add(id(following[0]))
        base = f"{node.name or out}_affine"
        for suffix, array in (("scale", scale), ("bias", bias), ("mean", np.zeros_like(scale)),
                              ("var", np.ones_like(scale))):
            graph.initializer.append(numpy_helper.from_array(array.astype(np.float32), f"{base}_{suffix}"))
        nodes.append(helper.make_node("BatchNormalization", [x] + [f"{base}_{s}" for s in ("scale", "bias", "mean", "var")],
                                      [out], name=base, epsilon=0.0))
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return count


def finish_member(model, target: Path) -> None:
    """Bound member graph -> folded, affine-fused, batch axis named ``N``, written to ``target``."""
    import onnx

    folded = fold_with_onnxruntime(model, target)
    fuse_channel_affine(folded)
    # one name for the dynamic batch axis everywhere, as the per-member conversion does
    for value in list(folded.graph.input) + list(folded.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.checker.check_model(folded)
    onnx.save(folded, str(target))
